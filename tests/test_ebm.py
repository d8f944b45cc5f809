"""EBM training with Γ_ref: the minibatch estimator (exact), MLE on Gaussian data (statistical), the experiment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import Z, assert_close64, energy_mlp64, randn64

from implicit_diffusion.algorithms import SingleLoop
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import ebm
from implicit_diffusion.metrics import mmd2
from implicit_diffusion.models import GaussianPotential
from implicit_diffusion.objectives import ContrastiveKL, MinibatchContrastiveKL
from implicit_diffusion.runtime.config import build_config, load_config_file
from implicit_diffusion.runtime.runner import execute


def _param_grad(V, point):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(V(point[None]).sum(), list(V.parameters()))])


@pytest.mark.parametrize("beta, alpha", [(1.0, 0.0), (0.7, 0.3)])
def test_minibatch_surrogate_gradient_is_gamma_ref_by_hand(generator, beta, alpha):
    """∇θ of the surrogate = β(mean_b ∇V(y_b) − mean_i ∇V(xᵢ)) + α(mean_b 2V∇V(y_b) + mean_i 2V∇V(xᵢ))."""
    V = energy_mlp64()
    data, x = randn64(generator, 30, 2), randn64(generator, 9, 2)
    est = MinibatchContrastiveKL(data, 6, generator=torch.Generator().manual_seed(11), weight=beta,
                                 energy_penalty=alpha)
    surrogate = est(V, x)
    V.zero_grad()
    surrogate.backward(V)
    got = torch.cat([p.grad.reshape(-1) for p in V.parameters()])

    idx = torch.randint(0, 30, (6,), generator=torch.Generator().manual_seed(11))  # the documented draw
    y = data[idx]
    want = torch.zeros_like(got)
    for pts, sign in ((y, 1.0), (x, -1.0)):
        for p in pts:
            v = float(V(p[None]).detach())
            want += (sign * beta + 2 * alpha * v) * _param_grad(V, p) / len(pts)
    assert_close64(got, want)
    assert_close64(surrogate.stats["energy_gap"], V(y).mean() - V(x).mean())
    if alpha == 0.0:  # the same as the full-reference estimator with the batch as its reference
        ref = ContrastiveKL(y, beta)(V, x)
        V.zero_grad()
        ref.backward(V)
        assert_close64(torch.cat([p.grad.reshape(-1) for p in V.parameters()]), want)


def test_minibatch_estimator_rejects_bad_input():
    g = torch.Generator()
    with pytest.raises(ValueError, match="batch_size"):
        MinibatchContrastiveKL(torch.zeros(3, 2), 0, generator=g)
    with pytest.raises(ValueError, match="energy_penalty"):
        MinibatchContrastiveKL(torch.zeros(3, 2), 2, generator=g, energy_penalty=-1.0)
    with pytest.raises(ValueError, match="n_data"):
        MinibatchContrastiveKL(torch.zeros(3), 2, generator=g)


def _stationary_theta_variance(gamma, eta, n_particles, batch_var):
    """Var(θ − data mean) at stationarity of the exact linear recursion of one coordinate:
    m⁺ = (1−γ)m + γθ + √(2γ/N) ξ,  θ⁺ = θ − η(m − b),  Var(b) = s²/B (batch mean, with replacement)."""
    A = np.array([[1 - gamma, gamma], [-eta, 1.0]])
    Q = np.diag([2 * gamma / n_particles, eta**2 * batch_var])
    S = np.zeros((2, 2))
    for _ in range(20000):
        S = A @ S @ A.T + Q
    return S[1, 1], max(abs(np.linalg.eigvals(A)))


def _gaussian_mle_errors(generator, sign):
    D, n_data, N, B, gamma, eta, K = 100, 1000, 500, 200, 0.1, 0.05, 1000
    data = 2.0 + randn64(generator, n_data, D)
    V = GaussianPotential(torch.zeros(D, dtype=torch.float64))
    est = MinibatchContrastiveKL(data, B, generator=generator, weight=sign)
    algo = SingleLoop(V, est, torch.optim.SGD(V.parameters(), lr=eta), step_size=gamma)
    algo.run(randn64(generator, N, D), K, generator=generator)
    var, rho = _stationary_theta_variance(gamma, eta, N, float(data.var(0, unbiased=False).mean()) / B)
    assert rho**K < 1e-12  # the initial error 2 has decayed far below the noise
    return (V.mean.detach() - data.mean(0)), var


def _mle_check(e, var):
    """D = 100 coordinates, e_j ~ N(0, σ²) at stationarity: |mean e| ≤ Z σ/√D and |mean e²/σ² − 1| ≤ Z √(2/D)."""
    D = e.numel()
    return bool(abs(float(e.mean())) <= Z * math.sqrt(var / D)
                and abs(float((e**2).mean()) / var - 1) <= Z * math.sqrt(2 / D))


def test_single_loop_gamma_ref_converges_to_the_gaussian_mle(generator):
    """π*(θ) = N(θ, I): the MLE is the data mean; θ_K − mean has the exactly known stationary variance."""
    e, var = _gaussian_mle_errors(generator, 1.0)
    assert _mle_check(e, var)
    # negative control: Γ with the wrong sign climbs the KL instead
    e_bad, var = _gaussian_mle_errors(generator, -1.0)
    assert not _mle_check(e_bad, var)


TINY = dict(num_train=300, num_heldout=200, num_particles=200, batch_size=100, num_steps=40, nested_inner_steps=10,
            hidden=16, eval_every=10, fresh_steps=20, progress=False)


@pytest.mark.parametrize("data", ["moons", "digits"])
def test_tiny_config_runs_through_execute_and_writes_its_files(tmp_path, data):
    cfg = ebm.EBMConfig(**TINY, data=data)
    result, files = execute(ebm, cfg, tmp_path)
    picture = "density.png" if data == "moons" else "samples.png"
    assert {"config.toml", "metrics.jsonl"} <= set(files)  # the runner's own files (it may add others)
    assert files[-5:] == ["energy_single.safetensors", "energy_nested.safetensors", "summary.json", "mmd.png", picture]
    for f in files:
        assert (tmp_path / f).stat().st_size > 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["single"]["sampler_steps"] == s["nested"]["sampler_steps"] == 40  # equal budget
    assert s["single"]["updates"] == 40 and s["nested"]["updates"] == 4
    assert list(result.methods["single"].eval_steps) == [0, 10, 20, 30, 40]
    assert list(result.methods["nested"].eval_steps) == [10, 20, 30, 40]
    assert build_config(ebm.Config, load_config_file(tmp_path / "config.toml")) == cfg  # config.toml reads back
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"single", "nested"}
    assert "nested (T=10)" in ebm.table(result)


def test_same_seed_same_run_bit_for_bit():
    cfg = ebm.EBMConfig(**TINY, seed=3)
    a, b = ebm.run(cfg), ebm.run(cfg)
    for key in ("single", "nested"):
        assert np.array_equal(a.methods[key].particles, b.methods[key].particles)
        assert np.array_equal(a.methods[key].mmd_particles, b.methods[key].mmd_particles)
    assert ebm.run(ebm.EBMConfig(**TINY, nested_budget_factor=3)).methods["nested"].sampler_steps == 120
    c = ebm.run(ebm.EBMConfig(**TINY, seed=4))
    assert not np.array_equal(a.methods["single"].particles, c.methods["single"].particles)


def _block_mmd(x, y, blocks=10):
    """Mean of MMD² over disjoint blocks and its standard error (independent blocks: sd/√blocks)."""
    vals = torch.stack([mmd2(a, b, (0.1, 0.3, 1.0)) for a, b in zip(x.chunk(blocks), y.chunk(blocks))]).double()
    return float(vals.mean()), float(vals.std()) / math.sqrt(blocks)


def _mmd_drop(seed, lr):
    cfg = ebm.EBMConfig(num_train=2000, num_heldout=1000, num_particles=1000, num_steps=500, hidden=64, compare=False,
                        fresh_steps=1, eval_every=500, lr=lr, seed=seed, progress=False)
    r = ebm.run(cfg)
    held = torch.from_numpy(r.heldout)
    m0, se0 = _block_mmd(torch.from_numpy(r.initial), held)
    m1, se1 = _block_mmd(torch.from_numpy(r.methods["single"].particles), held)
    return m0 - m1, math.sqrt(se0**2 + se1**2)


@pytest.mark.slow
def test_single_loop_mmd_on_moons_falls_well_below_its_start(seed):
    """500 updates on moons: MMD²(particles, held-out) drops by more than Z standard errors (block estimates);
    negative control: with lr = 1e-9 (θ frozen in effect) the particles only diffuse and the check fails."""
    drop, se = _mmd_drop(seed, 1e-3)
    assert drop > Z * se
    drop, se = _mmd_drop(seed, 1e-9)
    assert not drop > Z * se


@pytest.mark.parametrize("overrides, key", [
    ({"data": "mnist"}, "data"), ({"num_particles": 0}, "num_particles"), ({"step_size": -0.1}, "step_size"),
    ({"num_heldout": 1}, "num_heldout"), ({"nested_budget_factor": 0}, "nested_budget_factor"),
({"mmd_bandwidths": [0.0]}, "mmd_bandwidths"),
    ({"data": "digits", "num_heldout": 900}, "num_heldout"), ({"nested_inner_steps": 10**6}, "nested_inner_steps"),
    ({"lr": 0.0}, "lr"),
])
def test_bad_config_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_config(ebm.Config, overrides)


def test_defaults_resolve_per_data_set():
    assert ebm.EBMConfig().resolved() == (0.01, 2.0, (0.1, 0.3, 1.0), 0.1)
    assert ebm.EBMConfig(data="digits", step_size=0.005).resolved() == (0.005, 0.5, (1.0, 2.0, 4.0), 0.01)
    assert ebm.EBMConfig(energy_penalty=0.0, mmd_bandwidths=(2.0,)).resolved()[2:] == ((2.0,), 0.0)
