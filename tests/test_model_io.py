"""Score-model files: safetensors + JSON round trip, and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from implicit_diffusion.errors import DataError
from implicit_diffusion.models import ScoreMLP, UNet
from implicit_diffusion.models.io import load_score_model, save_score_model
from implicit_diffusion.samplers import VPSchedule


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("make, shape", [(lambda: ScoreMLP(3, hidden=16, depth=2, prediction="score"), (5, 3)),
                                         (lambda: UNet(in_channels=3, base_channels=16), (2, 3, 8, 8))])
def test_round_trip_gives_the_same_function_schedule_and_extra(tmp_path, make, shape):
    model = _perturbed(make())
    sched = VPSchedule("cosine", num_steps=37, t_min=0.01)
    save_score_model(tmp_path / "m.safetensors", model, sched, extra={"data_shape": list(shape[1:]), "note": "x"})
    loaded = load_score_model(tmp_path / "m.safetensors")
    assert type(loaded.model) is type(model) and loaded.model.prediction == model.prediction
    assert loaded.schedule == sched and loaded.extra == {"data_shape": list(shape[1:]), "note": "x"}
    x, t = torch.randn(shape), torch.rand(shape[0])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t), model(x, t))
    assert not loaded.model.training


def test_saving_an_unknown_class_is_refused(tmp_path):
    with pytest.raises(TypeError, match="Linear"):
        save_score_model(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), VPSchedule("linear"))


def test_bad_files_give_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such model file"):
        load_score_model(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_score_model(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign, metadata={"format": "something-else"})
    with pytest.raises(DataError, match="not an implicit-diffusion score model"):
        load_score_model(foreign)
    good = tmp_path / "good.safetensors"
    model = ScoreMLP(2, hidden=8, depth=1)
    save_score_model(good, model, VPSchedule("linear"))
    # truncated: the previous file must not load as if it were fine
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError):
        load_score_model(truncated)
    # weights that do not match the architecture the metadata describes
    meta = {"format": "implicit-diffusion/score-model", "version": "1", "class": "ScoreMLP",
            "config": json.dumps({**model.config, "hidden": 9}), "schedule": json.dumps({"kind": "linear"}),
            "extra": "{}"}
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(model.state_dict(), mismatched, metadata=meta)
    with pytest.raises(DataError, match="do not match"):
        load_score_model(mismatched)
    meta_bad_class = {**meta, "class": "os.system"}
    save_file(model.state_dict(), tmp_path / "cls.safetensors", metadata=meta_bad_class)
    with pytest.raises(DataError, match="unknown model class 'os.system'"):
        load_score_model(tmp_path / "cls.safetensors")
