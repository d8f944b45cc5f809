"""--tensorboard: the metrics.jsonl records mirrored as TensorBoard scalars (read back from the event files)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from implicit_diffusion.cli import main  # noqa: E402


def scalars(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_numeric_metric_is_a_scalar_at_its_step(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "langevin-mixture", "--set", "num_particles=200", "--set", "num_steps=300",
                 "--no-progress", "--tensorboard", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tb = scalars(out / "tensorboard")
    assert set(tb) == {"reward", "exact_reward", "kl"}
    want = [(r["step"], r["reward"]) for r in records if "reward" in r]
    got = tb["reward"]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(v == pytest.approx(w, rel=1e-6, abs=1e-7) for (_, v), (_, w) in zip(got, want))  # float32 in TB
    assert [s for s, _ in tb["kl"]] == [0, 100, 200, 300]


def test_labelled_records_get_their_label_in_the_tag(tmp_path):
    out = tmp_path / "hp"
    assert main(["run", "hyperparameter", "--set", "num_updates=30", "--set", "nested_updates=3", "--no-progress",
                 "--tensorboard", "--out", str(out)]) == 0
    tags = set(scalars(out / "tensorboard"))
    assert {"single loop/theta", "nested/theta", "single loop/validation_loss"} <= tags
