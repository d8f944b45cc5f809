"""diffusers models: the schedule mapping, the adapter, finetuning a tiny local model end to end."""

from __future__ import annotations

import hashlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from implicit_diffusion.cli import main  # noqa: E402
from implicit_diffusion.errors import DataError  # noqa: E402
from implicit_diffusion.models.diffusers_adapter import load_diffusers, vp_schedule_for  # noqa: E402


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


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_the_vp_schedule_matches_the_discrete_alphas_cumprod(kind):
    """ᾱ(t = (i+1)/N) of the mapped continuous schedule against diffusers' ᾱ_i for every i: the
    discretisation error is O(1/N). Control: forgetting the factor N in β is far off."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind)
    ours = vp_schedule_for(dict(sched.config))
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    theirs = sched.alphas_cumprod.double()
    assert (ours.alpha_bar(t) - theirs).abs().max() < 2e-3
    if kind == "linear":
        wrong = vp_schedule_for({**sched.config, "beta_start": 1e-7, "beta_end": 2e-5})  # β not scaled by N
        assert (wrong.alpha_bar(t) - theirs).abs().max() > 0.5


def test_the_adapter_calls_the_unet_at_the_discrete_timestep(pipeline_dir):
    loaded = load_diffusers(pipeline_dir)
    assert loaded.shape == (1, 8, 8) and loaded.model.prediction == "epsilon" and loaded.layout == "pipeline"
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.001, 0.5, 1.0])
    with torch.no_grad():
        expected = loaded.model.unet(x, torch.tensor([0.0, 499.0, 999.0])).sample
        torch.testing.assert_close(loaded.model(x, t), expected)


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
