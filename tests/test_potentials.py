"""Potentials V(x, θ): closed forms against direct formulas and autograd (exact, float64),
the responsibilities memo of GaussianMixture, constructors and errors, and exact sampling."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, energy_mlp64, f64
from torch import nn
from torch.func import functional_call

from implicit_diffusion.models import (
    HEXAGON_THETA0,
    EnergyMLP,
    FunctionPotential,
    GaussianMixture,
    GaussianPotential,
    ModulePotential,
    Potential,
    as_potential,
    hexagon_centres,
    hexagon_mixture,
)

MEANS = [[0.0, 0.0], [2.0, -1.0], [-1.5, 2.5]]
LOGITS = [0.3, -0.7, 1.1]


def mixture(variances, logits=LOGITS) -> GaussianMixture:
    return GaussianMixture(f64(MEANS), f64(variances), f64(logits))


def points(generator: torch.Generator, n: int = 17, dim: int = 2, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, dim, generator=generator, dtype=torch.float64)


def direct_mixture_energy(x: torch.Tensor, means, variances, logits) -> torch.Tensor:
    """−log Σₖ wₖ (2πσₖ²)^(−d/2) exp(−‖x − cₖ‖²/(2σₖ²)), written out with plain densities."""
    means, variances, logits = f64(means), f64(variances).expand(len(means)), f64(logits)
    w = torch.exp(logits) / torch.exp(logits).sum()
    d = x.shape[1]
    dens = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in range(len(means)):
        sq = ((x - means[k]) ** 2).sum(1)
        dens = dens + w[k] * (2 * math.pi * variances[k]) ** (-d / 2) * torch.exp(-sq / (2 * variances[k]))
    return -torch.log(dens)


def autograd_grad_x(potential, x: torch.Tensor) -> torch.Tensor:
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(potential(xr).sum(), xr)
    return g


def autograd_param_grads(potential, y: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """∇θ Σᵢ wᵢ V(yᵢ, θ) by autograd of the surrogate (points and weights constants)."""
    params = list(potential.parameters())
    loss = (w * potential(y)).sum()
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def closed_form_param_grads(potential, y: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    for p in potential.parameters():
        p.grad = None
    potential.accumulate_param_grad(y, w)
    return [p.grad.clone() for p in potential.parameters()]


# ---------------------------------------------------------------------------------------------
# GaussianMixture: energy, ∇ₓV, ∇θV
# ---------------------------------------------------------------------------------------------

VARIANCE_CASES = [pytest.param(1.0, id="shared-unit"), pytest.param(0.7, id="shared-0.7"),
                  pytest.param([0.5, 1.0, 2.0], id="different")]


@pytest.mark.parametrize("variances", VARIANCE_CASES)
def test_mixture_energy_matches_direct_formula(variances, generator):
    V = mixture(variances)
    x = points(generator)
    assert V.weights.dtype == torch.float64
    assert_close64(V(x).detach(), direct_mixture_energy(x, MEANS, variances, LOGITS))


@pytest.mark.parametrize("variances", VARIANCE_CASES)
def test_mixture_component_log_densities(variances, generator):
    V = mixture(variances)
    x = points(generator)
    var = f64(variances).expand(3)
    expected = torch.stack([
        -((x - f64(MEANS)[k]) ** 2).sum(1) / (2 * var[k]) - math.log(2 * math.pi * float(var[k]))
        for k in range(3)
    ])
    assert_close64(V.component_log_densities(x), expected)


def test_mixture_shared_variance_flag():
    """The shared-variance fast path is taken exactly when all variances are equal."""
    assert mixture(1.0)._shared_variance
    assert mixture([0.7, 0.7, 0.7])._shared_variance
    assert not mixture([0.5, 1.0, 2.0])._shared_variance


@pytest.mark.parametrize("variances", VARIANCE_CASES)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_mixture_grad_x_matches_autograd(variances, grad_mode, generator):
    V = mixture(variances)
    x = points(generator)
    expected = autograd_grad_x(V, x)
    with torch.set_grad_enabled(grad_mode):
        got = V.grad_x(x)
    assert got.shape == x.shape
    assert_close64(got.detach(), expected)


@pytest.mark.parametrize("variances", VARIANCE_CASES)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_mixture_grad_x_any_memory_layout(variances, grad_mode, generator):
    """Particles stored dimension-major ((d, N) in memory, x = y.t()) and non-contiguous slices give
    the same ∇ₓV as row-major ones (exact), with the particles' shape."""
    V = mixture(variances)
    x = points(generator, n=19, dim=2)
    expected = autograd_grad_x(V, x)
    layouts = {"dim-major": x.t().contiguous().t(), "strided": torch.stack([x, -x], 2)[:, :, 0],
               "single": x[:1].t().contiguous().t()}
    assert layouts["dim-major"].stride() == (1, 19)
    for name, xl in layouts.items():
        with torch.set_grad_enabled(grad_mode):
            got = V.grad_x(xl)
        assert got.shape == xl.shape, name
        assert_close64(got.detach(), expected[: xl.shape[0]])


@pytest.mark.parametrize("variances", VARIANCE_CASES)
def test_mixture_grad_x_closed_form_by_hand(variances, generator):
    """∇ₓV = Σₖ rₖ(x)(x − cₖ)/σₖ², with rₖ computed from the direct densities."""
    V = mixture(variances)
    x = points(generator)
    var = f64(variances).expand(3)
    w = torch.softmax(f64(LOGITS), 0)
    dens = torch.stack([
        w[k] * (2 * math.pi * var[k]) ** -1 * torch.exp(-((x - f64(MEANS)[k]) ** 2).sum(1) / (2 * var[k]))
        for k in range(3)
    ])
    r = dens / dens.sum(0)
    expected = sum(r[k][:, None] * (x - f64(MEANS)[k]) / var[k] for k in range(3))
    with torch.no_grad():
        assert_close64(V.responsibilities(x), r)
        assert_close64(V.grad_x(x), expected)


@pytest.mark.parametrize("variances", VARIANCE_CASES)
def test_mixture_param_grad_matches_autograd_of_surrogate(variances, generator):
    V = mixture(variances)
    y = points(generator, n=23)
    w = torch.randn(23, generator=generator, dtype=torch.float64)
    expected = autograd_param_grads(V, y, w)
    got = closed_form_param_grads(V, y, w)
    assert len(got) == 1
    assert_close64(got[0], expected[0])
    # and it is ∑ wᵢ (softmax(θ) − r(yᵢ)) by hand
    with torch.no_grad():
        r = V.responsibilities(y)
    assert_close64(got[0], w.sum() * torch.softmax(f64(LOGITS), 0) - r @ w)


def test_mixture_param_grad_accumulates(generator):
    """accumulate_param_grad *adds* to an existing .grad (it is a backward())."""
    V = mixture([0.5, 1.0, 2.0])
    y = points(generator)
    w = torch.randn(17, generator=generator, dtype=torch.float64)
    once = closed_form_param_grads(V, y, w)[0]
    V.accumulate_param_grad(y, w)
    assert_close64(V.logits.grad, 2 * once)


def test_mixture_grad_x_is_differentiable_in_theta(generator):
    """With grad mode on, ∇ₓV from the closed form carries a graph to θ (matches double autograd)."""
    V = mixture([0.5, 1.0, 2.0])
    x = points(generator, n=5)
    u = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    (got,) = torch.autograd.grad((V.grad_x(x) * u).sum(), V.logits)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(V(xr).sum(), xr, create_graph=True)
    (expected,) = torch.autograd.grad((gx * u).sum(), V.logits)
    assert_close64(got, expected)


def test_mixture_constructor_errors():
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="variances must be > 0"):
        GaussianMixture(torch.zeros(3, 2), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits must have shape \(3,\)"):
        GaussianMixture(torch.zeros(3, 2), 1.0, torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# GaussianMixture: the responsibilities memo
# ---------------------------------------------------------------------------------------------


def fresh_responsibilities(V: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """r(x) bypassing the memo (it is used only outside grad mode)."""
    with torch.enable_grad():
        return V.responsibilities(x).detach()


def hexagon64() -> GaussianMixture:
    return hexagon_mixture(dtype=torch.float64)


def test_memo_is_reused_for_same_x_and_theta(generator):
    """The memo exists (same tensor returned) — so the staleness tests below test something."""
    V = hexagon64()
    x = points(generator)
    with torch.no_grad():
        assert V.responsibilities(x) is V.responsibilities(x)


def test_memo_not_stale_after_x_mutated_in_place(generator):
    V = hexagon64()
    x = points(generator)
    with torch.no_grad():
        r0 = V.responsibilities(x).clone()
        g0 = V.grad_x(x).clone()
        x.add_(1.5)
        r1 = V.responsibilities(x)
        g1 = V.grad_x(x)
    assert not torch.allclose(r0, r1)
    assert_close64(r1, fresh_responsibilities(V, x))
    assert_close64(g1, autograd_grad_x(V, x))
    assert not torch.allclose(g0, g1)


def test_memo_not_stale_after_view_of_x_mutated(generator):
    """x a view of a buffer that is then written through the base: the version counter is shared."""
    V = hexagon64()
    base = points(generator, n=40)
    x = base[::2]
    with torch.no_grad():
        V.responsibilities(x)
        base.mul_(-1.0)
        r1 = V.responsibilities(x)
    assert_close64(r1, fresh_responsibilities(V, x))


def test_memo_not_stale_for_new_x_with_same_values(generator):
    V = hexagon64()
    x = points(generator)
    with torch.no_grad():
        V.responsibilities(x)
        y = x + 1.0
        assert_close64(V.responsibilities(y), fresh_responsibilities(V, y))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.3),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.3, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.3, fused=True),
}


@pytest.mark.parametrize(
    "opt_name",
    [
        "sgd",
        "sgd-momentum",
        "adam",
        "adam-foreach",
        "adam-fused",  # the fused kernel does not bump θ's version counter: the memo compares values
    ],
)
def test_memo_not_stale_after_optimizer_step(opt_name, generator):
    """Single-loop order: r(x_k) at θ_k for ∇ₓV and ∇θV, optimizer step, then r(x_k) at θ_{k+1}."""
    V = hexagon64()
    opt = OPTIMIZERS[opt_name](V.parameters())
    x = points(generator, n=64)
    w = torch.randn(64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        V.grad_x(x)
    opt.zero_grad()
    V.accumulate_param_grad(x, w)
    opt.step()
    with torch.no_grad():
        r1 = V.responsibilities(x)
        g1 = V.grad_x(x)
    assert_close64(r1, fresh_responsibilities(V, x))
    assert_close64(g1, autograd_grad_x(V, x))


def test_memo_not_stale_after_load_state_dict(generator):
    V = hexagon64()
    x = points(generator)
    with torch.no_grad():
        r0 = V.responsibilities(x).clone()
    V.load_state_dict({**V.state_dict(), "logits": f64([0.0, 3.0, 0.0, -1.0, 0.0, 2.0])})
    with torch.no_grad():
        r1 = V.responsibilities(x)
    assert not torch.allclose(r0, r1)
    assert_close64(r1, fresh_responsibilities(V, x))


def test_memo_not_stale_after_vector_to_parameters(generator):
    V = hexagon64()
    x = points(generator)
    with torch.no_grad():
        V.responsibilities(x)
    torch.nn.utils.vector_to_parameters(f64([0.0, 3.0, 0.0, -1.0, 0.0, 2.0]), V.parameters())
    with torch.no_grad():
        r1 = V.responsibilities(x)
    assert_close64(r1, fresh_responsibilities(V, x))


class _Responsibilities(nn.Module):
    """Lets functional_call swap θ while calling responsibilities / grad_x, not just forward."""

    def __init__(self, V: GaussianMixture, what: str):
        super().__init__()
        self.V = V
        self.what = what

    def forward(self, x):
        return getattr(self.V, self.what)(x)


@pytest.mark.parametrize("what", ["responsibilities", "grad_x"])
def test_memo_respects_functional_call(what, generator):
    V = hexagon64()
    x = points(generator)
    other = f64([0.0, 3.0, 0.0, -1.0, 0.0, 2.0])
    V_other = hexagon_mixture(other, dtype=torch.float64)
    wrapper = _Responsibilities(V, what)
    with torch.no_grad():
        before = getattr(V, what)(x).clone()
        swapped = functional_call(wrapper, {"V.logits": other}, (x,))
        after = getattr(V, what)(x)
        expected_swapped = getattr(V_other, what)(x.clone())
    assert_close64(swapped, expected_swapped)
    assert not torch.allclose(swapped, before)
    assert_close64(after, before)  # and the original θ is back, not the swapped one


def test_memo_respects_functional_call_forward_energy(generator):
    """The KL estimator's use: functional_call(potential, θ₀-state, x) after r(x) at θ was memoized."""
    V = hexagon64()
    x = points(generator)
    V0 = hexagon_mixture(dtype=torch.float64)
    with torch.no_grad():
        V.logits.add_(f64([0.0, 2.0, 0.0, 0.0, -1.0, 0.0]))
        V.grad_x(x)
        ref = functional_call(V, V0.state_dict(), (x,))
    assert_close64(ref, V0(x).detach())


def test_mixture_grad_x_under_inference_mode(generator):
    V = hexagon64()
    x = points(generator)
    expected = autograd_grad_x(V, x)
    with torch.inference_mode():
        got = V.grad_x(x.clone())
    assert_close64(got, expected)


# ---------------------------------------------------------------------------------------------
# GaussianPotential
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", [1.0, 0.3, 2.5])
def test_gaussian_energy_and_grads(variance, generator):
    mu = f64([0.5, -1.0, 2.0])
    V = GaussianPotential(mu, variance)
    x = points(generator, dim=3)
    assert_close64(V(x).detach(), ((x - mu) ** 2).sum(1) / (2 * variance))
    assert_close64(V.grad_x(x).detach(), autograd_grad_x(V, x))
    assert_close64(V.grad_x(x).detach(), (x - mu) / variance)
    w = torch.randn(17, generator=generator, dtype=torch.float64)
    expected = autograd_param_grads(V, x, w)
    got = closed_form_param_grads(V, x, w)
    assert_close64(got[0], expected[0])
    assert_close64(got[0], -(w[:, None] * (x - mu)).sum(0) / variance)
    V.accumulate_param_grad(x, w)  # accumulates
    assert_close64(V.mean.grad, 2 * expected[0])


def test_gaussian_potential_errors_and_copy():
    with pytest.raises(ValueError, match="variance must be > 0"):
        GaussianPotential(torch.zeros(2), 0.0)
    mu = torch.zeros(2)
    V = GaussianPotential(mu)
    with torch.no_grad():
        V.mean.add_(1.0)
    assert mu.tolist() == [0.0, 0.0]  # the parameter is a copy of the argument


# ---------------------------------------------------------------------------------------------
# The generic autograd path (Potential base class): EnergyMLP, FunctionPotential
# ---------------------------------------------------------------------------------------------




def test_energy_mlp_shapes_and_generic_grads(generator):
    V = energy_mlp64(3)
    x = points(generator, n=11, dim=3)
    assert V(x).shape == (11,)
    assert V(x[:1]).shape == (1,)
    with torch.no_grad():
        g = V.grad_x(x)
    assert g.shape == (11, 3) and g.grad_fn is None and not g.requires_grad
    assert_close64(g, autograd_grad_x(V, x))
    assert all(p.grad is None for p in V.parameters())  # grad_x under no_grad touches no .grad
    w = torch.randn(11, generator=generator, dtype=torch.float64)
    expected = autograd_param_grads(V, x, w)
    got = closed_form_param_grads(V, x, w)
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        assert_close64(a, b)


def test_generic_grad_x_in_grad_mode_keeps_graph(generator):
    V = energy_mlp64(3)
    x = points(generator, n=4, dim=3)
    g = V.grad_x(x)
    assert g.requires_grad  # create_graph: a step built on it is differentiable in θ
    (gt,) = torch.autograd.grad(g.sum(), V.net[0].weight)
    assert torch.isfinite(gt).all() and gt.abs().sum() > 0


def test_energy_mlp_errors():
    with pytest.raises(ValueError, match=">= 1"):
        EnergyMLP(0)
    with pytest.raises(ValueError, match=">= 1"):
        EnergyMLP(2, hidden=0)
    with pytest.raises(ValueError, match=">= 1"):
        EnergyMLP(2, depth=0)


def quad_fn(x, theta):
    return ((x - theta) ** 2).sum(-1) / 2


def dict_fn(x, params):
    return ((x - params["loc"]) ** 2).sum(-1) * params["scale"] / 2


def test_as_potential_function_with_tensor_params(generator):
    theta = f64([1.0, -2.0])
    V = as_potential(quad_fn, theta)
    assert isinstance(V, FunctionPotential)
    params = dict(V.named_parameters())
    assert list(params) == ["theta"]
    assert params["theta"] is not theta  # a copy becomes the parameter
    x = points(generator)
    assert_close64(V(x).detach(), quad_fn(x, theta))
    assert_close64(V.grad_x(x).detach(), x - theta)
    w = torch.randn(17, generator=generator, dtype=torch.float64)
    assert_close64(closed_form_param_grads(V, x, w)[0], -(w[:, None] * (x - theta)).sum(0))


def test_as_potential_function_with_dict_params(generator):
    loc, scale = f64([1.0, -2.0]), f64(0.5)
    V = as_potential(dict_fn, {"loc": loc, "scale": scale})
    names = sorted(n for n, _ in V.named_parameters())
    assert names == ["theta.loc", "theta.scale"]
    x = points(generator)
    assert_close64(V(x).detach(), dict_fn(x, {"loc": loc, "scale": scale}))
    assert_close64(V.grad_x(x).detach(), 0.5 * (x - loc))
    w = torch.randn(17, generator=generator, dtype=torch.float64)
    got = closed_form_param_grads(V, x, w)
    expected = autograd_param_grads(V, x, w)
    for a, b in zip(got, expected):
        assert_close64(a, b)
    by_name = dict(zip([n for n, _ in V.named_parameters()], got))
    assert_close64(by_name["theta.scale"], (w * ((x - loc) ** 2).sum(1) / 2).sum())


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(f64([0.5, 0.5]))

    def forward(self, x):
        return ((x - self.loc) ** 2).sum(-1)


def test_as_potential_module_and_potential(generator):
    m = _Quadratic()
    V = as_potential(m)
    assert isinstance(V, ModulePotential) and isinstance(V, Potential)
    assert [p is m.loc for p in V.parameters()] == [True]  # θ are the module's own parameters
    x = points(generator)
    assert_close64(V.grad_x(x).detach(), 2 * (x - m.loc.detach()))
    G = GaussianPotential(torch.zeros(2))
    assert as_potential(G) is G


def test_as_potential_errors():
    G = GaussianPotential(torch.zeros(2))
    with pytest.raises(ValueError, match="params must be None when a Potential"):
        as_potential(G, torch.zeros(2))
    with pytest.raises(ValueError, match="params must be None when an nn.Module"):
        as_potential(_Quadratic(), torch.zeros(2))
    with pytest.raises(ValueError, match="needs params"):
        as_potential(quad_fn)
    with pytest.raises(TypeError, match="expected a Potential, an nn.Module or a function"):
        as_potential(42)
    with pytest.raises(TypeError, match="params must be a Tensor or a mapping.*list"):
        as_potential(quad_fn, [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# The §5.1 hexagon
# ---------------------------------------------------------------------------------------------


def test_hexagon_centres_values():
    c = hexagon_centres(dtype=torch.float64)
    s3 = math.sqrt(3.0)
    expected = f64([[4.0, 0.0], [2.0, 2 * s3], [-2.0, 2 * s3], [-4.0, 0.0], [-2.0, -2 * s3], [2.0, -2 * s3]])
    assert c.shape == (6, 2) and c.dtype == torch.float64
    assert_close64(c, expected)
    assert_close64(c[3:], -c[:3])
    assert_close64(c.norm(dim=1), torch.full((6,), 4.0, dtype=torch.float64))
    assert_close64(hexagon_centres(2.0, dtype=torch.float64), expected / 2)
    assert hexagon_centres().dtype == torch.float32


def test_hexagon_mixture_parameters():
    V = hexagon_mixture(dtype=torch.float64)
    assert_close64(V.logits.detach(), f64(HEXAGON_THETA0))
    assert_close64(V.variances, torch.ones(6, dtype=torch.float64))
    assert_close64(V.means, hexagon_centres(dtype=torch.float64))
    e = math.exp(1.5)
    assert_close64(V.weights.detach(), f64([e, 1, e, 1, e, 1]) / (3 * e + 3))


# ---------------------------------------------------------------------------------------------
# GaussianMixture.sample: exact draws
# ---------------------------------------------------------------------------------------------

FAR_MEANS = [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [-100.0, -100.0]]
FAR_VARS = [1.0, 0.25, 4.0, 2.0]
FAR_LOGITS = [0.0, 1.0, -1.0, 0.5]


def frequencies_match(counts: torch.Tensor, weights: torch.Tensor, n: int, z: float = Z) -> bool:
    """|countₖ/n − wₖ| ≤ z √(wₖ(1 − wₖ)/n) for every k (binomial SE)."""
    freq = counts.double() / n
    tol = z * torch.sqrt(weights * (1 - weights) / n)
    return bool(((freq - weights).abs() <= tol).all())


def test_mixture_sample_frequencies_and_shapes(generator):
    """n = 40,000 draws; components 100 apart (misassignment probability < 1e-100), so the nearest
    centre is the component. Frequencies within 5 binomial SEs of softmax(θ); within-component
    mean within 5 σₖ/√nₖ and variance within 5 σₖ²√(2/(nₖ−1)) per coordinate. Negative control:
    the same frequency check against uniform weights fails (|wₖ − 1/4| ≥ 0.08 ≫ 5 SE ≈ 0.011)."""
    n = 40_000
    V = GaussianMixture(f64(FAR_MEANS), f64(FAR_VARS), f64(FAR_LOGITS))
    x = V.sample(n, generator=generator)
    assert x.shape == (n, 2) and x.dtype == torch.float64 and not x.requires_grad
    idx = torch.cdist(x, V.means).argmin(1)
    counts = torch.bincount(idx, minlength=4)
    w = V.weights.detach()
    assert frequencies_match(counts, w, n)
    assert not frequencies_match(counts, torch.full((4,), 0.25, dtype=torch.float64), n)
    for k in range(4):
        r = x[idx == k] - V.means[k]
        nk, var = r.shape[0], FAR_VARS[k]
        assert (r.mean(0).abs() <= Z * math.sqrt(var / nk)).all()
        assert ((r.var(0) - var).abs() <= Z * var * math.sqrt(2 / (nk - 1))).all()


def test_mixture_sample_reproducible(generator):
    V = hexagon64()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    state = torch.get_rng_state()
    a, b = V.sample(100, generator=g1), V.sample(100, generator=g2)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_energy_mlp_reset_parameters_draws_nn_linear_law_from_the_generator():
    """θ₀ from an explicit generator: the same seed gives the same weights, another seed others; every
    entry lies in ±1/√fan_in and the first layer's 64·256 weights have the uniform law's variance
    bound²/3 (to 5 standard errors of a sample variance); the global RNG is not touched."""
    a, b, c = (EnergyMLP(64, hidden=256, depth=2) for _ in range(3))  # construction draws from the global RNG
    state = torch.random.get_rng_state()
    for net, seed in ((a, 3), (b, 3), (c, 4)):
        net.reset_parameters(torch.Generator().manual_seed(seed))
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    for layer in (m for m in a.net if isinstance(m, nn.Linear)):
        bound = 1 / math.sqrt(layer.in_features)
        assert all(float(p.detach().abs().max()) <= bound for p in (layer.weight, layer.bias))
    w = a.net[0].weight.detach().double().flatten()
    var, n = (1 / 64) / 3, w.numel()
    assert abs(float(w.var()) - var) < Z * var * math.sqrt(0.8 / n)  # Var(sample variance) ≈ (μ₄ − σ⁴)/n, μ₄ = 1.8σ⁴
