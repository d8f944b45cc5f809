"""Denoising score matching: the exact noise predictor of Gaussian data minimises the loss."""

import math

import pytest
import torch

from implicit_diffusion.samplers.schedules import VPSchedule
from implicit_diffusion.training import dsm_loss

M_DATA, S_DATA, DIM = 1.5, 0.7, 2


class ExactEpsilon(torch.nn.Module):
    """ε*(x, t) = σ(t)(x − √ᾱ(t) m)/(ᾱ(t)s² + σ(t)²) for data N(m, s²I) (paper-notes §6),
    optionally perturbed: scale·ε* + shift (the negative controls)."""

    prediction = "epsilon"

    def __init__(self, schedule, scale=1.0, shift=0.0):
        super().__init__()
        self.schedule, self.scale, self.shift = schedule, scale, shift

    def forward(self, x, t):
        a2 = self.schedule.alpha_bar(t)[:, None].to(x.dtype)
        sig = self.schedule.sigma(t)[:, None].to(x.dtype)
        eps = sig * (x - a2.sqrt() * M_DATA) / (a2 * S_DATA**2 + sig**2)
        return self.scale * eps + self.shift


def expected_loss_at_exact(schedule, t):
    """E‖ε* − n‖² = d·ᾱs²/(ᾱs² + σ²) per sample (derivation: ε* − n = σ√ᾱ(x₀ − m)/v − (ᾱs²/v) n)."""
    a2 = schedule.alpha_bar(t)
    v = a2 * S_DATA**2 + 1 - a2
    return DIM * a2 * S_DATA**2 / v


@pytest.mark.parametrize("kind", ["ou", "linear", "cosine"])
def test_exact_predictor_loss_matches_its_closed_form(kind):
    """n = 100k samples at each of 3 fixed times; per-sample loss has SD ≲ 2: tolerance 5 SE."""
    sched = VPSchedule(kind, num_steps=10)
    g = torch.Generator().manual_seed(1)
    model = ExactEpsilon(sched)
    for tt in (0.05, 0.3, 0.8):
        t = torch.full((100_000,), tt * sched.T, dtype=torch.float64)
        x0 = M_DATA + S_DATA * torch.randn(100_000, DIM, generator=g, dtype=torch.float64)
        # per-sample losses (dsm_loss averages: recompute them to get the SE)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        per = (model(sched.marginal(x0, t, noise), t) - noise).pow(2).sum(1)
        expected = float(expected_loss_at_exact(sched, torch.tensor(tt * sched.T, dtype=torch.float64)))
        assert abs(per.mean().item() - expected) <= 5 * per.std().item() / math.sqrt(len(per))
        mean_loss = dsm_loss(model, x0, sched, generator=g, t=t).item()
        assert abs(mean_loss - expected) <= 5 * per.std().item() / math.sqrt(len(per))


@pytest.mark.parametrize("scale, shift", [(1.2, 0.0), (0.8, 0.0), (1.0, 0.1), (-1.0, 0.0)])
def test_perturbed_predictors_have_a_higher_loss(scale, shift):
    """Paired comparison on the same (x₀, t, n): loss(perturbed) − loss(exact) > 5 SE of the difference."""
    sched = VPSchedule("ou", num_steps=10)
    exact, other = ExactEpsilon(sched), ExactEpsilon(sched, scale, shift)
    g = torch.Generator().manual_seed(2)
    n = 100_000
    x0 = M_DATA + S_DATA * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = sched.t_min + (sched.T - sched.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = sched.marginal(x0, t, noise)
    diff = (other(xt, t) - noise).pow(2).sum(1) - (exact(xt, t) - noise).pow(2).sum(1)
    assert diff.mean() > 5 * diff.std() / math.sqrt(n)


def test_score_parametrisation_gives_the_same_loss():
    """A model predicting the score s = −ε/σ has the same DSM loss as its ε form (same draws)."""
    sched = VPSchedule("linear", num_steps=10)
    eps_model = ExactEpsilon(sched)

    class Score(torch.nn.Module):
        prediction = "score"

        def forward(self, x, t):
            return -eps_model(x, t) / sched.sigma(t)[:, None].to(x.dtype)

    x0 = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = dsm_loss(eps_model, x0, sched, generator=torch.Generator().manual_seed(5))
    b = dsm_loss(Score(), x0, sched, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_dsm_needs_a_generator_and_a_prediction_kind():
    sched = VPSchedule("ou", num_steps=4)
    with pytest.raises(ValueError, match="generator"):
        dsm_loss(ExactEpsilon(sched), torch.zeros(2, DIM), sched, generator=None)
    with pytest.raises(ValueError, match="prediction="):
        dsm_loss(lambda x, t: x, torch.zeros(2, DIM), sched, generator=torch.Generator())
