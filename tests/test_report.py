"""report: metric series parsed from metrics.jsonl exactly, PNGs and a Markdown summary, comparisons."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from implicit_diffusion.cli import main
from implicit_diffusion.errors import RunDirError
from implicit_diffusion.experiments import langevin_mixture
from implicit_diffusion.runtime.report import load_run, write_report
from implicit_diffusion.runtime.runner import execute

TINY = dict(num_particles=200, num_steps=300, eval_every=100, snapshot_steps=(0, 300), progress=False)


@pytest.fixture
def runs(tmp_path):
    for name, sampler in (("ula", "ula"), ("mala", "mala")):
        execute(langevin_mixture, langevin_mixture.Config(**TINY, sampler=sampler), tmp_path / name,
                name="langevin-mixture")
    return tmp_path / "ula", tmp_path / "mala"


def test_series_are_the_metrics_file_values(runs):
    run = load_run(runs[0])
    assert run.experiment == "langevin-mixture" and run.config["sampler"] == "ula"
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    x, y = run.series["reward"][""]
    assert x == [float(r["step"]) for r in records if "reward" in r]
    assert y == [r["reward"] for r in records if "reward" in r]
    assert run.series["kl"][""][0] == [0.0, 100.0, 200.0, 300.0]
    assert "weights" not in run.series  # lists are not plotted as a scalar metric
    assert {"particles.png", "reward.png", "weights.png"} <= set(run.figures)


def test_one_run_report_and_a_comparison(runs, tmp_path):
    files = write_report([runs[0]], tmp_path / "one")
    assert files[0] == "report.md" and {"metric-reward.png", "metric-exact_reward.png", "metric-kl.png"} <= set(files)
    for f in files[1:]:
        with Image.open(tmp_path / "one" / f) as im:
            assert im.size[0] > 300
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| sampler | ula |" in md and "exact_reward_final" in md and "![metric-reward.png](metric-reward.png)" in md
    assert "(../ula/particles.png)" in md  # the run's own figures, linked relative to the report

    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    settings = md.split("## Settings that differ")[1].split("##")[0]
    assert "| sampler | ula | mala |" in settings and "num_particles" not in settings  # only what differs
    assert "acceptance_rate" in md


def test_labelled_records_make_one_series_per_label(tmp_path):
    (tmp_path / "config.toml").write_text("lr = 1.0\n")
    lines = [{"method": m, "update": i, "loss": float(i * (2 if m == "b" else 1))} for m in "ab" for i in range(3)]
    lines.append({"method": "a", "loss": 5.0})  # no step axis: not plotted
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"cut off")
    run = load_run(tmp_path)
    assert run.series["loss"] == {"a": ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]), "b": ([0.0, 1.0, 2.0], [0.0, 2.0, 4.0])}
    assert run.x_label["loss"] == "update" and run.experiment == "unknown experiment"


def test_what_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(RunDirError, match="not a run directory"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path), str(tmp_path)]) == 2
    assert "needs --out" in capsys.readouterr().err
