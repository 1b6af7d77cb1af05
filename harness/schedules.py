"""Schedules: pure functions of the step (0-based: `lr(k)` is the LR of the (k+1)-th update).

Equivalence schedules also expose `weight_scale(t)`, the factor c_t of the predicted map
θ̃_t = c_t θ_t between the exponential-LR arm and the weight-decay arm after t updates, so a check
can compare the measured norm ratio to the theory without re-deriving it.

Conventions (CLAIMS.md §1–2): SGD is Definition 1.2 of Li & Arora (= torch.optim.SGD, dampening 0,
coupled weight decay), v_0 = 0 unless a schedule's `initial_buffer` is used.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class SettingError(ValueError):
    """Hyperparameters outside the region where a schedule is defined."""


def real_root_alpha(lr: float, wd: float, momentum: float) -> float:
    """Larger root of α² − (1+γ−ηλ)α + γ = 0 (Li & Arora Thm 2.9; γ = 0 gives α = 1 − ηλ)."""
    if not (lr > 0 and wd >= 0 and 0 <= momentum < 1):
        raise SettingError(f"need lr > 0, weight decay >= 0, momentum in [0, 1); got "
                           f"lr={lr}, wd={wd}, momentum={momentum}")
    limit = (1 - math.sqrt(momentum)) ** 2
    if lr * wd > limit:
        raise SettingError(
            f"ηλ = {lr * wd:.4g} exceeds (1 − √γ)² = {limit:.4g} for γ = {momentum}: the "
            f"WD ≡ exp-LR equivalence needs a real root α (Li & Arora Thm 2.9). Lower the LR "
            f"or the weight decay, or the momentum.")
    b = 1 + momentum - lr * wd
    return (b + math.sqrt(max(b * b - 4 * momentum, 0.0))) / 2


class _ByValue:
    """Equal when of the same type with the same settings, so two Groups declared alike compare
    equal (the runner then gives them one optimizer group). Only for schedules that are pure
    functions of their constructor arguments."""

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


class Constant(_ByValue):
    def __init__(self, lr: float):
        if not lr > 0:
            raise SettingError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)

    def __call__(self, k: int) -> float:
        return self.lr

    def __repr__(self) -> str:
        return f"constant({self.lr:g})"


class StepDecay(_ByValue):
    """η_0 multiplied by `factor` at each boundary step (boundaries are 0-based update indices)."""

    def __init__(self, lr: float, boundaries: tuple[int, ...], factor: float):
        if not lr > 0 or not factor > 0 or list(boundaries) != sorted(set(boundaries)):
            raise SettingError(f"bad step decay: lr={lr}, boundaries={boundaries}, factor={factor}")
        self.lr, self.boundaries, self.factor = float(lr), tuple(boundaries), float(factor)

    def __call__(self, k: int) -> float:
        return self.lr * self.factor ** sum(k >= b for b in self.boundaries)

    def __repr__(self) -> str:
        return f"step_decay({self.lr:g}, at={list(self.boundaries)}, x{self.factor:g})"


class ExpLR:
    """Li & Arora Thm 2.1 (γ = 0) and Thm 2.9 (γ > 0): η̃_k = η α^{-2k-1}, θ̃_t = α^{-t} θ_t.

    Exact from a zero buffer only when γ = 0; with momentum the exp arm must start from
    `initial_buffer(θ0)` = (1 − 1/α) θ0 / η. `exponent_offset` shifts the exponent
    (η α^{-2k-1-offset}): a deliberate error used by a negative control.
    """

    def __init__(self, lr: float, wd: float, momentum: float = 0.0, exponent_offset: int = 0):
        self.alpha = real_root_alpha(lr, wd, momentum)
        self.base_lr, self.wd, self.momentum = float(lr), float(wd), float(momentum)
        self.offset = int(exponent_offset)

    def __call__(self, k: int) -> float:
        return self.base_lr * self.alpha ** (-2 * k - 1 - self.offset)

    def weight_scale(self, t: int) -> float:
        return self.alpha ** (-t)

    def initial_buffer(self, theta0: torch.Tensor) -> torch.Tensor:
        return (1 - 1 / self.alpha) * theta0 / self.base_lr

    def __repr__(self) -> str:
        off = f", offset={self.offset}" if self.offset else ""
        return f"exp_lr(η={self.base_lr:g}, λ={self.wd:g}, γ={self.momentum:g}, α={self.alpha:.8g}{off})"


class TexpPP:
    """TEXP++ (our reading of Li & Arora Thm 2.13, CLAIMS.md §2): the no-WD LR schedule that is
    exactly equivalent to SGD with WD λ, momentum γ and ANY LR schedule η_t, from a zero buffer.

    β_1 = 1 − η_0 λ;  β_t = 1 + γ r_t − η_{t−1} λ − γ r_t / β_{t−1},  r_t = η_{t−1}/η_{t−2};
    c_t = c_{t−1}/β_t;  η̃_{t−1} = c_t c_{t−1} η_{t−1};  θ̃_t = c_t θ_t.
    A pure function of the step: the recursion is extended and cached on demand.
    """

    def __init__(self, base: Callable[[int], float], wd: float, momentum: float = 0.0):
        if not (wd >= 0 and 0 <= momentum < 1):
            raise SettingError(f"need weight decay >= 0 and momentum in [0, 1); got {wd}, {momentum}")
        self.base, self.wd, self.momentum = base, float(wd), float(momentum)
        self._log_c = [0.0]  # log c_t, t = 0, 1, ...
        self._beta = [math.nan]

    def _extend(self, t: int) -> None:
        while len(self._log_c) <= t:
            s = len(self._log_c)  # computing β_s, c_s
            eta_prev = self.base(s - 1)
            if not eta_prev > 0:
                raise SettingError(f"base schedule gave lr={eta_prev} at step {s - 1}; need > 0")
            if s == 1:
                beta = 1 - eta_prev * self.wd
            else:
                r = eta_prev / self.base(s - 2)
                beta = 1 + self.momentum * r - eta_prev * self.wd - self.momentum * r / self._beta[s - 1]
            if not beta > 0:
                raise SettingError(
                    f"TEXP++ recursion gave β_{s} = {beta:.4g} <= 0 (η={eta_prev:g}, λ={self.wd:g}, "
                    f"γ={self.momentum:g}): no positive rescaling exists; keep ηλ <= (1 − √γ)²")
            self._beta.append(beta)
            self._log_c.append(self._log_c[-1] - math.log(beta))

    def weight_scale(self, t: int) -> float:
        self._extend(t)
        return math.exp(self._log_c[t])

    def __call__(self, k: int) -> float:
        self._extend(k + 1)
        return math.exp(self._log_c[k + 1] + self._log_c[k]) * self.base(k)

    def __repr__(self) -> str:
        return f"texp++({self.base!r}, λ={self.wd:g}, γ={self.momentum:g})"


def zero_buffer_exp_lr(lr: float, wd: float, momentum: float) -> TexpPP:
    """The exact no-WD schedule for constant η from torch's default zero momentum buffer.

    Needs no access to optimizer state, so this is the form used on plugged-in optimizers. The real-
    root condition is checked up front so out-of-region settings get the Thm 2.9 message.
    """
    real_root_alpha(lr, wd, momentum)
    return TexpPP(Constant(lr), wd, momentum)


class Piecewise(_ByValue):
    """Piecewise-constant LR: `values[i]` from update `starts[i]` on (starts[0] == 0)."""

    def __init__(self, starts: tuple[int, ...], values: tuple[float, ...]):
        if (not starts or starts[0] != 0 or list(starts) != sorted(set(starts))
                or len(starts) != len(values) or not all(v > 0 for v in values)):
            raise SettingError(f"bad piecewise schedule: starts={starts}, values={values}")
        self.starts, self.values = tuple(starts), tuple(float(v) for v in values)

    def phase(self, k: int) -> int:
        return sum(k >= s for s in self.starts) - 1

    def __call__(self, k: int) -> float:
        return self.values[self.phase(k)]

    def __repr__(self) -> str:
        return f"piecewise({dict(zip(self.starts, self.values))})"


class Cosine(_ByValue):
    """η_min + (η_max − η_min)(1 + cos(π k/T))/2, constant η_min after T."""

    def __init__(self, lr: float, total: int, lr_min: float):
        if not (lr > 0 and lr_min > 0 and total > 0):
            raise SettingError(f"bad cosine schedule: lr={lr}, total={total}, lr_min={lr_min}")
        self.lr, self.total, self.lr_min = float(lr), int(total), float(lr_min)

    def __call__(self, k: int) -> float:
        frac = min(k, self.total) / self.total
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * frac)) / 2

    def __repr__(self) -> str:
        return f"cosine({self.lr:g} → {self.lr_min:g} over {self.total})"


class LinearWarmup:
    """η (k+1)/W for the first W updates, then the wrapped schedule."""

    def __init__(self, after: Callable[[int], float], warmup: int):
        if warmup < 1:
            raise SettingError(f"warmup must be >= 1 step, got {warmup}")
        self.after, self.warmup = after, int(warmup)

    def __call__(self, k: int) -> float:
        return self.after(k) * (k + 1) / self.warmup if k < self.warmup else self.after(k)

    def __repr__(self) -> str:
        return f"warmup({self.warmup}, then {self.after!r})"


class TEXP:
    """TEXP (Li & Arora Thm 2.12; formulas in CLAIMS.md §2): the no-WD twin of step decay with
    momentum. Within phase I the LR grows by α_I^{-2} per update; at a phase start it is multiplied
    by (η_I/η_{I−1})/(α_{I−1} α_I). Closed form c_k = ∏_{s<k} α_{I(s)}^{-1}, η̃_k = c_k² η_{I(k)}/α_{I(k)}.

    Exact within phases from the seeded buffer `initial_buffer(θ0)`; at each phase start it is off by
    O((ηλ)²) unless the buffer is corrected just before that update (`buffer_correction`).
    """

    def __init__(self, base: Piecewise, wd: float, momentum: float):
        self.base, self.wd, self.momentum = base, float(wd), float(momentum)
        self.alphas = [real_root_alpha(v, wd, momentum) for v in base.values]

    def _log_c(self, k: int) -> float:
        """log c_k = −Σ_{s<k} log α_{I(s)}: count the updates before k spent in each phase."""
        ends = self.base.starts[1:] + (math.inf,)
        return -sum(max(0, min(k, end) - start) * math.log(alpha)
                    for start, end, alpha in zip(self.base.starts, ends, self.alphas))

    def weight_scale(self, t: int) -> float:
        return math.exp(self._log_c(t))

    def __call__(self, k: int) -> float:
        phase = self.base.phase(k)
        return math.exp(2 * self._log_c(k)) * self.base.values[phase] / self.alphas[phase]

    def initial_buffer(self, theta0: torch.Tensor) -> torch.Tensor:
        return (1 - 1 / self.alphas[0]) * theta0 / self.base.values[0]

    def buffer_correction(self, k: int) -> float | None:
        """Coefficient a for ũ ← ũ + a θ̃ just before update k when k starts a phase:
        a = (1 − 1/κ_I)/η̃_{k−1}, κ_I = r_I/(α_{I−1}(r_I − 1 + 1/α_I)), r_I = η_I/η_{I−1}."""
        if k == 0 or k not in self.base.starts:
            return None
        i = self.base.starts.index(k)
        r = self.base.values[i] / self.base.values[i - 1]
        kappa = r / (self.alphas[i - 1] * (r - 1 + 1 / self.alphas[i]))
        return (1 - 1 / kappa) / self(k - 1)

    def __repr__(self) -> str:
        return f"texp({self.base!r}, λ={self.wd:g}, γ={self.momentum:g})"
