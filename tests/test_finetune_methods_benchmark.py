"""benchmarks/finetune_methods.py on a tiny budget: every contender builds, trains (θ moves off θ₀ except
the queues, whose first batch exits at iteration M) and reports the same fields, and the front plot is written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling diffusion_queue
    spec = importlib.util.spec_from_file_location("finetune_methods", BENCH / "finetune_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))
    sys.modules.pop("diffusion_queue", None)


def test_every_contender_runs_and_reports(bench, tmp_path):
    args = argparse.Namespace(threads=1, device="cpu", M=3, batch=2, lr=1e-3, budget=1e-9, draft_k=2, seed=0)
    rows = [bench.worker(method, "class:3", 30.0, args) for method in bench.METHODS]
    keys = {"method", "reward_name", "ratio", "iterations", "updates", "train_s", "images", "peak_mib", "reward",
            "reward_se", "kl", "kl_se", "fraction_classified"}
    for row in rows:
        assert set(row) == keys and row["iterations"] == 1 and row["images"] > 0
        assert 0 <= row["fraction_classified"] <= 1 and row["reward"] <= 0
        assert row["updates"] == (0 if row["method"].startswith("queue") else 1)  # a queue's first exit: iteration M
        assert (row["kl"] > 0) == (row["updates"] > 0), row  # an update moves θ off θ₀; no update, KL 0
    base = bench.pretrained_row("class:3", args)
    bench.plot(tmp_path / "front.png", rows, {"class:3": base}, ["class:3"])
    assert (tmp_path / "front.png").stat().st_size > 0


def test_a_saved_run_is_reported_again_with_every_contender(bench, tmp_path, capsys):
    args = argparse.Namespace(threads=1, device="cpu", M=3, batch=2, lr=1e-3, budget=1e-9, draft_k=2, seed=0)
    methods = ["draft-1", "adjoint-matching"]
    rows = [bench.worker(method, "brightness", 10.0, args) for method in methods]
    saved = {"machine": "test machine", "pretrained": {"brightness": bench.pretrained_row("brightness", args)},
             "args": {**vars(args), "rewards": ["brightness"], "methods": methods}, "rows": rows}
    (tmp_path / "run.json").write_text(json.dumps(saved))
    bench.report(tmp_path / "run.json", tmp_path / "front.png")
    out = capsys.readouterr().out
    assert out.startswith("machine: test machine; 1 thread(s)") and "train s" in out
    for row in rows:
        assert f"{row['method']:<17} {row['reward']:+9.4f} ± {row['reward_se']:.4f}" in out
    assert (tmp_path / "front.png").stat().st_size > 0
