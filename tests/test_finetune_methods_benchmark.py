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
    bench.report([tmp_path / "run.json"], tmp_path / "front.png")
    out = capsys.readouterr().out
    assert out.startswith("machine: test machine; 1 thread(s)") and "train s" in out
    for row in rows:
        assert f"{row['method']:<17} {row['reward']:+9.4f} ± {row['reward_se']:.4f}" in out
    assert (tmp_path / "front.png").stat().st_size > 0


def _saved(seed: int, reward: float, kl: float, fraction: float, updates: int) -> dict:
    row = {"method": "queue-pipelined", "reward_name": "class:3", "ratio": 10.0, "iterations": updates + 1,
           "updates": updates, "train_s": 15.0, "images": 100 * updates, "peak_mib": 50.0 + seed, "reward": reward,
           "reward_se": 0.1, "kl": kl, "kl_se": 0.01, "fraction_classified": fraction}
    base = {"method": "pretrained", "reward_name": "class:3", "reward": -10.0 - seed, "reward_se": 0.3, "kl": 0.0,
            "kl_se": 0.0, "fraction_classified": 0.1}
    args = {"threads": 1, "device": "cpu", "M": 3, "batch": 2, "lr": 1e-3, "budget": 15.0, "draft_k": 2, "seed": seed,
            "rewards": ["class:3"], "methods": ["queue-pipelined"], "out": f"seed{seed}.json"}
    return {"machine": "test machine", "args": args, "pretrained": {"class:3": base}, "rows": [row]}


def test_runs_of_several_seeds_combine_to_the_mean_and_the_se_across_seeds(bench, tmp_path, capsys):
    combined = bench.combine([_saved(0, -1.0, 2.0, 0.5, 10), _saved(1, -3.0, 4.0, 0.7, 13)])
    (row,) = combined["rows"]
    # two values a, b: mean (a + b)/2, sample SD |a − b|/√2, SE = SD/√2 = |a − b|/2
    assert row["reward"] == pytest.approx(-2.0) and row["reward_se"] == pytest.approx(1.0)
    assert row["kl"] == pytest.approx(3.0) and row["kl_se"] == pytest.approx(1.0)
    assert row["fraction_classified"] == pytest.approx(0.6) and row["fraction_classified_se"] == pytest.approx(0.1)
    assert row["updates"] == 12 and row["peak_mib"] == pytest.approx(50.5)  # costs: means (counts rounded)
    assert combined["pretrained"]["class:3"]["reward"] == pytest.approx(-10.5)
    # the rise is paired by seed: −1 − (−10) = 9 and −3 − (−11) = 8, so 8.5 ± 0.5 (not 8.5 ± hypot of two SEs)
    assert row["rise"] == pytest.approx(8.5) and row["rise_se"] == pytest.approx(0.5)
    assert combined["args"]["seed"] == [0, 1]
    for i, seed in enumerate((0, 1)):
        (tmp_path / f"s{i}.json").write_text(json.dumps(_saved(seed, -1.0 - 2 * i, 2.0 + 2 * i, 0.5 + 0.2 * i, 10)))
    bench.report([tmp_path / "s0.json", tmp_path / "s1.json"], None)
    out = capsys.readouterr().out
    assert "seeds 0, 1 (means over seeds, ± SE across seeds" in out and "-2.0000 ± 1.0000" in out
    assert "60.0% ± 10.0%" in out
    assert "λ/β=10:  +17.0 SE, +2.8333/nat" in out  # 8.5 / 0.5 SE; 8.5 / mean KL 3


def test_runs_that_differ_in_more_than_the_seed_are_not_combined(bench):
    other = _saved(1, -3.0, 4.0, 0.7, 13)
    other["args"]["lr"] = 1e-2
    with pytest.raises(SystemExit, match=r"differ in more than their seed \(in \['lr'\]\)"):
        bench.combine([_saved(0, -1.0, 2.0, 0.5, 10), other])
    with pytest.raises(SystemExit, match=r"a seed appears twice"):
        bench.combine([_saved(0, -1.0, 2.0, 0.5, 10), _saved(0, -3.0, 4.0, 0.7, 13)])
