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
    with pytest.raises(ValueError, match=r"potential column_energy must return one value per particle, shape \(8,\); got shape \(8, 1\)"):
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
