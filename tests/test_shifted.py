"""ShiftedPotential: V_s(y) = V(y − s), with the base's closed forms evaluated at y − s."""

import pytest
import torch
from conftest import assert_close64, randn64

from implicit_diffusion.models import ShiftedPotential, hexagon_mixture


def test_values_and_gradients_are_the_base_at_y_minus_s(generator):
    base = hexagon_mixture((0.3, -0.2, 1.0, 0.0, 0.5, -1.0), dtype=torch.float64)
    shift = torch.tensor([10.0, -3.0], dtype=torch.float64)
    V = ShiftedPotential(base, shift).double()
    y = randn64(generator, 50, 2) * 3 + shift
    x = y - shift
    assert_close64(V(y), base(x))
    assert_close64(V.grad_x(y), base.grad_x(x))
    # closed-form ∇_y against autograd of the shifted energy
    yr = y.clone().requires_grad_(True)
    assert_close64(V.grad_x(y), torch.autograd.grad(V(yr).sum(), yr)[0])
    # Σ wᵢ ∇θV_s(yᵢ) through the base's closed form equals autograd of the surrogate
    w = randn64(generator, 50)
    V.accumulate_param_grad(y, w)
    closed = base.logits.grad.clone()
    base.logits.grad = None
    (w * V(y)).sum().backward()
    assert_close64(closed, base.logits.grad)
    assert [p is q for p, q in zip(V.parameters(), base.parameters())] == [True]


def test_a_wrong_sign_of_the_shift_is_detected(generator):
    """Negative control for the check above: V(y + s) is not the shifted target."""
    base = hexagon_mixture(dtype=torch.float64)
    V = ShiftedPotential(base, 10.0).double()
    y = randn64(generator, 20, 2) + 10.0
    assert not torch.allclose(V(y), base(y + 10.0))


def test_non_finite_shift_is_rejected():
    with pytest.raises(ValueError, match="shift must be finite"):
        ShiftedPotential(hexagon_mixture(), float("nan"))
