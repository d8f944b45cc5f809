"""Shared fixtures: an explicit random generator and float64 helpers.

Statistical tests draw all their randomness from the ``generator`` fixture (never the global
RNG). Its seed is 0 by default; pass ``--seed N`` to re-run the suite with another seed, e.g.
to check that the statistical tests pass over a sweep of seeds::

    for s in $(seq 0 19); do python -m pytest tests -q -p no:cacheprovider --seed $s || echo "seed $s"; done
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch


@contextlib.contextmanager
def crash_at(owner: type, method: str, at: int):
    """Within the block, ``owner.method`` raises ``RuntimeError("simulated crash")`` when called with its
    first argument after ``self`` (a step counter: ``EvalRecorder.record(done, x)``,
    ``_LossLog.__call__(k, loss)``) equal to ``at``: a run that fails part-way, after its last checkpoint."""
    original = getattr(owner, method)

    def crash(self, step, *args, **kwargs):
        if step == at:
            raise RuntimeError("simulated crash")
        return original(self, step, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(owner, method, crash)
        yield


# z-score used for statistical tolerances: P(|N(0,1)| > 5) ≈ 5.7e-7 per check.
Z = 5.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        action="store",
        type=int,
        default=0,
        help="seed of the `generator` fixture used by the statistical tests (default 0)",
    )


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The base seed of this run (``--seed``, default 0)."""
    return int(request.config.getoption("--seed"))


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``--seed`` (0 by default)."""
    return torch.Generator().manual_seed(seed)


def f64(*values) -> torch.Tensor:
    """A float64 tensor from Python numbers or nested lists."""
    if len(values) == 1:
        return torch.as_tensor(values[0], dtype=torch.float64)
    return torch.tensor(values, dtype=torch.float64)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Exact-test comparison: float64 on both sides, 1e-10 relative tolerance."""
    assert actual.dtype == torch.float64, f"expected a float64 result, got {actual.dtype}"
    torch.testing.assert_close(actual, expected.to(torch.float64), rtol=rtol, atol=atol)


def same_tensors(a: dict, b: dict) -> bool:
    """Two ``name → tensor`` dicts (safetensors contents, state dicts) hold the same names and
    bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mean_within(samples: torch.Tensor, mu: float, sd: float, z: float = Z) -> bool:
    """|mean(samples) − μ| ≤ z·sd/√n for i.i.d. draws with standard deviation ``sd``."""
    n = samples.numel()
    return abs(float(samples.mean()) - mu) <= z * sd / math.sqrt(n)


def var_within(samples: torch.Tensor, var: float, z: float = Z) -> bool:
    """|s² − σ²| ≤ z·σ²√(2/(n−1)) for i.i.d. Gaussian draws (SE of a sample variance)."""
    n = samples.numel()
    return abs(float(samples.var()) - var) <= z * var * math.sqrt(2.0 / (n - 1))


def randn64(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 draws from ``generator``."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def energy_mlp64(dim: int = 2):
    """A float64 EnergyMLP with fixed, moderately sized weights (seed 123)."""
    from implicit_diffusion.models import EnergyMLP

    g = torch.Generator().manual_seed(123)
    V = EnergyMLP(dim, hidden=8, depth=2).double()
    with torch.no_grad():
        for p in V.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return V


def assert_single_loop_matches_hand_loop(potential, estimator, sampler, x0: torch.Tensor, *, step_size: float,
                                         num_steps: int = 5, lr: float = 0.1, min_change: float = 0.0) -> None:
    """``SingleLoop(sampler=sampler)`` against a hand-written loop (Γ on p_k, one sampler step with
    θ_k, SGD on θ) from the same particles and generator seed: particles and θ must agree, the
    particles carry no autograd history, and some parameter moved by more than ``min_change``."""
    import copy

    from implicit_diffusion.algorithms import SingleLoop

    ref, start = copy.deepcopy(potential), copy.deepcopy(potential)
    algo = SingleLoop(potential, estimator, torch.optim.SGD(potential.parameters(), lr=lr), step_size=step_size,
                      sampler=sampler)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = algo.run(x0, num_steps, generator=g1)
    opt, xr = torch.optim.SGD(ref.parameters(), lr=lr), x0
    for _ in range(num_steps):
        with torch.no_grad():
            s = estimator(ref, xr)
            xr, _ = sampler(xr, ref, step_size=step_size, generator=g2)
        opt.zero_grad()
        s.backward(ref)
        opt.step()
    assert_close64(x, xr)
    for p, q in zip(potential.parameters(), ref.parameters()):
        assert_close64(p.detach(), q.detach())
    assert not x.requires_grad and x.grad_fn is None
    change = max(float((p - p0).detach().abs().max()) for p, p0 in zip(potential.parameters(), start.parameters()))
    assert change > min_change


def gaussian_data_score(schedule, s: float):
    """The exact score of N(0, s²) data on a VP schedule, −x/(ᾱ(t)s² + 1 − ᾱ(t)): ``score(x, t)``
    with x ``(B, 1)`` and t ``(B,)`` or 0-d."""
    def score(x, t):
        ab = schedule.alpha_bar(t.to(torch.float64))
        ab = ab[:, None] if ab.ndim else ab
        return -x / (ab * s**2 + (1 - ab)).to(x.dtype)
    return score


def gaussian_data_sampler_sd(step, schedule, s: float) -> float:
    """sd of x_M from x_0 ~ N(0, 1) for a diffusion ``step`` with the exact score of N(0, s²) data:
    each step is x ↦ a_m x + c_m z (read off the step with unit inputs), so the law is N(0, v_M)
    with v_{m+1} = a_m² v_m + c_m², exactly."""
    score = gaussian_data_score(schedule, s)
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    v = 1.0
    with torch.no_grad():
        for m in range(schedule.num_steps):
            a = float(step(one, score, m, schedule=schedule, noise=zero))
            c = float(step(zero, score, m, schedule=schedule, noise=one))
            v = a * a * v + c * c
    return math.sqrt(v)
