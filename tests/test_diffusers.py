"""diffusers models: the schedule mapping (exact on the scheduler's grid), the DDPM/DDIM steps
against diffusers' own ``step``, the adapter, finetuning a tiny local model end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from implicit_diffusion.cli import main  # noqa: E402
from implicit_diffusion.errors import DataError  # noqa: E402
from implicit_diffusion.models.diffusers_adapter import DiffusersUNet, load_diffusers, vp_schedule_for  # noqa: E402
from implicit_diffusion.samplers.diffusion import ddim_step, ddpm_step  # noqa: E402
from implicit_diffusion.samplers.schedules import VPSchedule  # noqa: E402

SCHEDULERS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
MAPPING_TOL = 1e-6  # relative, in ᾱ and in σ, on every grid point


def tiny_unet(seed: int = 0):
    with torch.random.fork_rng():  # diffusers initialises from the global RNG: seed it without leaking
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


@pytest.fixture
def pipeline_dir(tmp_path):
    path = tmp_path / "tiny-ddpm"
    pipeline = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    pipeline.save_pretrained(path)
    return path


def mapping_error(schedule, scheduler) -> float:
    """max over the training grid t_i = (i + 1)/N of the relative errors of ᾱ(t_i) and σ(t_i) against the
    scheduler's own ``alphas_cumprod`` (float64 of its float32 values)."""
    n = len(scheduler.alphas_cumprod)
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    ab = scheduler.alphas_cumprod.double()
    sigma = (1 - ab).sqrt()
    return max(float(((schedule.alpha_bar(t) - ab) / ab).abs().max()),
               float(((schedule.sigma(t) - sigma) / sigma).abs().max()))


def continuous_mapping(config: dict) -> VPSchedule:
    """The mapping used before (negative control): the continuous VP SDE that the scheduler's β
    discretises, β(t) = N·β_discrete at t = (i + 1)/N (Song et al. 2021, App. B)."""
    n = config["num_train_timesteps"]
    if config["beta_schedule"] == "linear":
        return VPSchedule("linear", T=1.0, t_min=1 / n, beta_min=config["beta_start"] * n,
                          beta_max=config["beta_end"] * n)
    return VPSchedule("cosine", T=1.0, t_min=1 / n, beta_max=-n * math.log1p(-0.999))


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("n", [1000, 100])
@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_the_vp_schedule_is_the_schedulers_alphas_cumprod(kind, n, name):
    """ᾱ and σ of the mapped schedule at t_i = (i + 1)/N against the scheduler's ᾱ_i for every i, to a
    relative 1e-6 (measured: ~2e-16, rounding). Control: the continuous mapping used before fails
    the same check (measured: σ off by 4.8% (linear) / 2.6e-4 (cosine) at N = 1,000 and 41% /
    7.0e-6 at N = 100; ᾱ relatively by up to 10 in the cosine tail, where ᾱ ~ 1e-9)."""
    sched = SCHEDULERS[name](num_train_timesteps=n, beta_schedule=kind)
    ours = vp_schedule_for(sched)
    assert ours.kind == "discrete" and len(ours.alphas_cumprod) == n and (ours.T, ours.t_min) == (1.0, 0.0)
    assert mapping_error(ours, sched) < MAPPING_TOL
    assert mapping_error(vp_schedule_for(dict(sched.config)), sched) < MAPPING_TOL  # from the config alone
    assert mapping_error(continuous_mapping(dict(sched.config)), sched) > MAPPING_TOL


def test_any_beta_schedule_maps_exactly_and_a_zero_terminal_snr_is_refused():
    """The table is read from the scheduler, so scaled_linear, sigmoid and explicit trained_betas are
    exact too; rescale_betas_zero_snr's ᾱ_{N−1} = 0 (σ = 1, no noise-free data) is a DataError."""
    schedulers = [diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
                  diffusers.DDPMScheduler(beta_schedule="sigmoid"),
                  diffusers.DDIMScheduler(trained_betas=torch.linspace(1e-3, 0.05, 200).tolist())]
    for sched in schedulers:
        assert mapping_error(vp_schedule_for(sched), sched) < MAPPING_TOL
    with pytest.raises(DataError, match=r"cannot use this DDPMScheduler \(1000 training steps\): alphas_cumprod "
                                        r"must be .*; entry 999 is 0.0"):
        vp_schedule_for(diffusers.DDPMScheduler(rescale_betas_zero_snr=True))


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_sampling_times_are_the_timesteps_of_set_timesteps(name, spacing, offset):
    """For M = 1 … 1000 steps of N = 1000 (and a few M of N = 100), ``replace(schedule, num_steps=M)``
    visits the training indices that ``set_timesteps(M)`` picks, at t = (i + 1)/N, then ends at 0."""
    for n, steps in [(1000, [1, 2, 3, 7, 20, 30, 33, 64, 100, 999, 1000]), (100, [1, 6, 20, 50])]:
        if offset and n == 1000:
            steps = steps[:-1]  # leading + offset 1 with M = N would index past the table in diffusers too
        sched = SCHEDULERS[name](num_train_timesteps=n, timestep_spacing=spacing, steps_offset=offset)
        schedule = vp_schedule_for(sched)
        for M in steps:
            sched.set_timesteps(M)
            resampled = dataclasses.replace(schedule, num_steps=M)
            assert torch.equal(resampled.timesteps, sched.timesteps), (n, M)
            assert torch.equal(resampled.times, torch.cat([(sched.timesteps + 1).double() / n, torch.zeros(1,
                                                           dtype=torch.float64)]))


class TinyEps(torch.nn.Module):
    """A float64 test double of a UNet: ε̂(x, i) nonlinear in x and in the timestep index i."""

    def __init__(self, generator):
        super().__init__()
        self.register_buffer("w", 0.4 * torch.randn(4, 4, generator=generator, dtype=torch.float64))

    def forward(self, x, timestep):
        phase = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1) / 1000
        return SimpleNamespace(sample=torch.tanh(x @ self.w + torch.sin(3 * phase)))  # like UNet2DOutput


def float64_scheduler(name: str, prediction: str, **kwargs):
    """A diffusers scheduler whose ᾱ table (and final ᾱ = 1) is float64, so its ``step`` runs in
    float64 throughout (with the float32 table its coefficients carry float32 rounding, ~1e-7)."""
    sched = SCHEDULERS[name](num_train_timesteps=1000, clip_sample=False,
                             prediction_type={"epsilon": "epsilon", "x0": "sample"}[prediction], **kwargs)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if name == "ddpm":
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    else:
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_ddpm_and_ddim_steps_equal_the_schedulers_step(name, kind, prediction):
    """M = 20 of N = 1,000 steps (leading spacing): ``ddpm_step`` / ``ddim_step`` on the mapped schedule,
    with the model called through ``DiffusersUNet`` (index t·N − 1), equal ``DDPMScheduler.step`` /
    ``DDIMScheduler.step`` (η = 0) on the same x with the same noise (diffusers draws it with
    ``torch.randn`` from the generator passed; the same seed here), float64, to 1e-12 (measured
    ~6e-15) at every step, the last one (to ᾱ = 1, no noise) included. Controls: other noise, and a
    schedule one training index off (steps_offset = 1), both miss by > 1e-6."""
    g = torch.Generator().manual_seed(0)
    unet = TinyEps(g)
    model = DiffusersUNet(unet, 1000, prediction)
    sched = float64_scheduler(name, prediction, beta_schedule=kind)
    M = 20
    sched.set_timesteps(M)
    schedule = vp_schedule_for(sched, M)
    shifted = dataclasses.replace(schedule, steps_offset=1)
    step = ddpm_step if name == "ddpm" else ddim_step
    for m, i in enumerate(sched.timesteps.tolist()):
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        out = unet(x, torch.full((3,), float(i), dtype=torch.float64)).sample
        kw = {"generator": torch.Generator().manual_seed(100 + m)} if name == "ddpm" else {"eta": 0.0}
        theirs = sched.step(out, i, x, **kw).prev_sample
        noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + m), dtype=torch.float64)
        ours = step(x, model, m, schedule=schedule, noise=noise, prediction=prediction)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        if name == "ddpm" and i > 0:
            other = step(x, model, m, schedule=schedule, noise=torch.randn(3, 4, generator=g, dtype=torch.float64),
                         prediction=prediction)
            assert float((other - theirs).abs().max()) > 1e-6
        if m < M - 1:
            off = step(x, model, m, schedule=shifted, noise=noise, prediction=prediction)
            assert float((off - theirs).abs().max()) > 1e-6


def test_the_adapter_calls_the_unet_at_the_discrete_timestep(pipeline_dir):
    """On the schedule's grid (float32 times, as finetuning runs) the UNet gets exactly the integer
    index i = t·N − 1 that diffusers' pipeline calls it with; between grid points a fractional one."""
    loaded = load_diffusers(pipeline_dir)
    assert loaded.shape == (1, 8, 8) and loaded.model.prediction == "epsilon" and loaded.layout == "pipeline"
    assert loaded.schedule == vp_schedule_for(loaded.scheduler, 100) and loaded.schedule.num_steps == 100
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = dataclasses.replace(loaded.schedule, num_steps=4)
    t = sched.times[:-1].float()  # indices 750, 500, 250, 0; float32 t·N − 1 = 249.99998 for 250
    with torch.no_grad():
        expected = loaded.model.unet(x, sched.timesteps).sample
        assert torch.equal(loaded.model(x, t), expected)
        between = loaded.model.unet(x[:3], torch.tensor([0.0, 499.5, 999.0])).sample
        torch.testing.assert_close(loaded.model(x[:3], torch.tensor([0.0005, 0.5005, 1.0])), between)


def _digest(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_finetune_a_local_diffusers_model_and_write_it_back(pipeline_dir, tmp_path):
    before = _digest(pipeline_dir)
    out = tmp_path / "run"
    args = ["run", "diffusion-finetune", "--diffusers-model", str(pipeline_dir), "--set", "num_steps=6",
            "--set", "num_sampling_steps=3", "--set", "batch_size=2", "--set", "eval_every=6",
            "--set", "eval_samples=4",
            "--set", "grid_images=4", "--set", "lr=1e-2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert _digest(pipeline_dir) == before  # the source is not touched
    pipe = diffusers.DDPMPipeline.from_pretrained(out / "diffusers", use_safetensors=True, local_files_only=True)
    original = diffusers.UNet2DModel.from_pretrained(pipeline_dir / "unet", use_safetensors=True, local_files_only=True)
    changed = [n for (n, p), q in zip(pipe.unet.named_parameters(), original.parameters()) if not torch.equal(p, q)]
    assert changed, "finetuning left every weight unchanged"
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_what_cannot_be_loaded_is_a_one_line_error(tmp_path, pipeline_dir):
    with pytest.raises(DataError, match="does not exist"):
        load_diffusers(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds no diffusers UNet"):
        load_diffusers(tmp_path)
    v = tmp_path / "v-pred"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction")
                           ).save_pretrained(v)
    with pytest.raises(DataError, match="prediction_type 'v_prediction' is not supported"):
        load_diffusers(v)
    pickled = tmp_path / "pickled"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        pickled, safe_serialization=False)
    with pytest.raises(DataError, match="only safetensors"):
        load_diffusers(pickled)
    assert main(["run", "diffusion-finetune", "--diffusers-model", str(tmp_path / "nowhere"), "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
