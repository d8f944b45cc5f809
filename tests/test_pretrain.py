"""Pretraining by denoising score matching: a small MLP learns the noise predictor of Gaussian data."""

import pytest
import torch
from test_dsm import DIM, M_DATA, S_DATA, ExactEpsilon

from implicit_diffusion.models import ScoreMLP
from implicit_diffusion.samplers import VPSchedule
from implicit_diffusion.training import dsm_loss, pretrain_score_model


@pytest.mark.parametrize("seed", [0, 1])
def test_pretrained_model_nearly_attains_the_exact_predictors_loss(seed):
    """Data N(1.5, 0.7²I) in 2-D, 1,000 Adam steps of batch 256. Evaluated on 100k fresh samples
    with the same (t, noise) draws for every model: the exact ε* (the minimiser) scores ≈ 0.44, an
    untrained net ≈ 2. The EMA model must be within 3% of ε* (measured 0.3–1.4% over seeds 0–4)
    and the raw weights within 10% (measured 1.4–2.8%: noisier than their average)."""
    sched = VPSchedule("linear", num_steps=50)
    g = torch.Generator().manual_seed(seed)
    data = M_DATA + S_DATA * torch.randn(4096, DIM, generator=g)
    model = ScoreMLP(DIM, hidden=64, depth=2, time_dim=16)
    untrained = ScoreMLP(DIM, hidden=64, depth=2, time_dim=16)
    untrained.load_state_dict(model.state_dict())
    info = pretrain_score_model(model, data, sched, num_steps=1000, generator=g, batch_size=256, lr=2e-3,
                                ema_decay=0.99)
    assert info.losses.shape == (1000,) and info.losses[-100:].mean() < info.losses[:20].mean()
    x0 = M_DATA + S_DATA * torch.randn(100_000, DIM, generator=torch.Generator().manual_seed(99))

    def loss(m):
        with torch.no_grad():
            return dsm_loss(m, x0, sched, generator=torch.Generator().manual_seed(3), prediction="epsilon").item()

    exact, ema, raw, before = loss(ExactEpsilon(sched)), loss(info.ema_model), loss(model), loss(untrained)
    assert before > 3 * exact
    assert ema < 1.03 * exact
    assert raw < 1.10 * exact
    # the EMA is a different set of weights (an average), not the raw ones
    assert any(not torch.equal(a, b) for a, b in zip(info.ema_model.module.parameters(), model.parameters()))


def test_bad_arguments():
    sched = VPSchedule("ou", num_steps=4)
    model = ScoreMLP(2)
    g = torch.Generator()
    with pytest.raises(ValueError, match="num_steps and batch_size"):
        pretrain_score_model(model, torch.zeros(8, 2), sched, num_steps=0, generator=g)
    with pytest.raises(ValueError, match="ema_decay"):
        pretrain_score_model(model, torch.zeros(8, 2), sched, num_steps=1, generator=g, ema_decay=1.0)
    with pytest.raises(ValueError, match="data must have shape"):
        pretrain_score_model(model, torch.zeros(8), sched, num_steps=1, generator=g)


def test_ema_is_the_exponential_average_of_the_weights_after_each_step():
    """θ̄ ← d·θ̄ + (1 − d)·θ_{k+1} after step k (the docstring), θ_{k+1} the weights *after* the
    Adam step; AveragedModel's first update copies θ₁ (torch's convention, W₀^EMA = W₀^model).
    Weights recorded after each of 6 steps (float64, d = 0.7) and averaged by hand must equal the
    trainer's EMA to 1e-12: a reversed decay (0.3) or an EMA update before the optimizer step
    (averaging θ_k instead of θ_{k+1}) moves it by ≫ 1e-6 (the check below that the weights moved)."""
    from implicit_diffusion.training import DSMTrainer

    sched, d = VPSchedule("ou", num_steps=4), 0.7
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64, 2, generator=g, dtype=torch.float64)
    model = ScoreMLP(2, hidden=8, depth=1, time_dim=4).double()
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer = DSMTrainer(model, data, sched, num_steps=6, generator=g, batch_size=16, lr=0.05, ema_decay=d)
    after = []
    info = trainer.run(callbacks=[lambda k, loss: after.append([p.detach().clone() for p in model.parameters()])])
    assert len(after) == 6
    # the weights move by far more than the tolerance at every step, so the order of averaging matters
    for prev, cur in zip([w0, *after], after):
        assert max(float((a - b).abs().max()) for a, b in zip(prev, cur)) > 1e-3
    expected = after[0]
    for w in after[1:]:
        expected = [d * e + (1 - d) * x for e, x in zip(expected, w)]
    for got, want in zip(info.ema_model.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)
    assert int(info.ema_model.n_averaged) == 6
