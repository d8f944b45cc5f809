"""User callables that return the wrong thing fail at the first step with an error naming them."""

import pytest
import torch

from implicit_diffusion import FunctionPotential, RewardEstimator, SingleLoop


def column_energy(x, theta):  # (N, 1) instead of (N,): would broadcast silently in Σ wᵢ V(yᵢ)
    return ((x - theta) ** 2).sum(-1, keepdim=True)


def good_energy(x, theta):
    return ((x - theta) ** 2).sum(-1)


def run_one_step(energy, reward):
    V = FunctionPotential(energy, torch.zeros(2))
    algo = SingleLoop(V, RewardEstimator(reward), torch.optim.SGD(V.parameters(), lr=0.1), step_size=0.1)
    g = torch.Generator().manual_seed(0)
    algo.run(torch.randn(8, 2, generator=g), 1, generator=g)


def test_energy_of_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"potential column_energy must return one value per particle, "
                                         r"shape \(8,\); got shape \(8, 1\)"):
        run_one_step(column_energy, lambda x: x[:, 0])


def test_surrogate_checks_the_energy_shape_too():
    from implicit_diffusion.objectives import Surrogate

    V = FunctionPotential(column_energy, torch.zeros(2))
    s = Surrogate((torch.zeros(4, 2),), (torch.ones(4),), {})
    with pytest.raises(ValueError, match="one value per particle"):
        s.loss(V)


@pytest.mark.parametrize(
    "reward, error, fragment",
    [
        (lambda x: x, ValueError, r"got shape \(8, 2\)"),
        (lambda x: x[:, 0].tolist(), TypeError, "must return a torch.Tensor"),
        (lambda x: x[:, 0].sum(), ValueError, r"got shape \(\)"),
    ],
)
def test_reward_of_wrong_type_or_shape_is_named(reward, error, fragment):
    with pytest.raises(error, match="reward_fn <lambda>") as e:
        run_one_step(good_energy, reward)
    e.match(fragment)


def test_boolean_indicator_reward_is_accepted():
    """R(x) = 1[x₁ > 0] returned as a bool tensor works like its float version."""
    from implicit_diffusion.objectives import RewardEstimator

    V = FunctionPotential(good_energy, torch.zeros(2))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    a = RewardEstimator(lambda x: x[:, 0] > 0)(V, x)
    b = RewardEstimator(lambda x: (x[:, 0] > 0).float())(V, x)
    assert torch.equal(a.weights[0], b.weights[0]) and torch.equal(a.stats["reward"], b.stats["reward"])


def test_energy_in_another_dtype_is_named():
    """θ in float64 with float32 particles: the energies come back float64."""
    V = FunctionPotential(good_energy, torch.zeros(2, dtype=torch.float64))
    algo = SingleLoop(V, RewardEstimator(lambda x: x[:, 0]), torch.optim.SGD(V.parameters(), lr=0.1), step_size=0.1)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"potential good_energy returned torch.float64 values for torch.float32 "
                                         r"particles; expected torch.float32"):
        algo.run(torch.randn(8, 2, generator=g), 1, generator=g)


def test_non_finite_rewards_are_named_with_the_first_bad_particle():
    def nan_at_3(x):
        r = x[:, 0].clone()
        r[3] = float("nan")
        r[5] = float("inf")
        return r

    with pytest.raises(ValueError, match=r"reward_fn nan_at_3 returned non-finite values \(nan or inf\) for 2 of 8 "
                                         r"particles, the first at index 3"):
        run_one_step(good_energy, nan_at_3)


def test_an_exception_inside_a_user_function_names_it_and_keeps_the_cause():
    from implicit_diffusion.errors import UserFunctionError

    def broken(x):
        return x[:, 5]  # IndexError: only 2 columns

    with pytest.raises(UserFunctionError, match=r"reward_fn broken raised IndexError: index 5 is out of bounds") as e:
        run_one_step(good_energy, broken)
    assert isinstance(e.value.__cause__, IndexError)

    def broken_energy(x, theta):
        raise RuntimeError("shapes do not match")

    with pytest.raises(UserFunctionError, match="potential broken_energy raised RuntimeError: shapes do not match"):
        run_one_step(broken_energy, lambda x: x[:, 0])


def test_a_score_model_of_the_wrong_dtype_or_with_nans_or_raising_is_named():
    from implicit_diffusion.errors import UserFunctionError
    from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step

    sch = VPSchedule("ou", num_steps=4)
    x = torch.zeros(3, 2)

    def step(model):
        return euler_maruyama_step(x, model, 0, schedule=sch, noise=torch.zeros(3, 2))

    with pytest.raises(ValueError, match=r"model <lambda> \(x, t\) returned torch.float64, x is torch.float32"):
        step(lambda x, t: x.double())
    with pytest.raises(ValueError, match=r"returned non-finite values \(nan or inf\) for 3 of 3 samples"):
        step(lambda x, t: x / 0.0)

    def crashes(x, t):
        raise ValueError("bad t")

    with pytest.raises(UserFunctionError, match="model crashes raised ValueError: bad t"):
        step(crashes)


def test_mala_accepts_an_infinite_energy_at_a_proposal_and_rejects_it():
    """+inf outside a domain is a hard constraint, not an error: such proposals are never accepted."""
    from implicit_diffusion.samplers import mala_step

    V = FunctionPotential(lambda x, th: torch.where(x[:, 0] > 0, (x**2).sum(-1) / 2, torch.inf), torch.zeros(1))
    x = torch.full((500, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, _ = mala_step(x, V, step_size=0.3, generator=g)
    assert (x[:, 0] > 0).all()


def test_mala_rejects_an_infinite_energy_proposal_even_with_uniform_zero():
    """u = 0 exactly (log u = −inf) must not accept a proposal with α = 0 (+inf energy), for u
    passed as an argument and for u drawn from a generator whose torch.rand returns 0; the
    finite-energy proposals beside it are accepted (u = 0 ≤ α > 0)."""
    from unittest import mock

    from implicit_diffusion.samplers import mala_step

    V = FunctionPotential(lambda x, th: torch.where(x[:, 0] > 0, (x**2).sum(-1) / 2, torch.inf),
                          torch.zeros(1, dtype=torch.float64))
    x = torch.full((4, 2), 0.5, dtype=torch.float64)
    # y = x − γx + √(2γ)z = 0.7·0.5 + √0.6·z: z₀ = −2 lands at x₀ < 0 (+inf energy), z₀ = +1 inside
    z = torch.tensor([[-2.0, 0.0], [1.0, 0.0], [-2.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    inside = (0.35 + 0.6**0.5 * z[:, 0]) > 0
    assert inside.tolist() == [False, True, False, True]
    y = 0.7 * x + 0.6**0.5 * z
    expected = torch.where(inside[:, None], y, x)
    x1, info = mala_step(x, V, step_size=0.3, noise=z, uniform=torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(x1, expected, rtol=1e-12, atol=0)
    assert torch.isfinite(V(x1)).all()
    with mock.patch("torch.rand", lambda *a, **kw: torch.zeros(*a[:1], dtype=kw["dtype"])), \
         mock.patch("implicit_diffusion.samplers.mala.draw_noise", lambda x, noise, g: z):
        x2, _ = mala_step(x, V, step_size=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x2, expected, rtol=1e-12, atol=0)


def test_a_tensor_on_another_device_is_named():
    """The 'meta' device stands in for a GPU on a CPU-only machine."""
    with pytest.raises(ValueError, match=r"reward_fn <lambda> returned a tensor on meta, particles are on cpu"):
        run_one_step(good_energy, lambda x: torch.zeros(x.shape[0], device="meta"))


def test_nan_energies_are_named_at_the_first_step():
    """NaN is never a valid energy (+inf is, as a hard constraint): caught in the sampler's gradient."""
    from implicit_diffusion.errors import NonFiniteError

    def nan_energy(x, theta):
        return ((x - theta) ** 2).sum(-1) * float("nan")

    with pytest.raises(NonFiniteError, match=r"potential nan_energy returned non-finite values \(nan or -inf\) "
                                             r"for 8 of 8 particles"):
        run_one_step(nan_energy, lambda x: x[:, 0])
