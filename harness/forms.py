"""Reference mis-implementations: one small SGD per update-rule form that harness.diagnose tells
apart, each written out plainly (one tensor at a time, buffer in `state[p]['momentum_buffer']`).

They are the diagnosis's own test subjects (each must be diagnosed as its form and as no other) and
ready-made non-conformers for the cases. θ the parameter, g its gradient, η the group's current LR,
λ weight_decay, γ momentum, d = g + λθ (coupled WD); the buffer v starts as its first input, as in
torch.optim.SGD. All take `(params, lr, momentum=0.0, weight_decay=0.0)`.
"""
from __future__ import annotations

import math

import torch


class _FormSGD(torch.optim.Optimizer):
    form = ""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, group["lr"], group["momentum"], group["weight_decay"], self.state[p])
        return loss

    def update(self, p, g, lr, momentum, wd, state) -> None:
        raise NotImplementedError

    @staticmethod
    def buffer(state, x, momentum, scale: float = 1.0):
        """v = x on the first step, then γv + scale·x."""
        buf = state.get("momentum_buffer")
        buf = x.clone() if buf is None else buf.mul_(momentum).add_(x, alpha=scale)
        state["momentum_buffer"] = buf
        return buf


class Def12SGD(_FormSGD):
    """Definition 1.2 (Li & Arora), torch.optim.SGD with dampening 0: v = γv + d; θ ← θ − ηv."""

    form = "def12"

    def update(self, p, g, lr, momentum, wd, state):
        p.sub_(self.buffer(state, g + wd * p, momentum), alpha=lr)


class DecoupledSGD(_FormSGD):
    """SGDW (Loshchilov & Hutter): v = γv + g; θ ← θ(1 − ηλ) − ηv."""

    form = "decoupled"

    def update(self, p, g, lr, momentum, wd, state):
        v = self.buffer(state, g, momentum)
        p.mul_(1 - lr * wd).sub_(v, alpha=lr)


class NesterovSGD(_FormSGD):
    """Nesterov momentum, coupled WD: v = γv + d; θ ← θ − η(d + γv)."""

    form = "nesterov"

    def update(self, p, g, lr, momentum, wd, state):
        d = g + wd * p
        v = self.buffer(state, d, momentum)
        p.sub_(d + momentum * v, alpha=lr)


class DampenedSGD(_FormSGD):
    """The EMA-style buffer bug: v = γv + (1 − γ)d after the first step (dampening τ = γ)."""

    form = "dampening"

    def update(self, p, g, lr, momentum, wd, state):
        p.sub_(self.buffer(state, g + wd * p, momentum, scale=1 - momentum), alpha=lr)


class LrInBufferSGD(_FormSGD):
    """The LR inside the buffer (Sutskever et al.'s form, Caffe's): v = γv + ηd; θ ← θ − v.
    Equals Definition 1.2 while η is constant; after an LR change the buffer keeps the old η."""

    form = "lr_in_buffer"

    def update(self, p, g, lr, momentum, wd, state):
        p.sub_(self.buffer(state, lr * (g + wd * p), momentum))


class WdAfterUpdateSGD(_FormSGD):
    """Decay applied to the weights after the step: v = γv + g; θ ← (1 − ηλ)(θ − ηv)."""

    form = "wd_after_update"

    def update(self, p, g, lr, momentum, wd, state):
        v = self.buffer(state, g, momentum)
        p.sub_(v, alpha=lr).mul_(1 - lr * wd)


class LrReadOnceSGD(Def12SGD):
    """Definition 1.2 with η frozen at the constructor's lr: later changes of
    param_groups[i]['lr'] (every schedule) are ignored."""

    form = "lr_read_once"

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr, momentum, weight_decay)
        self.lr_at_construction = lr

    def update(self, p, g, lr, momentum, wd, state):
        super().update(p, g, self.lr_at_construction, momentum, wd, state)


class TrustRatioSGD(_FormSGD):
    """LARS (You et al. 2017): d scaled per tensor by trust·‖θ‖ / (‖g‖ + λ‖θ‖) before momentum."""

    form = "trust_ratio"
    trust = 0.001  # the LARS paper's trust coefficient η

    def update(self, p, g, lr, momentum, wd, state):
        w_norm, g_norm = float(p.norm()), float(g.norm())
        ratio = self.trust * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
        p.sub_(self.buffer(state, ratio * (g + wd * p), momentum), alpha=lr)


class ProjectedSGD(_FormSGD):
    """SGDP-like (Heo et al. 2021): for a weight tensor (2+ dims) whose gradient is nearly orthogonal
    to θ (|cos| < δ/√n), the buffer's component along θ is removed from the step; decoupled WD."""

    form = "projected"
    delta = 0.1  # SGDP's default

    def update(self, p, g, lr, momentum, wd, state):
        v = self.buffer(state, g, momentum)
        step = v
        w_norm = float(p.norm())
        if p.dim() > 1 and w_norm > 0:
            cos = abs(float((g * p).sum())) / (float(g.norm()) * w_norm + 1e-30)
            if cos < self.delta / math.sqrt(p.numel()):
                unit = p / w_norm
                step = v - (v * unit).sum() * unit
        p.mul_(1 - lr * wd).sub_(step, alpha=lr)


class SignSGD(_FormSGD):
    """None of the known forms (the diagnosis's `unknown`): θ ← θ − η·sign(v), v = γv + d."""

    form = "unknown"

    def update(self, p, g, lr, momentum, wd, state):
        p.sub_(torch.sign(self.buffer(state, g + wd * p, momentum)), alpha=lr)


FORMS: dict[str, type[_FormSGD]] = {cls.form: cls for cls in (
    Def12SGD, DecoupledSGD, NesterovSGD, DampenedSGD, LrInBufferSGD, WdAfterUpdateSGD, LrReadOnceSGD,
    TrustRatioSGD, ProjectedSGD, SignSGD)}
