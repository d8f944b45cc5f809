"""Exact §5.1 quantities against Monte Carlo and an independent quadrature."""

import math

import numpy as np
import pytest
import torch

from implicit_diffusion.models import hexagon_centres, hexagon_mixture
from implicit_diffusion.objectives import hexagon_reward, hexagon_reward_smooth
from implicit_diffusion.objectives.hexagon_exact import MixtureKL, component_reward_expectations

CENTRES = hexagon_centres(dtype=torch.float64).numpy()


def test_paper_reference_values():
    """The notes' figures: E[R] under π*(θ₀) ≈ 0.073, best ≈ 0.298 (all mass on c₂)."""
    e = component_reward_expectations(CENTRES, 1.0, "indicator")
    w0 = torch.softmax(torch.tensor([1.5, 0, 1.5, 0, 1.5, 0], dtype=torch.float64), 0).numpy()
    assert abs(w0 @ e - 0.0725) < 5e-4
    assert int(np.argmax(e)) == 1 and abs(e.max() - 0.2983) < 5e-4


@pytest.mark.parametrize("reward, fn", [("indicator", hexagon_reward), ("smooth", hexagon_reward_smooth)])
@pytest.mark.parametrize("k", range(6))
def test_component_expectations_match_monte_carlo(reward, fn, k):
    """n = 400k exact draws per component; tolerance 5 standard errors of the sample mean."""
    g = torch.Generator().manual_seed(100 + k)
    n = 400_000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.from_numpy(CENTRES[k])
    r = fn(x)
    se = r.std().item() / math.sqrt(n)
    exact = component_reward_expectations(CENTRES, 1.0, reward)[k]
    assert abs(r.mean().item() - exact) <= 5 * se + 1e-12


def test_indicator_closed_form_detects_a_wrong_threshold():
    """Negative control: on c₃ = (−2, 2√3), where the indicator matters, the reward without it
    is far (≫ 5 SE) from the closed form."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400_000, 2, generator=g, dtype=torch.float64) + torch.from_numpy(CENTRES[2])
    no_indicator = torch.exp(-((x[:, 0] - 4) ** 2 + (x[:, 1] - 3.8) ** 2) / 20) / 2.5
    exact = component_reward_expectations(CENTRES, 1.0, "indicator")[2]
    se = no_indicator.std().item() / math.sqrt(len(x))
    assert abs(no_indicator.mean().item() - exact) > 5 * se


def test_mixture_kl_against_monte_carlo():
    """KL(p‖q) = E_p[log p − log q] from 400k exact draws of p; tolerance 5 SE."""
    w0 = np.full(6, 1 / 6)
    w = np.array([0.05, 0.6, 0.1, 0.05, 0.1, 0.1])
    kl = MixtureKL(CENTRES, 1.0, w0)(w)
    p = hexagon_mixture(torch.tensor(np.log(w)), dtype=torch.float64)
    q = hexagon_mixture(torch.tensor(np.log(w0)), dtype=torch.float64)
    x = p.sample(400_000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d = q(x) - p(x)  # log p − log q
    se = d.std().item() / math.sqrt(len(x))
    assert abs(d.mean().item() - kl) <= 5 * se
    assert MixtureKL(CENTRES, 1.0, w0)(w0) == pytest.approx(0.0, abs=1e-12)


def test_exact_evaluation_agrees_with_its_parts_and_monte_carlo():
    """E_{π*(θ)}[R] from θ alone equals Σₖ softmax(θ)ₖ eₖ, matches a Monte Carlo mean of the reward
    over exact draws of π*(θ) (n = 400k, 5 SE), and the KL is 0 at θ₀ and positive elsewhere."""
    from implicit_diffusion.objectives.hexagon_exact import ExactEvaluation

    theta0 = [1.5, 0, 1.5, 0, 1.5, 0]
    ev = ExactEvaluation(CENTRES, 1.0, "indicator", theta0)
    theta = torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    out = ev(theta)
    w = torch.softmax(theta, 0).numpy()
    assert out["exact_reward"] == float(w @ component_reward_expectations(CENTRES, 1.0, "indicator"))
    assert np.array_equal(out["weights"], w) and out["kl"] > 0 and ev(torch.tensor(theta0))["kl"] == 0.0
    assert ev.reward_initial == pytest.approx(0.0725, abs=5e-4) and ev.reward_optimum == pytest.approx(0.2983, abs=5e-4)
    x = hexagon_mixture(theta, dtype=torch.float64).sample(400_000, generator=torch.Generator().manual_seed(7))
    r = hexagon_reward(x)
    assert abs(float(r.mean()) - out["exact_reward"]) < 5 * float(r.std()) / math.sqrt(len(r))
