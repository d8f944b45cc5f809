"""Score networks: shapes, dtypes, per-sample times, gradients to every parameter."""

import pytest
import torch

from implicit_diffusion.models.score_nets import ScoreMLP, SinusoidalTimeEmbedding


def test_time_embedding_values_and_shape():
    emb = SinusoidalTimeEmbedding(8, max_frequency=100.0)
    t = torch.tensor([0.0, 0.5])
    e = emb(t)
    assert e.shape == (2, 8)
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin 0, cos 0
    freqs = torch.exp(torch.linspace(0.0, torch.log(torch.tensor(100.0)).item(), 4))
    torch.testing.assert_close(e[1], torch.cat([torch.sin(0.5 * freqs), torch.cos(0.5 * freqs)]))
    with pytest.raises(ValueError, match="even integer"):
        SinusoidalTimeEmbedding(7)


def test_score_mlp_shapes_per_sample_times_and_gradients():
    g = torch.Generator().manual_seed(0)
    model = ScoreMLP(3, hidden=16, depth=2, time_dim=8).double()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    out = model(x, t)
    assert out.shape == (5, 3) and out.dtype == torch.float64
    # per-sample times: row i depends on t[i] only
    single = torch.stack([model(x[i : i + 1], t[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(out, single, rtol=1e-12, atol=1e-12)
    # a scalar t is broadcast
    torch.testing.assert_close(model(x, t[0]), model(x, t[0].expand(5)))
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_score_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prediction must be one of"):
        ScoreMLP(2, prediction="noise")
    with pytest.raises(ValueError, match="must be >= 1"):
        ScoreMLP(0)
