"""Reward finetuning of image diffusion models: the queue moves the sample mean the way the reward
asks, the experiment writes its outputs, and bad settings fail with one line."""

import json

import pytest
import torch

from implicit_diffusion.algorithms import DiffusionQueue
from implicit_diffusion.cli import main
from implicit_diffusion.models import UNet
from implicit_diffusion.objectives import GirsanovKL, brightness
from implicit_diffusion.objectives.evaluation import Evaluation, rise_in_se
from implicit_diffusion.samplers import VPSchedule, ddpm_step, euler_maruyama_step, sample, to_score

SHAPE = (1, 8, 8)


def _mean_brightness(model, sched, n, seed, step=euler_maruyama_step):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = sample(step, model, torch.randn(n, *SHAPE, generator=g), schedule=sched, generator=g,
                   prediction="epsilon")
    r = brightness(x)
    return r.mean().item(), (r.std() / n**0.5).item()


@pytest.mark.parametrize("step", [euler_maruyama_step, ddpm_step], ids=["euler-maruyama", "ddpm"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_queue_finetuning_moves_brightness_the_way_the_reward_asks(sign, step):
    """A tiny U-Net (zero-initialised output: samples start as N(0, I)-like images of mean ≈ 0),
    reward ±brightness, 40 queue iterations with Adam. The sample mean must move by > 5 SE in
    the reward's direction: a sign error in the adjoint, the reward weight or the conversion
    ε → score moves it the other way (the −brightness run is the negative control)."""
    torch.manual_seed(0)  # UNet's default initialisation only; the algorithm uses its generator
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
    sched = VPSchedule("linear", num_steps=5)
    before, se0 = _mean_brightness(model, sched, 400, seed=1, step=step)
    algo = DiffusionQueue(model, step, sched, torch.optim.Adam(model.parameters(), lr=3e-3),
                          init_fn=lambda g: torch.randn(8, *SHAPE, generator=g),
                          reward_fn=lambda x: sign * brightness(x), reward_weight=10.0, prediction="epsilon",
                          adjoint="pipelined")
    algo.run(40, generator=torch.Generator().manual_seed(0))
    after, se1 = _mean_brightness(model, sched, 400, seed=2, step=step)
    assert sign * (after - before) > 5 * (se0**2 + se1**2) ** 0.5


def test_path_kl_grows_from_zero_as_the_model_moves():
    """GirsanovKL on the finetuned U-Net: exactly 0 at θ = θ₀, positive after a perturbation."""
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=8)
    sched = VPSchedule("linear", num_steps=4)
    kl = GirsanovKL(model, sched, to_score=lambda out, x, t: to_score(out, x, t, sched, "epsilon"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        states = sample(euler_maruyama_step, model, torch.randn(16, *SHAPE, generator=g), schedule=sched,
                        generator=g, prediction="epsilon", return_trajectory=True)
        assert kl.path_kl(states).item() == 0.0
        for p in model.parameters():
            p.add_(0.05)
    assert kl.path_kl(states).item() > 0


def test_rise_in_standard_errors():
    assert rise_in_se(Evaluation(0.0, 0.3, 0, 0), Evaluation(1.0, 0.4, 0, 0)) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_digits_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    args = ["pretrain", "digits", "--set", "num_steps=5", "--set", "base_channels=8", "--set", "num_samples=4",
            "--set", "sampling_steps=3", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return out / "model.safetensors"


def test_pretrain_writes_a_loadable_model_and_figures(tiny_digits_model):
    from implicit_diffusion.models.io import load_score_model

    run = tiny_digits_model.parent
    assert {"config.toml", "metrics.jsonl", "model.safetensors", "summary.json", "loss.png", "samples.png"} <= {
        p.name for p in run.iterdir()}
    loaded = load_score_model(tiny_digits_model)
    assert loaded.extra["data_shape"] == [1, 8, 8]
    assert loaded.extra["reproduce"].startswith("implicit-diffusion pretrain digits --set num_steps=5")
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(5))


TINY = ["--set", "num_steps=4", "--set", "num_sampling_steps=3", "--set", "batch_size=2", "--set", "eval_every=2",
        "--set", "eval_samples=6", "--set", "grid_images=4", "--no-progress"]


def test_finetune_run_and_sweep_write_their_outputs(tiny_digits_model, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["run", "diffusion-finetune", "--set", f"model='{tiny_digits_model}'", *TINY, "--out", str(out)]) == 0
    assert {"summary.json", "finetuned.safetensors", "samples.png", "curves.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 1 and summary["runs"][0]["reward_weight"] == 30.0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_step" in x]
    assert [e["eval_step"] for e in evals] == [0, 2, 4]
    assert "rise" in capsys.readouterr().out
    out = tmp_path / "sweep"
    args = ["run", "diffusion-finetune", "--set", f"model='{tiny_digits_model}'", *TINY, "--sweep",
            "--set", "sweep_ratios=[10, 1000]", "--out", str(out)]
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"tradeoff.png", "finetuned-0.safetensors", "finetuned-1.safetensors", "samples-1.png"} <= names
    assert [r["reward_weight"] for r in json.loads((out / "summary.json").read_text())["runs"]] == [10.0, 1000.0]


def test_finetune_with_ddpm_steps_records_its_sampler_and_a_positive_path_kl(tiny_digits_model, tmp_path, capsys):
    out = tmp_path / "ddpm"
    args = ["run", "diffusion-finetune", "--set", f"model='{tiny_digits_model}'", *TINY, "--set", "sampler=ddpm",
            "--set", "num_steps=8",  # the first θ update is at iteration 2(M − 1) = 4
            "--set", "eval_every=4", "--set", "lr=1e-2", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["sampler"], summary["num_sampling_steps"], summary["time_power"]) == ("ddpm", 3, 2.0)
    assert summary["runs"][0]["kl"] > 0
    assert "ddpm, M = 3 steps, grid power ρ = 2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["pretrain", "mnist"], "pass --data PATH"),
    (["pretrain", "images", "--data", "/no/such/place"], "no such file"),
    (["pretrain", "digits", "--data", "x.npz"], "--data is for"),
    (["run", "diffusion-finetune", "--reward", "blue"], "unknown 'blue'; allowed: brightness, red"),
    (["run", "diffusion-finetune", "--set", "model='/no/model.safetensors'"], "no such model file"),
    (["run", "langevin-mixture", "--sweep"], "unknown config key 'sweep'"),
    (["run", "diffusion-finetune", "--sweep", "--set", "kl_weight=0"], "needs kl_weight > 0"),
    (["run", "diffusion-finetune", "--set", "max_batch=-1"], "'max_batch' must be None (the default) or > 0, got -1"),
    (["run", "diffusion-finetune", "--set", "max_batch=0"], "'max_batch' must be None (the default) or > 0, got 0"),
    (["run", "diffusion-finetune", "--set", "model="], "'model' must name a model or a path, or be None"),
    (["run", "diffusion-finetune", "--set", "max_batch=8", "--set", "algorithm=nested-adjoint"],
     "'max_batch' chunks the queue's batched calls"),
])
def test_bad_settings_are_one_line_errors(args, message, capsys, tmp_path):
    assert main([*args, "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_red_reward_refuses_a_grey_model(tiny_digits_model, tmp_path, capsys):
    args = ["run", "diffusion-finetune", "--reward", "red", "--set", f"model='{tiny_digits_model}'", *TINY,
            "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "needs a colour" in capsys.readouterr().err


def test_pretraining_is_reproducible_from_its_seed():
    """Same config → bit-identical weights (initialisation included); another seed differs;
    the caller's global RNG state is left untouched."""
    from implicit_diffusion.experiments import pretrain

    def weights(seed):
        cfg = pretrain.Config(dataset="moons", num_points=200, num_steps=3, hidden=8, num_samples=4,
                              sampling_steps=2, seed=seed, progress=False)
        return pretrain.run(cfg).model.state_dict()

    state = torch.random.get_rng_state()
    a, b, c = weights(0), weights(0), weights(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_per_step_rewards_are_all_written_once_in_order(tiny_digits_model):
    from implicit_diffusion.experiments import diffusion_finetune as ft

    records = []
    cfg = ft.Config(model=str(tiny_digits_model), num_steps=205, num_sampling_steps=2, batch_size=1,
                    eval_every=205, eval_samples=2, grid_images=1, progress=False)
    ft.run(cfg, metrics_sink=lambda r: records.extend(r if isinstance(r, list) else [r]))
    steps = [r["step"] for r in records if "step" in r]
    assert steps == list(range(205))
    assert [r["reward"] is None for r in records if "step" in r][:2] == [True, False]  # M = 2: first exit at k = 1
