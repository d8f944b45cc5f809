"""LoRA adapters (models/lora.py): a no-op at the start, only the adapters train, merging and saving
reproduce the adapted network, and the diffusion finetuning runs on an adapted U-Net unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from implicit_diffusion.algorithms.diffusion_nested import DiffusionNestedLoop
from implicit_diffusion.models.diffusion_model import DiffusionModel
from implicit_diffusion.models.lora import (
    add_lora,
    has_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from implicit_diffusion.models.unet import UNet
from implicit_diffusion.objectives.girsanov import GirsanovKL
from implicit_diffusion.objectives.image_rewards import brightness
from implicit_diffusion.samplers.diffusion import ddpm_step
from implicit_diffusion.samplers.schedules import VPSchedule

ORIGINAL = ".parametrizations.weight.original"


def project_unet(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # nn layers initialise from the global RNG: seed it without leaking
        torch.manual_seed(seed)
        net = UNet(1, 8, (1, 2), groups=4, time_dim=16)
    # the output conv is zero-initialised (the output would be 0 whatever the rest): give it weights
    with torch.no_grad():
        w = net.conv_out.weight
        w.copy_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 100)))
    return net


def diffusers_unet(seed: int = 0) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    from implicit_diffusion.models.diffusers_adapter import DiffusersUNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return DiffusersUNet(unet, 1000, "epsilon")


NETS = pytest.mark.parametrize("build", [project_unet, diffusers_unet], ids=["project-unet", "diffusers"])


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), 0.05 + 0.9 * torch.rand(4, generator=g)


def base_view(state: dict) -> dict:
    """The base tensors of an adapted network's state, under their un-adapted names."""
    return {k.replace(ORIGINAL, ".weight"): v for k, v in state.items() if ".lora_" not in k}


def trained(build, steps: int = 3):
    """(base network before adaptation, adapted network after ``steps`` Adam steps on an MSE loss, x, t)."""
    net = build()
    before = copy.deepcopy(net)
    params = add_lora(net, 4, generator=torch.Generator().manual_seed(0))
    x, t = inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        ((net(x, t) - target) ** 2).mean().backward()
        optimizer.step()
    return before, net, x, t


@NETS
def test_zero_initialised_b_leaves_the_output_unchanged(build):
    net = build()
    x, t = inputs()
    with torch.no_grad():
        out = net(x, t)
        params = add_lora(net, 4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(net(x, t), out)
        # the adapters are live: A is random, and a nonzero B moves the output (negative control)
        assert all(float(m.abs().max()) > 0 for m in params[0::2])
        assert all(not m.any() for m in params[1::2])
        params[1].add_(0.1)
        assert not torch.allclose(net(x, t), out)


@NETS
def test_only_the_adapters_train(build):
    before, net, x, t = trained(build)
    base = base_view(net.state_dict())
    old = before.state_dict()
    assert base.keys() == old.keys()
    assert all(torch.equal(base[k], old[k]) for k in old), [k for k in old if not torch.equal(base[k], old[k])]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(net)}
    assert any(p.grad is not None for p in lora_parameters(net))
    with torch.no_grad():
        assert not torch.allclose(net(x, t), before(x, t))


@NETS
def test_merge_gives_the_adapted_output_and_the_original_keys(build):
    before, net, x, t = trained(build)
    with torch.no_grad():
        adapted = net(x, t)
        assert merge_lora(net) is net
        merged = net(x, t)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-6)
    assert not has_lora(net)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert net.state_dict().keys() == before.state_dict().keys()  # (a merged weight now comes after its bias)
    assert all(p.requires_grad for p in net.parameters())  # restored as they were before add_lora
    fresh = build(seed=7)  # another initialisation of the same architecture
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x, t), merged)
        assert not torch.allclose(before(x, t), merged)  # the merge folded the adapters in


def test_merging_a_deep_copy_leaves_the_original_adapted():
    """deepcopy shares the parametrized layer classes, whose property removal would break the other copy."""
    _, net, x, t = trained(project_unet, steps=1)
    with torch.no_grad():
        out = net(x, t)
        merged = merge_lora(copy.deepcopy(net))
        assert has_lora(net) and not has_lora(merged)
        assert torch.equal(net(x, t), out)
        torch.testing.assert_close(merged(x, t), out, rtol=1e-5, atol=1e-6)
        merge_lora(net)  # and the other way round: the original merges too
        torch.testing.assert_close(net(x, t), out, rtol=1e-5, atol=1e-6)
    assert type(net.conv_in) is nn.Conv2d and type(merged.conv_in) is nn.Conv2d


@NETS
def test_adapters_saved_with_safetensors_reproduce_the_outputs(build, tmp_path):
    from safetensors.torch import load_file, save_file

    _, net, x, t = trained(build)
    state = lora_state_dict(net)
    assert state and all(".lora_A" in k or ".lora_B" in k for k in state)
    assert len(state) == len(lora_parameters(net))
    save_file(state, tmp_path / "lora.safetensors")
    copy_ = build()
    add_lora(copy_, 4, generator=torch.Generator().manual_seed(99))  # other A's: they must be loaded
    with torch.no_grad():
        assert not torch.allclose(copy_(x, t), net(x, t))
        load_lora_state_dict(copy_, load_file(tmp_path / "lora.safetensors"))
        assert torch.equal(copy_(x, t), net(x, t))
    other_rank = build()
    add_lora(other_rank, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="has shape .*different rank"):
        load_lora_state_dict(other_rank, state)
    with pytest.raises(ValueError, match=r"missing .*\(1\), unexpected \[\] \(0\)"):
        load_lora_state_dict(copy_, dict(list(state.items())[1:]))


def test_parameter_counts_and_the_update_formula():
    """r·(in + out) per Linear; Conv2d A (r, in·kh·kw/groups), B (out, r); a layer narrower than r gets
    rank min(out, fan_in); and W' = W + (α/r)·B A exactly (float64)."""
    net = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3), nn.Conv2d(4, 8, 3, groups=2), nn.Linear(5, 1)).double()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    params = add_lora(net, 2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    shapes = [tuple(p.shape) for p in params]
    assert shapes == [(2, 10), (6, 2), (2, 6), (3, 2), (2, 18), (8, 2), (1, 5), (1, 1)]
    assert sum(p.numel() for p in params[:4]) == 2 * (10 + 6) + 2 * (6 + 3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params[1::2]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    for i, layer in enumerate(net):
        a, b = params[2 * i], params[2 * i + 1]
        expected = base[f"{i}.weight"] + 1.5 * (b @ a).reshape(layer.weight.shape)
        torch.testing.assert_close(layer.weight, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(3, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(net[0](x), x @ net[0].weight.T + base["0.bias"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "2", None])
def test_a_bad_rank_is_a_value_error_naming_it(rank):
    net = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=f"rank must be an integer >= 1, got {rank!r}"):
        add_lora(net, rank, generator=torch.Generator())
    assert not has_lora(net) and net.weight.requires_grad  # nothing was changed


def test_other_misuse_is_a_clear_error():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"no layer to adapt in Sequential: .*Linear or Conv2d.*found: GroupNorm, "
                                         r"Sequential, SiLU"):
        add_lora(nn.Sequential(nn.SiLU(), nn.GroupNorm(1, 2)), 2, generator=g)
    for alpha in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            add_lora(nn.Linear(4, 4), 2, alpha=alpha, generator=g)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        add_lora(nn.Linear(4, 4), 2, generator=0)
    net = nn.Linear(4, 4)
    add_lora(net, 2, generator=g)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(net, 2, generator=g)
    with pytest.raises(ValueError, match="has no LoRA adapters to merge"):
        merge_lora(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already parametrized"):
        add_lora(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), 2, generator=g)


def test_requires_grad_flags_are_restored_by_merge():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)
    add_lora(net, 2, generator=torch.Generator())
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    merge_lora(net)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == {
        "0.weight": True, "0.bias": False, "1.weight": True, "1.bias": True}


def test_diffusion_finetuning_trains_only_the_adapters_and_checkpoints():
    """DiffusionNestedLoop with a GirsanovKL running cost on a DiffusionModel around an adapted U-Net:
    2 updates move only A and B; the path KL is 0 at the start (B = 0) and positive after; a deep copy is
    independent; state() / load_state() continue bit for bit. θ₀ must be taken after add_lora: a
    snapshot of the un-adapted names cannot be swapped into the adapted layers (PyTorch refuses)."""
    schedule = VPSchedule("linear", num_steps=3)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def build(lora_seed: int):
        net = project_unet()
        kl_before = GirsanovKL(DiffusionModel(net, "epsilon", schedule, (1, 8, 8)), step=ddpm_step)  # wrong order
        params = add_lora(net, 2, generator=torch.Generator().manual_seed(lora_seed))
        model = DiffusionModel(net, "epsilon", schedule, (1, 8, 8))
        algo = DiffusionNestedLoop(model, ddpm_step, torch.optim.Adam(params, lr=1e-2), init_fn=model.init_fn(4),
                                   reward_fn=brightness, reward_weight=10.0,
                                   running_cost=GirsanovKL(model, step=ddpm_step))
        return net, algo, kl_before

    def path_kl(kl, m=1):
        with torch.no_grad():
            return float(kl(x, m))

    net, algo, kl_before = build(0)
    assert path_kl(algo.running_cost) == 0.0
    base = {k: v.clone() for k, v in base_view(net.state_dict()).items()}
    adapters = {k: v.clone() for k, v in lora_state_dict(net).items()}
    algo.run(2, generator=torch.Generator().manual_seed(0))
    after = base_view(net.state_dict())
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert any(not torch.equal(v, adapters[k]) for k, v in lora_state_dict(net).items())
    kl = path_kl(algo.running_cost)
    assert kl > 0
    with pytest.raises(RuntimeError, match="right_inverse"):
        path_kl(kl_before)

    twin = copy.deepcopy(net)
    assert has_lora(twin) and {id(p) for p in lora_parameters(twin)}.isdisjoint(map(id, lora_parameters(net)))
    with torch.no_grad():
        t = torch.full((6,), 0.5)
        assert torch.equal(twin(x, t), net(x, t))
        lora_parameters(twin)[1].add_(1.0)
        assert not torch.allclose(twin(x, t), net(x, t))

    tensors, meta = algo.state()
    resumed_net, resumed, _ = build(99)  # other A's: the checkpoint must bring them
    resumed.load_state(tensors, meta)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in resumed_net.state_dict().items())
    algo.step(2, generator=torch.Generator().manual_seed(1))
    resumed.step(2, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in resumed_net.state_dict().items())
