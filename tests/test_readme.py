"""The README's Python example runs and prints what the README says it prints."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_its_comment(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    theta = namespace["potential"].theta.detach()
    reward = namespace["reward"](namespace["x"]).mean().item()
    claimed = re.search(r"θ ≈ \(([-\d.]+), ([-\d.]+)\), E\[R\] ≈ ([\d.]+)", block)
    t0, t1, r = map(float, claimed.groups())
    # the run is seeded; these bounds cover the rounding in the comment and float noise
    assert abs(theta[0].item() - t0) < 0.02 and abs(theta[1].item() - t1) < 0.02
    assert abs(reward - r) < 0.01
    capsys.readouterr()


def test_readme_diffusion_example_runs_and_finetunes(capsys):
    """The section "Finetuning a diffusion model from Python": it runs and raises the mean brightness."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Finetuning a diffusion model from Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md (diffusion)", "exec"), namespace)
    model = namespace["model"]
    assert (model.prediction, model.data_shape) == ("epsilon", (1, 8, 8))
    assert namespace["queue"].prediction == "epsilon"  # read from the model, not repeated
    # the same 64 draws (seeded) before and after: the rise is the finetuning's, not noise
    assert float(namespace["after"]) > float(namespace["before"]) + 0.01
    out = capsys.readouterr().out
    assert out.startswith("epsilon (1, 8, 8)") and "mean brightness" in out
