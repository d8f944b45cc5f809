"""The public diffusion API: one model object that carries its prediction type and schedule, a path KL
that cannot silently take ε for a score, explicit signatures, exported rewards and the Callback type."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

import implicit_diffusion
from implicit_diffusion import (
    Callback,
    DiffusionModel,
    DiffusionNestedLoop,
    DiffusionQueue,
    GirsanovKL,
    ScoreMLP,
    VPSchedule,
    brightness,
    ddpm_step,
    load_diffusion_model,
    redness,
    sample,
)
from implicit_diffusion.models.io import save_score_model
from implicit_diffusion.samplers.schedules import to_score


def eps_model(seed: int = 0):
    """A tiny ε-prediction network, its schedule and the DiffusionModel holding both (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ScoreMLP(2, hidden=8, depth=1, prediction="epsilon").double()
    schedule = VPSchedule("linear", num_steps=4)
    return net, schedule, DiffusionModel(net, "epsilon", schedule, (2,))


def perturb(net, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_every_public_class_shows_its_real_parameters():
    bad = []
    for name in implicit_diffusion.__all__:
        obj = getattr(implicit_diffusion, name)
        if not inspect.isclass(obj) or getattr(obj, "_is_protocol", False):
            continue  # a Protocol is a type to implement, not to construct
        params = inspect.signature(obj).parameters.values()
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            bad.append(f"{name}{inspect.signature(obj)}")
    assert not bad, f"public constructors hiding their parameters: {bad}"
    queue = inspect.signature(DiffusionQueue).parameters
    assert {"model", "step", "schedule", "optimizer", "init_fn", "reward_fn", "running_cost", "adjoint",
            "max_batch", "fill", "tail"} <= set(queue)
    assert "gradient" in inspect.signature(DiffusionNestedLoop).parameters


def test_girsanov_on_an_epsilon_model_is_the_hand_converted_score_version():
    net, schedule, model = eps_model()
    by_model = GirsanovKL(model, weight=0.7)
    by_name = GirsanovKL(net, schedule, 0.7, prediction="epsilon")
    by_hand = GirsanovKL(net, schedule, 0.7, to_score=lambda eps, x, t: -eps / schedule.sigma(t)[:, None])
    as_score = GirsanovKL(net, schedule, 0.7, prediction="score")  # the former silent default
    perturb(net)  # θ ≠ θ₀
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for m in range(schedule.num_steps):
        ref = by_hand(x, m)
        assert ref > 0
        assert by_model(x, m).item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-12)
        assert by_name(x, m).item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-12)
    # the former silent mismatch was a real error: ε/σ(t) ≠ ε once σ(t) < 1 (the last steps)
    last = schedule.num_steps - 1
    assert as_score(x, last).item() < 0.5 * by_hand(x, last).item()
    idx = torch.arange(16) % schedule.num_steps
    torch.testing.assert_close(by_model.per_sample(x, idx), by_hand.per_sample(x, idx), rtol=1e-6, atol=1e-12)
    # the gradients in θ agree too (what finetuning uses)
    grads = []
    for kl in (by_model, by_hand):
        net.zero_grad()
        kl(x, 1).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_girsanov_refuses_to_take_an_epsilon_output_for_a_score():
    net, schedule, model = eps_model()
    with pytest.raises(ValueError, match="prediction='epsilon'.*to_score="):
        GirsanovKL(net, schedule, 0.5)
    with pytest.raises(ValueError, match="contradicts"):
        GirsanovKL(model, prediction="score")
    with pytest.raises(ValueError, match="not both"):
        GirsanovKL(net, schedule, prediction="epsilon", to_score=lambda out, x, t: out)
    with pytest.raises(ValueError, match="schedule"):
        GirsanovKL(net, schedule.times, prediction="epsilon")  # σ(t) needs the schedule
    with pytest.raises(TypeError, match="times="):
        GirsanovKL(net)
    GirsanovKL(ScoreMLP(2, hidden=8, depth=1, prediction="score"), schedule)  # a score model needs nothing
    # a network that does not say what it outputs (a diffusers UNet2DModel, a plain nn.Module) is not
    # guessed to be a score model: the ε output read as a score was the silent wrong KL
    with pytest.raises(ValueError, match="say what the network .* outputs"):
        GirsanovKL(torch.nn.Linear(2, 2), schedule)
    assert GirsanovKL(torch.nn.Linear(2, 2), schedule, prediction="score").to_score is None


def test_girsanov_step_ddpm_uses_the_ddpm_weights():
    from implicit_diffusion.objectives.girsanov import score_kl_weights

    _, schedule, model = eps_model()
    assert GirsanovKL(model, step=ddpm_step).step_weights == score_kl_weights(ddpm_step, schedule)
    assert GirsanovKL(model, step=ddpm_step).step_weights != GirsanovKL(model).step_weights


def _queue(model_arg, *args, seed=0, **kwargs):
    net = model_arg.net if isinstance(model_arg, DiffusionModel) else model_arg
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return DiffusionQueue(model_arg, ddpm_step, *args[:1], opt, init_fn=lambda g: x0.clone(),
                          reward_fn=lambda x: -((x - 1.0) ** 2).sum(-1), max_grad_norm=1.0, **kwargs)


def test_queue_reads_the_prediction_and_schedule_from_the_model():
    results = []
    for use_model in (True, False):
        net, schedule, model = eps_model()
        kl = GirsanovKL(model, weight=0.5) if use_model else GirsanovKL(net, schedule, 0.5, prediction="epsilon")
        queue = (_queue(model, running_cost=kl) if use_model else
                 _queue(net, schedule, running_cost=kl, prediction="epsilon"))
        assert queue.prediction == "epsilon" and queue.schedule is schedule and queue.model is net
        stats = []
        queue.run(7, generator=torch.Generator().manual_seed(0), callbacks=[lambda k, x, s: stats.append(s)])
        results.append(([p.detach().clone() for p in net.parameters()], stats))
    (theta_a, stats_a), (theta_b, stats_b) = results
    for a, b in zip(theta_a, theta_b):
        assert torch.equal(a, b)
    assert [float(s["reward"]) for s in stats_a if s] == [float(s["reward"]) for s in stats_b if s]
    # and it is not the score-as-ε run: reading the prediction matters
    net, schedule, _ = eps_model()
    wrong = _queue(net, schedule, prediction="score", running_cost=GirsanovKL(net, schedule, 0.5, prediction="score"))
    wrong.run(7, generator=torch.Generator().manual_seed(0))
    assert not all(torch.equal(a, p) for a, p in zip(theta_a, net.parameters()))


def test_a_contradicting_prediction_is_an_error():
    _, _, model = eps_model()
    with pytest.raises(ValueError, match="contradicts"):
        _queue(model, prediction="score")
    with pytest.raises(ValueError, match="contradicts"):
        sample(ddpm_step, model, torch.zeros(2, 2, dtype=torch.float64), prediction="score",
               generator=torch.Generator())
    net, _, _ = eps_model()
    with pytest.raises(TypeError, match="schedule"):
        _queue(net)


def test_sample_and_score_of_a_model_convert_its_prediction():
    net, schedule, model = eps_model()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(model.score(x, t), -net(x, t) / schedule.sigma(t)[:, None], rtol=1e-12, atol=0)
    a = sample(ddpm_step, model, x, generator=torch.Generator().manual_seed(4))
    b = sample(ddpm_step, net, x, schedule=schedule, prediction="epsilon", generator=torch.Generator().manual_seed(4))
    c = sample(ddpm_step, net, x, schedule=schedule, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.with_sampling_steps(7).schedule.num_steps == 7 and model.schedule.num_steps == 4


def test_load_diffusion_model_from_a_name_a_file_and_a_diffusers_directory(tmp_path):
    digits = load_diffusion_model("digits", num_sampling_steps=6)
    assert (digits.prediction, digits.data_shape, digits.schedule.num_steps) == ("epsilon", (1, 8, 8), 6)
    assert not digits.net.training
    x = digits.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and brightness(x).shape == (3,)

    net, schedule, _ = eps_model()
    save_score_model(tmp_path / "m.safetensors", net, schedule, extra={"data_shape": [2]})
    loaded = load_diffusion_model(tmp_path / "m.safetensors")
    assert (loaded.prediction, loaded.data_shape, loaded.schedule) == ("epsilon", (2,), schedule)
    xs, ts = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(loaded.score(xs.float(), ts.float()).double(),
                               to_score(net(xs, ts), xs, ts, schedule, "epsilon"), rtol=1e-4, atol=1e-5)

    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "d")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "d")
    d = load_diffusion_model(tmp_path / "d", num_sampling_steps=5)
    assert (d.prediction, d.data_shape, d.schedule.num_steps, d.diffusers is not None) == ("epsilon", (1, 8, 8), 5,
                                                                                           True)
    with pytest.raises(implicit_diffusion.errors.DataError, match="no such model file or diffusers directory"):
        load_diffusion_model(tmp_path / "missing")
    with pytest.raises(implicit_diffusion.errors.DataError, match="no diffusion model 'digitz'.*digits"):
        load_diffusion_model("digitz")


def test_a_saved_diffusion_model_loads_back_as_the_same_model(tmp_path):
    """DiffusionModel.save writes what load_diffusion_model reads: θ, prediction, schedule and data shape."""
    net, schedule, model = eps_model()
    perturb(net)
    model.save(tmp_path / "m.safetensors", extra={"note": "finetuned"})
    back = load_diffusion_model(tmp_path / "m.safetensors")
    assert (back.prediction, back.data_shape, back.schedule) == ("epsilon", (2,), schedule)
    for (k, p), (k2, q) in zip(net.state_dict().items(), back.net.state_dict().items()):
        assert k == k2 and torch.equal(p.to(q.dtype), q)  # (model files are read as float32)

    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "d")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "d")
    d = load_diffusion_model(tmp_path / "d", num_sampling_steps=5)
    perturb(d.net)
    with pytest.raises(ValueError, match="extra= is recorded in model files only"):
        d.save(tmp_path / "out", extra={"note": 1})
    d.save(tmp_path / "out")
    again = load_diffusion_model(tmp_path / "out")
    assert again.prediction == "epsilon" and again.data_shape == (1, 8, 8)
    for (k, p), (k2, q) in zip(d.net.state_dict().items(), again.net.state_dict().items()):
        assert k == k2 and torch.equal(p, q)


def test_rewards_and_loaders_are_exported():
    from implicit_diffusion import IMAGE_REWARDS, load_diffusers
    from implicit_diffusion.models.diffusers_adapter import load_diffusers as inner

    assert load_diffusers is inner and IMAGE_REWARDS == {"brightness": brightness, "red": redness}
    img = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(2, 3, 2, 2)
    assert brightness(img).tolist() == pytest.approx([-1 / 3, -1 / 3]) and redness(img).tolist() == [2.0, 2.0]


def test_callback_protocol_documents_the_stats_each_algorithm_reports():
    assert issubclass(Callback, typing.Protocol) if hasattr(typing, "Protocol") else True
    params = list(inspect.signature(Callback.__call__).parameters)
    assert params == ["self", "k", "x", "stats"]
    doc = inspect.getdoc(Callback)
    documented = {"reward", "running_cost", "acceptance_rate", "update_skipped", "energy_gap", "energy_data",
                  "energy_particles", "outer_loss", "gamma_norm", "inner_grad_norm", "inner_steps", "hvps"}
    assert all(f"``{key}``" in doc for key in documented)
    # the keys the diffusion nested loop really reports are the documented ones
    net, schedule, model = eps_model()
    algo = DiffusionNestedLoop(model, ddpm_step, torch.optim.SGD(net.parameters(), lr=0.01),
                               init_fn=model.init_fn(3), reward_fn=lambda x: -(x**2).sum(-1),
                               running_cost=GirsanovKL(model, weight=0.1))
    seen: list[dict] = []
    cb: Callback = lambda k, x, stats: seen.append(stats)  # noqa: E731
    algo.run(2, generator=torch.Generator().manual_seed(0), callbacks=[cb])
    assert len(seen) == 2 and all(set(s) <= documented and "reward" in s for s in seen)


@pytest.mark.parametrize("through", ["adjoint", "autograd"])
def test_gradients_through_the_sampler_read_the_diffusion_model(through):
    """adjoint_through_sampler / autograd_through_sampler on a DiffusionModel: the same gradient as the bare
    ε-network with its schedule and prediction='epsilon' spelled out; a contradicting prediction is an error."""
    from implicit_diffusion.objectives.adjoint import adjoint_through_sampler, autograd_through_sampler

    fn = adjoint_through_sampler if through == "adjoint" else autograd_through_sampler
    net, schedule, model = eps_model()
    perturb(net)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    noises = torch.randn(schedule.num_steps, 5, 2, generator=g, dtype=torch.float64)
    reward = lambda x: -(x - 1.0).pow(2).sum(1)  # noqa: E731
    by_model = fn(ddpm_step, model, x0, noises, reward, running_cost=GirsanovKL(model, step=ddpm_step))
    g_model = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    by_hand = fn(ddpm_step, net, x0, noises, reward, schedule=schedule, prediction="epsilon",
                 running_cost=GirsanovKL(net, schedule, prediction="epsilon", step=ddpm_step))
    for a, b in zip(g_model, [p.grad for p in net.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(by_model.loss, by_hand.loss, rtol=1e-12, atol=0)
    # a wrong reading (the ε output taken as a score) is a different gradient: the test can fail
    for p in net.parameters():
        p.grad = None
    fn(ddpm_step, net, x0, noises, reward, schedule=schedule, prediction="score")
    assert not all(torch.allclose(a, p.grad) for a, p in zip(g_model, net.parameters(), strict=True))
    with pytest.raises(ValueError, match="contradicts"):
        fn(ddpm_step, model, x0, noises, reward, prediction="score")
    with pytest.raises(TypeError, match="schedule= is required"):
        fn(ddpm_step, net, x0, noises, reward, prediction="epsilon")


def test_a_lora_adapted_model_is_saved_merged(tmp_path):
    """DiffusionModel.save folds LoRA adapters into the weights: the file has the plain names and computes
    what the adapted network does; the model in memory keeps its adapters."""
    from implicit_diffusion.models.lora import add_lora, has_lora

    net, _, model = eps_model()
    params = add_lora(net, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    model.save(tmp_path / "m.safetensors")
    back = load_diffusion_model(tmp_path / "m.safetensors")
    assert has_lora(net) and not has_lora(back.net)
    xs, ts = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(back.net(xs.float(), ts.float()).double(), net(xs, ts).detach(), rtol=1e-5, atol=1e-6)
