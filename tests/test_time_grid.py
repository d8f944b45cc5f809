"""The bent sampling grid ``time_power`` ρ: t_m = t_min + (T − t_min)(1 − m/M)^ρ.

The accuracy claim is checked exactly, with no Monte Carlo in the law itself: on N(0, s²) data
the exact score is linear in x, so each Euler–Maruyama step is x ↦ a_m x + c_m z and the sampler's
output law is N(0, v_M) with v_{m+1} = a_m² v_m + c_m², a_m and c_m read off the step itself with
unit inputs. A Monte Carlo run then checks the sampler against that exact discrete law.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gaussian_data_sampler_sd, gaussian_data_score

from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.objectives import GirsanovKL
from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step, sample

S = 0.1  # data sd


def _exact_score(schedule: VPSchedule):
    return gaussian_data_score(schedule, S)


def _exact_em_sd(schedule: VPSchedule) -> float:
    """sd of x_M for x_0 ~ N(0, 1): the affine recursion of the steps, exactly."""
    return gaussian_data_sampler_sd(euler_maruyama_step, schedule, S)


def test_the_grid_formula_and_its_end_points():
    s = VPSchedule("linear", num_steps=4, time_power=2.0)
    expected = [1e-3 + (1 - 1e-3) * (1 - m / 4) ** 2 for m in range(5)]
    assert s.times.tolist() == pytest.approx(expected, rel=1e-15, abs=0)
    assert s.times[0].item() == 1.0 and s.times[-1].item() == 1e-3
    assert bool((s.times[:-1] > s.times[1:]).all())
    steps = (s.times[:-1] - s.times[1:]).tolist()
    assert steps == sorted(steps, reverse=True)  # ρ > 1: finer towards t_min


def test_power_one_is_the_uniform_grid_bit_for_bit():
    assert torch.equal(VPSchedule("linear", num_steps=20, time_power=1.0).times,
                       VPSchedule("linear", num_steps=20).times)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_powers_are_refused(value):
    with pytest.raises(ValueError, match="time_power must be a finite number > 0"):
        VPSchedule("linear", num_steps=4, time_power=value)


def test_a_diffusers_spacing_refuses_a_bent_grid():
    with pytest.raises(ValueError, match="time_power=2 bends the uniform grid"):
        VPSchedule("discrete", num_steps=2, alphas_cumprod=[0.9, 0.5, 0.2, 0.1], time_power=2.0)


def test_a_grid_fine_near_zero_makes_euler_maruyama_accurate_at_m_20():
    """Exact laws: the uniform grid is 2.6× too wide (the issue's 0.263); ρ = 2 is within 15%."""
    uniform = _exact_em_sd(VPSchedule("linear", num_steps=20))
    bent = _exact_em_sd(VPSchedule("linear", num_steps=20, time_power=2.0))
    assert uniform == pytest.approx(0.264, abs=0.002)
    assert abs(bent / S - 1) < 0.15 < abs(uniform / S - 1)


def test_the_sampler_on_a_bent_grid_has_the_exact_discrete_law(generator):
    """20,000 Euler–Maruyama samples on each grid: their sd is that grid's exact recursion's within 5
    standard errors (SE of an sd ≈ sd/√(2n)); against the other grid's exact law it fails (control:
    the check sees which grid the sampler stepped on)."""
    n = 20_000
    grids = {power: VPSchedule("linear", num_steps=20, time_power=power) for power in (1.0, 2.0)}
    exact = {power: _exact_em_sd(schedule) for power, schedule in grids.items()}
    for power, schedule in grids.items():
        x0 = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        sd = float(sample(euler_maruyama_step, _exact_score(schedule), x0, schedule=schedule, generator=generator,
                          prediction="score").std())
        other = 2.0 if power == 1.0 else 1.0
        assert abs(sd - exact[power]) < 5 * exact[power] / math.sqrt(2 * n)
        assert abs(sd - exact[other]) > 5 * exact[other] / math.sqrt(2 * n)


def test_the_path_kl_weighs_each_step_by_its_own_length():
    schedule = VPSchedule("linear", num_steps=5, time_power=3.0)
    kl = GirsanovKL(torch.nn.Linear(1, 1), schedule, prediction="score")
    t = schedule.times
    expected = [0.5 * float(schedule.beta(t[m])) * float(t[m] - t[m + 1]) for m in range(5)]
    assert kl.step_weights == pytest.approx(expected, rel=1e-12)


def test_finetune_takes_the_power_and_checks_it():
    assert ft.Config(time_power=2.0).time_power == 2.0
    assert ft.Config().time_power is None  # the model's default grid
    for bad in (-1.0, 0.0):  # 0.0: the former sentinel for the model's default
        with pytest.raises(ConfigError, match=r"'time_power' must be None \(the default\) or > 0"):
            ft.Config(time_power=bad)
