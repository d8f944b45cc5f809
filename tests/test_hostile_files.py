"""Hostile files: data, model files and diffusers directories whose headers or configs lie.

Every case is a one-line DataError (ConfigError for a model the experiment cannot use) naming the
file and what is wrong, raised *before* anything of the claimed size is allocated: the claims here
run to terabytes, so an implementation that allocated first would die of a MemoryError (or be
killed) instead of raising the expected message.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from implicit_diffusion.data import load_image_data
from implicit_diffusion.errors import ConfigError, DataError
from implicit_diffusion.models import ScoreMLP, UNet
from implicit_diffusion.models.io import FORMAT, load_score_model, save_score_model
from implicit_diffusion.samplers import VPSchedule

HUGE_SHAPE = (1_000_000, 3, 4000, 1280)  # float32: 15.36e12 numbers, 55.9 TiB


def _npy_header(shape, descr="<f4", fortran=False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def _one_line(e: pytest.ExceptionInfo, path) -> str:
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --- .npy / .npz ------------------------------------------------------------------------------------


def test_a_200_byte_npy_claiming_56_tib_is_truncated_not_allocated(tmp_path):
    f = tmp_path / "huge.npy"
    raw = _npy_header(HUGE_SHAPE)
    f.write_bytes(raw + bytes(200 - len(raw)))
    with pytest.raises(DataError, match=r"huge.npy is truncated: its header claims \(1000000, 3, 4000, 1280\) "
                                        r"float32 = 55.9 TiB, the file has 200 bytes") as e:
        load_image_data(f)
    assert "pickle" not in _one_line(e, f)


def test_a_truncated_npy_says_so(tmp_path):
    f = tmp_path / "cut.npy"
    np.save(f, np.zeros((4, 8, 8), np.uint8))
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"cut.npy is truncated: its header claims \(4, 8, 8\) uint8 = 256 bytes.*"
                                        r"246 bytes after the header") as e:
        load_image_data(f)
    assert "pickle" not in _one_line(e, f)


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", b"\x93NUM"])
def test_a_text_file_named_npy_is_not_a_npy_file(tmp_path, content):
    f = tmp_path / "text.npy"
    f.write_bytes(content)
    with pytest.raises(DataError, match=r"text.npy is not a .npy file \(no NumPy magic bytes\)") as e:
        load_image_data(f)
    _one_line(e, f)


def test_a_malformed_npy_header_is_named(tmp_path):
    f = tmp_path / "bad.npy"
    f.write_bytes(np.lib.format.magic(1, 0) + struct.pack("<H", 16) + b"{'descr': 3,}  \n")
    with pytest.raises(DataError, match=r"bad.npy: malformed .npy header"):
        load_image_data(f)
    f.write_bytes(_npy_header((-1, 8, 8), "|u1") + bytes(64))
    with pytest.raises(DataError, match=r"bad.npy: malformed .npy header \(shape \(-1, 8, 8\) has a negative"):
        load_image_data(f)
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as z:  # a member that is not .npy data at all
        z.writestr("x.npy", b"just some text")
    with pytest.raises(DataError, match=r"bad.npz \(array 'x'\) is not a .npy file \(no NumPy magic bytes\)"):
        load_image_data(tmp_path / "bad.npz")


@pytest.mark.parametrize("content", [b"hello", b"PK\x03\x04 not a zip", np.lib.format.magic(1, 0) + b"x" * 50])
def test_a_non_zip_npz_is_not_a_zip_archive(tmp_path, content):
    f = tmp_path / "junk.npz"
    f.write_bytes(content)
    with pytest.raises(DataError, match=r"junk.npz is not a .npz \(zip\) archive") as e:
        load_image_data(f)
    assert "pickle" not in _one_line(e, f)


def test_an_npz_member_claiming_terabytes_is_truncated(tmp_path):
    f = tmp_path / "huge.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("images.npy", _npy_header(HUGE_SHAPE) + bytes(64))
    with pytest.raises(DataError, match=r"huge.npz \(array 'images'\) is truncated: its header claims "
                                        r"\(1000000, 3, 4000, 1280\) float32 = 55.9 TiB, the member has"):
        load_image_data(f)


def test_a_zip_directory_claiming_more_than_deflate_can_expand_is_refused(tmp_path):
    """A member whose uncompressed size (in both zip headers) exceeds 1032× its compressed size: a lie
    or a zip bomb, refused from the directory alone."""
    f = tmp_path / "bomb.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_header((4, 8, 8), "|u1") + bytes(256))
    raw = bytearray(f.read_bytes())
    claim = 2**32 - 2
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    raw[local + 22:local + 26] = struct.pack("<I", claim)
    raw[central + 24:central + 28] = struct.pack("<I", claim)
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"bomb.npz \(array 'x'\): the zip directory claims 4 GiB uncompressed "
                                        r"from \d+ compressed bytes"):
        load_image_data(f)


def test_real_object_arrays_are_still_refused_as_pickles(tmp_path):
    f = tmp_path / "obj.npy"
    np.save(f, np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj.npy: the file holds pickled Python objects, refused"):
        load_image_data(f)


def test_header_first_reading_keeps_layouts_byte_orders_and_limits_exact(tmp_path):
    """Reading the data by hand after the header: Fortran order, big-endian and ``limit`` (which reads
    only the first images) give numpy's own array."""
    a = np.random.default_rng(0).integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    cases = {"c.npy": a, "f.npy": np.asfortranarray(a), "be.npy": a.astype(">u2"),
             "hwc.npy": np.ascontiguousarray(np.stack([a, a[::-1], a], axis=-1))}
    for name, arr in cases.items():
        np.save(tmp_path / name, arr)
        for limit in (None, 2):
            x = load_image_data(tmp_path / name, limit=limit)
            ref = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
            expected = torch.from_numpy(ref[:limit].astype(np.float64) / 127.5 - 1)
            assert x.shape == expected.shape and float((x.double() - expected).abs().max()) < 1e-6, (name, limit)
    np.savez_compressed(tmp_path / "z.npz", x=a)
    assert torch.equal(load_image_data(tmp_path / "z.npz", limit=3), load_image_data(tmp_path / "c.npy")[:3])


# --- MNIST IDX, image folders --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_an_idx_header_claiming_huge_dims_is_truncated(tmp_path, name):
    raw = struct.pack(">IIII", 0x00000803, 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(100)
    f = tmp_path / name
    f.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataError, match=r"truncated IDX file: header says 4294967295×4294967295×4294967295 = "
                                        r"\d+ pixel bytes \(.* EiB\), file holds 100$") as e:
        load_image_data(f)
    _one_line(e, f)


def test_a_gzip_idx_that_decompresses_past_its_header_stops_reading(tmp_path):
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(struct.pack(">IIII", 0x00000803, 1, 2, 2) + bytes(3 << 20)))  # 3 MiB of zeros
    with pytest.raises(DataError, match=r"oversized IDX file: header says 1×2×2 = 4 pixel bytes, file holds at "
                                        r"least 1048576$"):
        load_image_data(f)


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_an_image_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, side):
    """10,000² is above Pillow's MAX_IMAGE_PIXELS (a warning there, an error here); 100,000² above twice it."""
    (tmp_path / "a.png").write_bytes(_png(side, side))
    with pytest.raises(DataError, match=r"a.png: cannot read the image \(Image size \(\d+ pixels\) exceeds limit"):
        load_image_data(tmp_path)


# --- score-model files (models/io.py) --------------------------------------------------------------


def _model_file(path, model, *, config=None, cls=None, schedule=None, extra=None, state=None):
    meta = {"format": FORMAT, "version": "1", "class": cls or type(model).__name__,
            "config": config if isinstance(config, str) else json.dumps(model.config if config is None else config),
            "schedule": schedule if isinstance(schedule, str) else json.dumps(schedule or {"kind": "linear"}),
            "extra": extra if isinstance(extra, str) else json.dumps(extra or {})}
    save_file(model.state_dict() if state is None else state, path, metadata=meta)
    return path


@pytest.fixture(scope="module")
def unet():
    return UNet(1, 8, (1, 2), groups=4, time_dim=16)


def test_a_model_file_claiming_base_channels_2_20_is_refused_from_its_header(tmp_path, unet):
    f = _model_file(tmp_path / "huge.safetensors", unet, config={**unet.config, "base_channels": 2**20})
    with pytest.raises(DataError, match=r"huge.safetensors: weights do not match the UNet it describes: its config "
                                        r"implies [\d,]+ parameters \([\d.]+ PB in float32\), the file holds "
                                        rf"{sum(p.numel() for p in unet.parameters()):,} in \d+ tensors") as e:
        load_score_model(f)
    _one_line(e, f)


@pytest.mark.parametrize(("change", "message"), [
    ({"base_channels": "8"}, r"UNet config key 'base_channels' = '8'; expected an integer in 1\.\.16777216"),
    ({"base_channels": True}, r"'base_channels' = True; expected an integer"),
    ({"channel_mults": []}, r"'channel_mults' = \[\]; expected a list of 1 to 16 integers"),
    ({"channel_mults": [1, 2.5]}, r"'channel_mults' = \[1, 2.5\]"),
    ({"dropout": float("nan")}, r"'dropout' = nan; expected a number in \[0, 1\)"),
    ({"attention": 1}, r"'attention' = 1; expected true or false"),
    ({"prediction": "v"}, r"'prediction' = 'v'; expected one of epsilon, score, x0"),
    ({"evil": 1}, r"unknown UNet config key 'evil'; allowed: in_channels, "),
    ({"num_res_blocks": 1000}, r"the UNet config describes 4004 residual blocks \(at least 32032 tensors\), the "
                               r"file holds \d+ tensors"),
    ({"groups": 3}, r"malformed model description \(base_channels \(8\) must be divisible by groups \(3\)\)"),
])
def test_model_configs_of_the_wrong_type_or_range_are_named(tmp_path, unet, change, message):
    f = _model_file(tmp_path / "m.safetensors", unet, config={**unet.config, **change})
    with pytest.raises(DataError, match=message) as e:
        load_score_model(f)
    _one_line(e, f)


def test_model_metadata_that_is_not_an_object_or_not_json(tmp_path, unet):
    cases = {"config": ("[1, 2]", r"metadata 'config' must be a JSON object, got list"),
             "schedule": ("3", r"metadata 'schedule' must be a JSON object, got int"),
             "extra": ("{", r"metadata 'extra' is not valid JSON"),
             "deep": ("[" * 100_000 + "]" * 100_000, r"metadata 'config' is not valid JSON")}
    for key, (text, message) in cases.items():
        f = _model_file(tmp_path / f"{key}.safetensors", unet, **{"config" if key == "deep" else key: text})
        with pytest.raises(DataError, match=message):
            load_score_model(f)
    f = _model_file(tmp_path / "sched.safetensors", unet, schedule={"kind": "linear", "beta_max": "x"})
    with pytest.raises(DataError, match=r"malformed schedule in the metadata"):
        load_score_model(f)


def test_model_tensors_must_match_names_shapes_and_dtypes(tmp_path):
    mlp = ScoreMLP(2, hidden=4, depth=1, time_dim=4)
    state = mlp.state_dict()
    renamed = {("net.0.weights" if k == "net.0.weight" else k): v for k, v in state.items()}
    f = _model_file(tmp_path / "renamed.safetensors", mlp, state=renamed)
    with pytest.raises(DataError, match=r"missing \['net.0.weight'\]; unexpected \['net.0.weights'\]"):
        load_score_model(f)
    # same parameter count, another shape: (4, 6) stored as (6, 4)
    f = _model_file(tmp_path / "transposed.safetensors", mlp, state={**state, "net.0.weight": state["net.0.weight"].T
                                                                      .contiguous()})
    with pytest.raises(DataError, match=r"tensor 'net.0.weight' has shape \(6, 4\), the config implies \(4, 6\)"):
        load_score_model(f)
    f = _model_file(tmp_path / "ints.safetensors", mlp, state={k: v.to(torch.int32) for k, v in state.items()})
    with pytest.raises(DataError, match=r"has dtype I32; expected one of F16, BF16, F32, F64"):
        load_score_model(f)
    f = _model_file(tmp_path / "deep.safetensors", mlp, config={**mlp.config, "depth": 50_000})
    with pytest.raises(DataError, match=r"describes 50001 linear layers \(100002 tensors\), the file holds 4"):
        load_score_model(f)
    f = _model_file(tmp_path / "shape.safetensors", mlp, extra={"data_shape": [3]})
    with pytest.raises(DataError, match=r"extra 'data_shape' = \[3\] contradicts the ScoreMLP's dim = 2"):
        load_score_model(f)


def test_a_well_formed_file_still_loads(tmp_path, unet):
    save_score_model(tmp_path / "ok.safetensors", unet, VPSchedule("cosine"), extra={"data_shape": [1, 8, 8]})
    loaded = load_score_model(tmp_path / "ok.safetensors")
    assert loaded.model.config == unet.config and loaded.extra == {"data_shape": [1, 8, 8]}
    f = _model_file(tmp_path / "odd.safetensors", unet, extra={"data_shape": [1, 7, 8]})
    with pytest.raises(DataError, match=r"data_shape' = \[1, 7, 8\] does not fit the UNet; expected \[1, H, W\] "
                                        r"with H and W multiples of 2"):
        load_score_model(f)


# --- a 2-D model given to the image experiment ------------------------------------------------------


@pytest.mark.parametrize("extra", [{"dataset": "moons", "data_shape": [2]}, {}])
def test_a_2d_model_is_refused_by_diffusion_finetune_when_loading(tmp_path, extra):
    from implicit_diffusion.cli import main
    from implicit_diffusion.experiments import diffusion_finetune as df

    f = tmp_path / "model.safetensors"
    save_score_model(f, ScoreMLP(2, hidden=8, depth=1), VPSchedule("linear"), extra=extra)
    with pytest.raises(ConfigError, match=r"config key 'model': .*model.safetensors makes samples of shape \(2,\), "
                                          r"diffusion-finetune needs images \(C, H, W\); use a shipped image model"):
        df._load_model(df.Config(model=str(f)), None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "diffusion-finetune", "--set", f"model={json.dumps(str(f))}", "--no-progress",
                   "--out", str(tmp_path / "run")])
    assert rc == 2 and "makes samples of shape (2,)" in err.getvalue() and "Traceback" not in err.getvalue()


# --- diffusers directories ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("hostile") / "tiny"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def _edited(src, dst, file: str, change: dict | None = None, *, replace=None):
    shutil.copytree(src, dst)
    target = dst / file
    if replace is not None:
        target.write_text(replace if isinstance(replace, str) else json.dumps(replace))
    else:
        target.write_text(json.dumps({**json.loads(target.read_text()), **change}))
    return dst, target


UNET, SCHED = "unet/config.json", "scheduler/scheduler_config.json"
DIFFUSERS_CASES = {
    "wrong types": (UNET, {"block_out_channels": "8,16"}, r"block_out_channels = '8,16' is not allowed; expected "
                                                          r"a list of integers in 1\.\.8192"),
    "sample_size a string": (UNET, {"sample_size": "8"}, r"sample_size = '8' is not allowed"),
    "layers_per_block a float": (UNET, {"layers_per_block": 1.5}, r"layers_per_block = 1.5 is not allowed"),
    "timesteps a string": (SCHED, {"num_train_timesteps": "100"}, r"num_train_timesteps = '100' is not allowed"),
    "non-diffusers config": (UNET, None, r"is not a diffusers UNet2DModel config \(_class_name = None\)"),
    "zero timesteps": (SCHED, {"num_train_timesteps": 0}, r"num_train_timesteps = 0 is not allowed; expected an "
                                                          r"integer in 1\.\.100000"),
    "negative beta_start": (SCHED, {"beta_start": -0.001}, r"beta_start = -0.001 is not allowed; expected a number "
                                                           r"in \(0, 1\)"),
    "negative beta_end": (SCHED, {"beta_end": -0.02}, r"beta_end = -0.02 is not allowed"),
    "unknown beta_schedule": (SCHED, {"beta_schedule": "quadratic"}, r"beta_schedule = 'quadratic' is not allowed; "
                                                                     r"expected one of linear, scaled_linear"),
    "DDIM without sigmoid": (SCHED, {"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"},
                             r"beta_schedule = 'sigmoid' is not allowed; expected one of linear, scaled_linear, "
                             r"squaredcos_cap_v2$"),
    "huge sample_size": (UNET, {"sample_size": 100_000}, r"sample_size = 100000 is not allowed; expected an integer "
                                                         r"\(or \[height, width\]\) in 1\.\.2048"),
    "scheduler a list": (SCHED, [1, 2], r"scheduler_config.json' must hold a JSON object, got list"),
    "config not JSON": (UNET, "{'sample_size': 8", r"config.json' is not valid JSON"),
    "out_channels": (UNET, {"out_channels": 2}, r"out_channels = 2 differs from in_channels = 1"),
    "block counts": (UNET, {"block_out_channels": [8, 16, 16]}, r"have 2, 2 and 3 entries"),
    "class conditional": (UNET, {"class_embed_type": "timestep"}, r"class_embed_type = 'timestep': class-conditional"),
    "groups": (UNET, {"norm_num_groups": 3}, r"norm_num_groups = 3 does not divide block_out_channels = \[8, 16\]"),
    "sample_size not divisible": (UNET, {"sample_size": 9}, r"sample_size = 9 is not divisible by 2"),
    "more parameters than the weights": (UNET, {"block_out_channels": [1024, 4096], "norm_num_groups": 4},
                                         r"describes a UNet2DModel of [\d,]+ parameters \([\d.]+ GB in float32\); "
                                         r"its weights in 'diffusion_pytorch_model.safetensors' hold [\d,]+$"),
}


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_malformed_diffusers_directories_are_one_line_data_errors(tmp_path, tiny_diffusers, case):
    from implicit_diffusion.models.diffusers_adapter import load_diffusers

    file, change, message = DIFFUSERS_CASES[case]
    if case == "non-diffusers config":  # a transformers config.json where the UNet's belongs
        path, target = _edited(tiny_diffusers, tmp_path / "d", file, replace={"architectures": ["BertModel"],
                                                                              "hidden_size": 768})
    elif not isinstance(change, dict):
        path, target = _edited(tiny_diffusers, tmp_path / "d", file, replace=change)
    else:
        path, target = _edited(tiny_diffusers, tmp_path / "d", file, change)
    with pytest.raises(DataError, match=message) as e:
        load_diffusers(path)
    _one_line(e, target)


def test_a_missing_scheduler_config_is_named(tmp_path, tiny_diffusers):
    from implicit_diffusion.models.diffusers_adapter import load_diffusers

    shutil.copytree(tiny_diffusers, tmp_path / "d")
    (tmp_path / "d" / SCHED).unlink()
    with pytest.raises(DataError, match=r"has no scheduler_config.json beside its UNet \(expected .*scheduler/"
                                        r"scheduler_config.json"):
        load_diffusers(tmp_path / "d")


def test_the_tiny_directory_itself_loads_and_a_huge_sample_size_exits_2(tmp_path, tiny_diffusers):
    from implicit_diffusion.cli import main
    from implicit_diffusion.models.diffusers_adapter import load_diffusers

    loaded = load_diffusers(tiny_diffusers)
    assert loaded.shape == (1, 8, 8) and loaded.model.num_train_timesteps == 100
    path, _ = _edited(tiny_diffusers, tmp_path / "d", UNET, {"sample_size": [8, 100_000]})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "diffusion-finetune", "--diffusers-model", str(path), "--no-progress",
                   "--out", str(tmp_path / "run")])
    assert rc == 2 and "sample_size = [8, 100000] is not allowed" in err.getvalue(), err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1
