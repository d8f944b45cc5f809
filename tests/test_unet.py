"""UNet score model: shapes, per-sample times, config round trip, errors, gradients, a tiny overfit."""

from __future__ import annotations

import json

import pytest
import torch

from implicit_diffusion.models import UNet


def _perturb_last_layer(model: UNet, generator: torch.Generator, scale: float = 0.1) -> None:
    """Give the zero-initialised output conv random weights, so the output depends on the input."""
    with torch.no_grad():
        for p in model.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


@pytest.mark.parametrize(
    ("in_channels", "size", "mults"),
    [(1, 8, (1, 2)), (1, 8, (1, 2, 2)), (1, 28, (1, 2, 2)), (3, 32, (1, 2, 2))],
)
def test_output_shape_and_zero_init(in_channels, size, mults, generator):
    model = UNet(in_channels, base_channels=16, channel_mults=mults)
    x = torch.randn(3, in_channels, size, size, generator=generator)
    out = model(x, torch.rand(3, generator=generator))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x))  # zero-initialised final conv


def test_attention_variant_shapes_and_gradients(generator):
    model = UNet(base_channels=16, attention=True)
    _perturb_last_layer(model, generator)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    out = model(x, torch.rand(4, generator=generator))
    assert out.shape == x.shape
    out.sum().backward()
    attn = dict(model.mid_attn.named_parameters())
    assert attn and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.values())


def test_per_sample_times_match_separate_calls(generator):
    model = UNet(base_channels=16)
    _perturb_last_layer(model, generator)
    x = torch.randn(5, 1, 8, 8, generator=generator)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0])
    batched = model(x, t)
    single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    # a 0-d t is broadcast to every sample
    torch.testing.assert_close(model(x, t[2]), model(x, t[2].expand(5)), rtol=0, atol=0)


def test_output_depends_on_time_and_on_x(generator):
    model = UNet(base_channels=16)
    _perturb_last_layer(model, generator)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    t = torch.full((2,), 0.1)
    base = model(x, t)
    # each change is of the order of the output itself, not rounding noise
    assert (model(x, torch.full((2,), 0.9)) - base).abs().max() > 1e-2 * base.abs().max()
    assert (model(x.flip(-1), t) - base).abs().max() > 1e-2 * base.abs().max()


def test_config_rebuilds_identical_model(generator):
    model = UNet(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=2, time_dim=32,
                 groups=4, dropout=0.1, prediction="score", attention=True)
    _perturb_last_layer(model, generator)
    config = json.loads(json.dumps(model.config))  # plain JSON types survive the round trip
    assert config == model.config
    twin = UNet(**config)
    twin.load_state_dict(model.state_dict(), strict=True)
    assert twin.prediction == "score"
    model.eval(), twin.eval()  # dropout off
    x = torch.randn(2, 1, 8, 8, generator=generator)
    t = torch.rand(2, generator=generator)
    assert torch.equal(model(x, t), twin(x, t))


def test_rejects_bad_sizes_and_inputs():
    model = UNet(base_channels=8, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match=r"10x12 is not divisible by 4"):
        model(torch.zeros(1, 1, 10, 12), torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, H, W\)"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, H, W\)"):
        model(torch.zeros(1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"t must be 0-d or of shape \(2,\)"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
        (dict(base_channels=2.5), "base_channels must be a positive integer"),
        (dict(num_res_blocks=True), "num_res_blocks must be a positive integer"),
        (dict(channel_mults=()), "channel_mults must be a non-empty sequence"),
        (dict(channel_mults=(1, 0)), "each of channel_mults must be a positive integer, got 0"),
        (dict(base_channels=20, groups=8), r"base_channels \(20\) must be divisible by groups \(8\)"),
        (dict(time_dim=7), "time_dim must be even"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(prediction="noise"), "prediction must be one of 'epsilon', 'score', 'x0', got 'noise'"),
        (dict(attention="yes"), "attention must be True or False"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def test_every_parameter_gets_a_gradient_in_float64(generator):
    model = UNet(base_channels=16, channel_mults=(1, 2, 2)).double()
    _perturb_last_layer(model, generator)
    x = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    x_before = x.clone()
    out = model(x, torch.rand(3, generator=generator, dtype=torch.float64))
    assert out.dtype == torch.float64
    out.sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    assert torch.equal(x, x_before)  # input not mutated


def test_overfits_a_fixed_batch_of_digits(generator, seed):
    """Adam on 16 digits with fixed (t, noise): the ε-MSE falls below a tenth of its start.

    The start is mean(ε²) ≈ 1 (the zero-initialised model predicts 0). This is a trainability check
    (gradients reach the weights and the optimiser can use them); it ends near 1e-4 after 60 steps
    for seeds 0-2, so the factor 10 is a wide margin. 60 steps, not 200, keeps it under a second."""
    from implicit_diffusion.data import load_digits_images
    from implicit_diffusion.samplers.schedules import VPSchedule

    with torch.random.fork_rng():  # nn.Module init draws from the global RNG; keep it contained
        torch.manual_seed(seed)
        model = UNet(base_channels=16)
    x0 = load_digits_images()[:16]
    t = torch.rand(16, generator=generator) * 0.98 + 0.02
    noise = torch.randn(x0.shape, generator=generator)
    xt = VPSchedule("linear").marginal(x0, t, noise).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        return (model(xt, t) - noise).pow(2).mean()

    initial = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    final = loss_fn().item()
    assert final < 0.1 * initial, (initial, final)
