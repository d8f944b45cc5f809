"""report: metric series parsed from metrics.jsonl exactly, PNGs and a Markdown summary, comparisons."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from implicit_diffusion.cli import main
from implicit_diffusion.errors import DataError, RunDirError
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


# --- damaged metrics files: every bad line or value is a one-line warning, never a traceback ----------

def _run_dir(tmp_path, lines: list[bytes], *, end: bytes = b"\n"):
    (tmp_path / "config.toml").write_text("lr = 1.0\n")
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + end)
    return tmp_path


def _warnings(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("implicit-diffusion: warning: ") for line in lines), err  # nothing else, no traceback
    return [line.removeprefix("implicit-diffusion: warning: ") for line in lines]


def test_lines_that_are_not_utf8_or_not_json_are_skipped_with_a_warning_naming_file_and_line(tmp_path, capsys):
    good = [json.dumps({"step": i, "loss": float(i)}).encode() for i in range(3)]
    bad = [b'{"step": 7, "loss": 1.0, "note": "caf\xe9"}',  # Latin-1, not UTF-8
           b"\xff\xfe\x00{",  # binary
           b"[1, 2, 3]",  # JSON, but not a record
           b"[" * 100_000,  # nesting deeper than the parser's recursion limit
           b'{"step": 8, "loss": ' + b"9" * 5000 + b"}",  # beyond Python's 4300-digit int conversion limit
           b"not json at all"]
    run_dir = _run_dir(tmp_path, [good[0], *bad[:3], good[1], *bad[3:], good[2]])
    run = load_run(run_dir)
    assert run.series["loss"] == {"": ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])}  # the good lines, exactly
    warnings = _warnings(capsys.readouterr().err)
    path = run_dir / "metrics.jsonl"
    assert [w.split(": ", 1)[0] for w in warnings] == [f"{path}:{n}" for n in (2, 3, 4, 6, 7, 8)]
    assert "not UTF-8" in warnings[0] and "not UTF-8" in warnings[1] and "not a record" in warnings[2]
    assert all(w.endswith("line skipped") for w in warnings)
    assert main(["report", str(run_dir)]) == 0  # the command: the same warnings, then the report
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 6 and (run_dir / "report" / "metric-loss.png").exists()


def test_numbers_that_are_not_finite_floats_are_skipped_with_a_warning(tmp_path, capsys):
    huge = "1" * 401  # json reads it as an int; float() of it overflows
    lines = [b'{"step": 0, "loss": 1.0, "kl": 2.0}',
             f'{{"step": 1, "loss": {huge}, "kl": 3.0}}'.encode(),  # the value is left out, the record kept
             f'{{"step": {huge}, "loss": 5.0}}'.encode(),  # a step axis that is no number: the record is left out
             b'{"step": 2, "loss": NaN, "kl": Infinity}',
             b'{"step": 3, "loss": 1e308, "kl": -1e308}',  # metrics.jsonl's stand-ins for +-inf: cannot be plotted
             b'{"step": 4, "loss": 4.0, "kl": -Infinity}']
    run = load_run(_run_dir(tmp_path, lines))
    assert run.series["loss"][""] == ([0.0, 4.0], [1.0, 4.0])
    assert run.series["kl"][""] == ([0.0, 1.0], [2.0, 3.0])
    warnings = _warnings(capsys.readouterr().err)
    where = [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in warnings]
    assert where == ["2", "3", "4", "4", "5", "5", "6"]
    assert warnings[0].endswith("'loss' = 111111111111…(401 characters) is not a finite number (or beyond ±1e+300); "
                                "value skipped")
    assert "record skipped" in warnings[1] and "'kl' = Infinity" in warnings[3]
    files = write_report([tmp_path], tmp_path / "report")  # the plots of what is left
    assert {"metric-loss.png", "metric-kl.png"} <= set(files)
    assert capsys.readouterr().err.count("\n") == 7  # once per reading, one line each


def test_a_metrics_file_with_nothing_usable_is_one_data_error(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, [b"\xff" * 10, b"{broken", b"42"])
    with pytest.raises(DataError, match=r"has no usable record: 3 bad line\(s\), the first, line 1: not UTF-8"):
        load_run(run_dir)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("implicit-diffusion: error: ") and "no usable record" in err
    (run_dir / "metrics.jsonl").write_bytes(b"")  # empty (a run stopped before its first record): no error
    assert load_run(run_dir).series == {}


def test_many_bad_lines_give_a_bounded_number_of_warnings(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, [b'{"step": 0, "loss": 1.0}', *[b"\xff"] * 500], end=b"")
    load_run(run_dir)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 21 and warnings[-1].endswith("480 more lines or values skipped")


def test_a_cut_last_line_and_bad_json_around_the_metrics_are_named(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, [b'{"step": 0, "loss": 1.0}', b'{"step": 1, "lo'], end=b"")
    load_run(run_dir)
    assert _warnings(capsys.readouterr().err) == [f"{run_dir / 'metrics.jsonl'}:2: cut off (the run stopped "
                                                  f"while writing it?); line skipped"]
    (run_dir / "summary.json").write_text('{"x": ' + "7" * 5000 + "}")  # valid JSON, beyond int conversion
    with pytest.raises(RunDirError, match="summary.json' is not valid JSON"):
        load_run(run_dir)
    (run_dir / "summary.json").unlink()
    (run_dir / "config.toml").write_bytes(b"lr = \xff\n")
    with pytest.raises(RunDirError, match="config.toml' is not valid TOML"):
        load_run(run_dir)
    (run_dir / "config.toml").write_text("lr = " + "7" * 5000 + "\n")
    assert main(["report", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith("implicit-diffusion: error: ")
