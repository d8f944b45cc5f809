"""KL to the pretrained diffusion as a running cost (Girsanov; Marion et al. 2024, §3 and §5.2).

Reverse SDE in the OU convention (paper-notes §2), started from the same Y_0 ~ N(0, I):

    dY_t = {Y_t + 2 s(Y_t, T−t)} dt + √2 dB_t.

The finetuned (θ) and pretrained (θ₀) processes share start and diffusion σ = √2 and differ in
drift by Δμ = 2(s_θ − s_θ₀). Girsanov: KL(path_θ ‖ path_θ₀) = E_θ ½∫₀ᵀ ‖Δμ‖²/σ² dt, and
½·‖2Δs‖²/2 = ‖Δs‖², so

    KL(path_θ ‖ path_θ₀) = ∫₀ᵀ E_{Y_t ∼ θ} ‖s_θ(Y_t, T−t) − s_θ₀(Y_t, T−t)‖² dt     (constant 1).

For a VP schedule with noise rate β(t) (reverse drift ½βy + βs, diffusion √β), Δμ = βΔs and the
integrand becomes ½β(t)‖Δs‖²; β ≡ 2 is the OU case. The KL bounds KL(π*(θ) ‖ π*(θ₀)) (data
processing). On the sampler's grid of forward-process times t_0 > t_1 > … > t_M (step m
evaluates the model at t_m, h_m = t_m − t_{m+1}) the running cost of :class:`GirsanovKL` is

    c_m(x_m, θ) = w ½β(t_m) h_m (1/B) Σ_i ‖s_θ(x_m,i, t_m) − s_θ₀(x_m,i, t_m)‖²   (‖·‖² over event dims),

= w h_m (1/B) Σ_i ‖Δs‖² in the OU convention (w the KL weight, "β" of the paper's objective).
For the Euler–Maruyama chain x_{m+1} = x_m + h_m(x_m + 2s(x_m, t_m)) + √(2h_m) z this is the
exact KL of the discrete chains, not only a Riemann sum: the transitions N(μ_θ, 2h_m I) and
N(μ_θ₀, 2h_m I) have μ_θ − μ_θ₀ = 2h_mΔs, so their KL is ‖2h_mΔs‖²/(2·2h_m) = h_m‖Δs‖², summed
over m by the chain rule (likewise ½β h_m‖Δs‖² for the VP Euler–Maruyama step).
:class:`DiscreteMeanKL` is that formula for any step x_{m+1} = μ_θ(x_m) + σ_m z (the
DDPM-discrete form Σ_m E‖μ_θ − μ_θ₀‖²/(2σ_m²)).

Any step whose mean is affine in the score, μ = a_m x + k_m s(x, t_m), with noise sd σ_m has the
exact transition KL (k_m²/(2σ_m²))‖Δs‖²: a :class:`GirsanovKL` with those step weights
(:func:`score_kl_weights`). For DDPM ancestral steps (k_m = β_m/√α_m, σ_m² the posterior
variance β_m(1 − ᾱ(t_{m+1}))/(1 − ᾱ(t_m))) the weight is β_m(1 − ᾱ(t_m))/(2α_m(1 − ᾱ(t_{m+1}))),
→ ½β(t_m)h_m as the steps shrink. One network forward of θ per step, as for Euler–Maruyama.

θ₀ is a frozen copy of the model's parameters and buffers taken at construction, evaluated with
``torch.func.functional_call`` (as :class:`~.kl.KLToReference` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from .._checks import callable_name
from ..models.diffusion_model import DiffusionModel
from ..samplers.diffusion import ddpm_step, euler_maruyama_step
from ..samplers.schedules import Prediction, to_score
from .adjoint import ModelCall, Trajectory

__all__ = ["GirsanovKL", "DiscreteMeanKL", "path_kl_cost", "score_kl_weights"]


class _Frozen(torch.nn.Module):
    """``model``'s forward with θ₀ = a detached copy of its state now; no parameters of its own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # Not a submodule: its parameters are the live θ, which must not be reached from here.
        object.__setattr__(self, "_live", model)
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def forward(self, *args, **kwargs):
        return functional_call(self._live, self._state, args, kwargs)


class GirsanovKL:
    """Running cost c(x, m) = w ½β(t_m) h_m (1/B) Σ_i ‖s_θ(x_i, t_m) − s_θ₀(x_i, t_m)‖², a 0-d tensor.

    (= w h_m (1/B) Σ_i ‖Δs‖² in the OU convention β ≡ 2.) Pass it as ``running_cost`` to
    :func:`~.adjoint.adjoint_through_sampler` (or :func:`~.adjoint.adjoint_backward`): it is
    differentiable in x and θ, and the sweep's ``running_cost`` report is then
    w·KL(path_θ ‖ path_θ₀) along the sampled path.

    Args:
        model: the model being finetuned: a :class:`~implicit_diffusion.models.diffusion_model.DiffusionModel`
            (its prediction type and schedule are used: nothing else to give), or a bare network
            ``model(x, t)`` with x ``(B, *event)``, t ``(B,)``. θ₀ = its parameters and buffers now.
            A bare network must say what it outputs: ``prediction`` or ``to_score``, or a ``prediction``
            attribute equal to ``"score"``; one with no such attribute, or whose ``prediction`` attribute
            is ``"epsilon"`` or ``"x0"``, and no conversion given is a ``ValueError`` (an ε-prediction
            read as a score would be a wrong KL with no error).
        times: forward-process times t_0 > … > t_M, a tensor ``(M+1,)``, or the sampler's
            schedule (any object with such a ``times`` attribute); default: the DiffusionModel's schedule.
        weight: w ≥ 0, the KL weight.
        prediction: what a bare network outputs (``"score"``, ``"epsilon"``, ``"x0"``); converted to the
            score on ``times``, which must then be a schedule. With a DiffusionModel: must be its own.
        step: the sampler step whose transitions' exact KL is wanted (``ddpm_step`` or
            ``euler_maruyama_step``: :func:`score_kl_weights`); default Euler–Maruyama's weights.
        beta: the noise rate β(t) of a VP schedule, ``beta(times) -> same shape``. Default: the
            schedule's own ``beta`` method when ``times`` is a schedule that has one
            (``samplers.schedules.VPSchedule``), else β ≡ 2 (the OU convention).
        step_weights: the M weights k_m²/(2σ_m²) of another Gaussian step (see
            :func:`score_kl_weights`) instead of Euler–Maruyama's ½β(t_m)h_m; ``beta`` is then unused.
        to_score: ``to_score(output, x, t) -> score`` when the model does not output the score,
            e.g. ε-prediction with noise level σ(t): ``lambda eps, x, t: -eps / sigma(t)[:, None]``.

    In an adjoint sweep it reuses the sampler step's own evaluation of s_θ at (x_m, t_m)
    (``model_call``, see :class:`~.adjoint.ModelCall`) when there is one at exactly its t_m, so
    each step costs one forward of θ (and one of θ₀), not two of θ.
    """

    reuses_model_output = True  # adjoint steps pass the step's network output as model_call=

    def __init__(
        self,
        model: torch.nn.Module | DiffusionModel,
        times=None,
        weight: float = 1.0,
        *,
        prediction: Prediction | None = None,
        to_score: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        beta: Callable[[Tensor], Tensor] | None = None,
        step_weights: Sequence[float] | None = None,
        step: Callable | None = None,
    ):
        if not weight >= 0:
            raise ValueError(f"weight must be ≥ 0, got {weight}")
        model, times, to_score = _score_conversion(model, times, prediction, to_score)
        if step is not None and step is not euler_maruyama_step:
            if step_weights is not None:
                raise ValueError("give step= or step_weights=, not both")
            step_weights = score_kl_weights(step, times)
        self.model = model
        self.reference = _Frozen(model)
        self.weight = float(weight)
        self.to_score = to_score
        beta = getattr(times, "beta", None) if beta is None else beta
        self.times = _decreasing_times(times)
        M = self.times.numel() - 1
        rate = [2.0] * M if beta is None else _rates(beta, self.times[:-1])
        self.step_weights = _girsanov_weights(self.times, rate)
        if step_weights is not None:
            given = [float(w) for w in step_weights]
            if len(given) != M or any(not 0 <= w < float("inf") for w in given):
                raise ValueError(f"step_weights must be {M} finite numbers >= 0 (one per step), "
                                 f"got {step_weights!r}")
            self.step_weights = given
        self._weights = torch.tensor(self.step_weights, dtype=torch.float64)

    @property
    def num_steps(self) -> int:
        return len(self.step_weights)

    def score_gap(self, x: Tensor, m: int | Tensor, *, model_call: ModelCall | None = None) -> Tensor:
        """‖s_θ(x_i, t_m) − s_θ₀(x_i, t_m)‖² per particle, shape ``(B,)``; ``m`` an int or a
        per-particle step index ``(B,)``. ``model_call``: the live model's output at (x, t) from the
        sampler step, used for s_θ when it was evaluated on this x at exactly these times."""
        t = self._times_at(m, x)
        if model_call is not None and model_call.x is x and torch.equal(model_call.t, t):
            live = model_call.output if self.to_score is None else self.to_score(model_call.output, x, t)
        else:
            live = self._score(self.model, x, t)
        return (live - self._score(self.reference, x, t)).square().flatten(1).sum(1)

    def per_sample(self, x: Tensor, m: int | Tensor, *, model_call: ModelCall | None = None) -> Tensor:
        """w ½β(t_m) h_m ‖Δs(x_i, t_m)‖² per particle, ``(B,)``; ``m`` an int or ``(B,)`` indices.

        The queue algorithm sweeps batches at different steps in one call: with per-particle
        indices it weighs each particle by its own step and takes each batch's mean itself."""
        weights = self._weights.to(x.device)[self._index(m, x)].to(x.dtype)
        return self.weight * weights * self.score_gap(x, m, model_call=model_call)

    def __call__(self, x: Tensor, m: int, *, model_call: ModelCall | None = None) -> Tensor:
        return (self.weight * self.step_weights[m]) * self.score_gap(x, m, model_call=model_call).mean()

    def _index(self, m: int | Tensor, x: Tensor) -> Tensor:
        idx = torch.as_tensor(m, dtype=torch.long).expand(x.shape[0]).cpu()
        if idx.ndim != 1 or bool(((idx < 0) | (idx >= self.num_steps)).any()):
            raise ValueError(f"step index m must be in 0..{self.num_steps - 1} (an int or one per particle), got {m}")
        return idx

    def _times_at(self, m: int | Tensor, x: Tensor) -> Tensor:
        return self.times[self._index(m, x)].to(device=x.device, dtype=x.dtype)

    def path_kl(self, states: Trajectory | Tensor | Sequence[Tensor]) -> Tensor:
        """Σ_m ½β(t_m) h_m (1/B) Σ_i ‖Δs(x_m,i, t_m)‖²: KL(path_θ ‖ path_θ₀) along stored states (no w).

        ``states``: x_0..x_M as ``(M+1, B, *event)``, a sequence, or a ``store="states"``
        :class:`~.adjoint.Trajectory`. Computed without a graph.
        """
        if isinstance(states, Trajectory):
            if states.stride != 1:
                raise ValueError("a store='noise' Trajectory keeps checkpoints only: sample with store='states'")
            states = states.states
        if len(states) != self.num_steps + 1:
            raise ValueError(f"expected the {self.num_steps + 1} states x_0..x_M, got {len(states)}")
        with torch.no_grad():
            return sum(c * self.score_gap(states[m], m).mean() for m, c in enumerate(self.step_weights))

    def _score(self, net, x: Tensor, t: Tensor) -> Tensor:
        out = net(x, t)
        return out if self.to_score is None else self.to_score(out, x, t)


def _score_conversion(model, times, prediction, convert):
    """(network, times, to_score or None) for GirsanovKL: see its ``model`` argument."""
    if convert is not None and prediction is not None:
        raise ValueError("give prediction= or to_score=, not both")
    if isinstance(model, DiffusionModel):
        if convert is not None:
            raise ValueError("a DiffusionModel converts its own output to the score: leave to_score out")
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the DiffusionModel's prediction "
                             f"{model.prediction!r}; leave prediction out (it is read from the model)")
        times = model.schedule if times is None else times
        return model.net, times, None if model.prediction == "score" else model.score_fn
    if times is None:
        raise TypeError("GirsanovKL needs times= (the sampler's schedule) for a bare network; or pass a "
                        "DiffusionModel (implicit_diffusion.load_diffusion_model), which carries its schedule")
    if convert is not None:
        return model, times, convert
    if prediction is None:
        own = getattr(model, "prediction", None)
        if own is None:
            raise ValueError(f"GirsanovKL: say what the network {callable_name(model)} outputs: prediction='score', "
                             f"'epsilon' or 'x0' (with the schedule as times), or to_score=; or pass a "
                             f"DiffusionModel (load_diffusion_model), which knows it. Taking an ε- or x₀-prediction "
                             f"as a score would give a wrong KL with no error")
        if own != "score":
            raise ValueError(f"GirsanovKL: the model's prediction attribute is {own!r}, not the score, and no "
                             f"conversion was given (its output would be taken as a score: a wrong KL); pass a "
                             f"DiffusionModel (load_diffusion_model), prediction={own!r} with the schedule as "
                             f"times, or to_score=")
        return model, times, None
    if prediction == "score":
        return model, times, None
    if not hasattr(times, "log_alpha_bar"):
        raise ValueError(f"prediction={prediction!r} is converted to the score on a schedule: pass the VPSchedule "
                         f"as times (got {type(times).__name__})")
    schedule = times
    return model, times, lambda out, x, t: to_score(out, x, t, schedule, prediction)


class DiscreteMeanKL:
    """Running cost c_m = w (1/B) Σ_i ‖μ_θ(x_m,i) − μ_θ₀(x_m,i)‖² / (2σ_m²) (DDPM-discrete path KL).

    μ(x) = ``step(x, model, m, noise=0)``: the step's mean, for any step of the form
    x_{m+1} = μ_θ(x_m) + σ_m z with z ~ N(0, I) (Euler–Maruyama: σ_m = √(2h_m), where this equals
    :class:`GirsanovKL` exactly; DDPM ancestral: σ_m² the posterior variance). Steps with
    σ_m = 0 (a deterministic last step) are left out: their transition KL is infinite unless
    the means agree, and the usual practice drops them. Costs two extra step calls per m.

    Args:
        step: the sampler step, ``step(x, model, m, *, schedule, noise, **step_kwargs)``.
        model: the network being finetuned; θ₀ = its parameters and buffers now.
        noise_std: σ_0..σ_{M−1}.
        weight: w ≥ 0, the KL weight.
    """

    def __init__(
        self, step, model: torch.nn.Module, noise_std: Sequence[float], weight: float = 1.0, *, schedule, **step_kwargs
    ):
        if not weight >= 0:
            raise ValueError(f"weight must be ≥ 0, got {weight}")
        self.noise_std = [float(s) for s in noise_std]
        if any(not s >= 0 for s in self.noise_std):
            raise ValueError(f"noise_std must be ≥ 0, got {self.noise_std}")
        self.step, self.model, self.reference = step, model, _Frozen(model)
        self.weight, self.schedule, self.step_kwargs = float(weight), schedule, step_kwargs

    def mean_gap(self, x: Tensor, m: int) -> Tensor:
        """‖μ_θ(x_i) − μ_θ₀(x_i)‖² / (2σ_m²) per particle, shape ``(B,)`` (zeros if σ_m = 0)."""
        sigma = self.noise_std[m]
        if sigma == 0:
            return x.new_zeros(x.shape[0])
        zero = torch.zeros_like(x)
        gap = self._mean(self.model, x, m, zero) - self._mean(self.reference, x, m, zero)
        return gap.square().flatten(1).sum(1) / (2 * sigma**2)

    def __call__(self, x: Tensor, m: int) -> Tensor:
        return self.weight * self.mean_gap(x, m).mean()

    def _mean(self, net, x, m, zero):
        out = self.step(x, net, m, schedule=self.schedule, noise=zero, **self.step_kwargs)
        return out[0] if isinstance(out, tuple) else out


def _girsanov_weights(times: Tensor, rate: Sequence[float]) -> list[float]:
    """½β(t_m)·h_m: Girsanov's ½‖Δμ‖²/g² with Δμ = βΔs and g² = β (= h_m when β ≡ 2)."""
    t = times.tolist()
    return [0.5 * rate[m] * (t[m] - t[m + 1]) for m in range(len(t) - 1)]


def _euler_maruyama_weights(schedule) -> list[float]:
    times = _decreasing_times(schedule)
    return _girsanov_weights(times, _rates(schedule.beta, times[:-1]))


def _ddpm_weights(schedule) -> list[float]:
    t = schedule.times.to(torch.float64)
    log_ab, log_ab_next = schedule.log_alpha_bar(t[:-1]), schedule.log_alpha_bar(t[1:])
    beta_m = -torch.expm1(log_ab - log_ab_next)  # 1 − α_m, as in ddpm_step
    var, var_next = -torch.expm1(log_ab), -torch.expm1(log_ab_next)
    # k_m²/(2σ̃_m²) with k_m = β_m/√α_m, σ̃_m² = β_m var_next/var; a noise-free last step (var_next = 0)
    # is left out, as DiscreteMeanKL does
    w = beta_m * var / (2 * (1 - beta_m) * var_next)
    return torch.where(var_next > 0, w, torch.zeros_like(w)).tolist()


_SCORE_KL_WEIGHTS = {euler_maruyama_step: _euler_maruyama_weights, ddpm_step: _ddpm_weights}


def score_kl_weights(step, schedule) -> list[float]:
    """The M weights k_m²/(2σ_m²) of KL(path_θ ‖ path_θ₀) = Σ_m k_m²/(2σ_m²) E‖s_θ − s_θ₀‖²(x_m, t_m).

    Exact for the two stochastic steps of :mod:`~implicit_diffusion.samplers.diffusion`, whose
    transitions are N(a_m x + k_m s(x, t_m), σ_m² I):

    - ``euler_maruyama_step``: k_m = β(t_m)h_m, σ_m² = β(t_m)h_m, weight ½β(t_m)h_m;
    - ``ddpm_step``: k_m = β_m/√α_m, σ_m² = β_m(1 − ᾱ(t_{m+1}))/(1 − ᾱ(t_m)),
      weight β_m(1 − ᾱ(t_m))/(2α_m(1 − ᾱ(t_{m+1}))) (Ho et al. 2020, eq. 5's L_{t−1}).

    Deterministic steps (DDIM, probability flow) have no path KL; for another stochastic step
    use :class:`DiscreteMeanKL`.
    """
    weights = _SCORE_KL_WEIGHTS.get(step)
    if weights is None:
        raise ValueError(f"no closed-form path KL for the step {callable_name(step)}; exact weights exist for "
                         f"euler_maruyama_step and ddpm_step (DiscreteMeanKL takes any Gaussian step)")
    return weights(schedule)


def path_kl_cost(model: torch.nn.Module, schedule, weight: float, step=euler_maruyama_step) -> GirsanovKL:
    """β·KL(path_θ ‖ path_θ₀) of the sampler ``step`` on ``schedule`` as a running cost for ``model``
    (θ₀ = its weights now), converting its output (ε, x₀ or score) to the score. ``step``:
    ``euler_maruyama_step`` or ``ddpm_step`` (:func:`score_kl_weights`)."""
    prediction = model.prediction
    weights = None if step is euler_maruyama_step else score_kl_weights(step, schedule)
    return GirsanovKL(model, schedule, weight, step_weights=weights, prediction=prediction)


def _rates(beta, times: Tensor) -> list[float]:
    rate = torch.as_tensor(beta(times), dtype=torch.float64).expand(times.shape).tolist()
    if any(not r > 0 for r in rate):
        raise ValueError(f"beta(t) must be > 0 on the grid, got {rate}")
    return rate


def _decreasing_times(times) -> Tensor:
    times = getattr(times, "times", times)
    times = torch.as_tensor(times).detach().to("cpu", torch.float64)
    if times.ndim != 1 or times.numel() < 2:
        raise ValueError(f"times must have shape (M+1,) with M ≥ 1, got {tuple(times.shape)}")
    if not bool((times[:-1] > times[1:]).all()):
        raise ValueError("times must be strictly decreasing t_0 > … > t_M (forward-process times, run backwards)")
    return times
