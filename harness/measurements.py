"""Measurements: observers called after every lock-step update, each returning tidy rows
(arm, metric, value). Adding a metric means adding a function here; the training loop never changes.

Each observer has an `every` argument (in updates); the last update is always measured.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

Row = tuple[str, str, float]  # arm, metric, value

_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Forward in train mode without leaving a trace in running statistics."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@torch.no_grad()
def train_mode_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.train()
    with frozen_buffers(model):
        out = model(x)
    model.train(was)
    return out


@torch.no_grad()
def eval_mode_outputs(model: nn.Module, x: torch.Tensor, *, recompute_on: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode outputs with the running statistics as trained, or recomputed at the current
    weights from `recompute_on` (cumulative average over that batch)."""
    if recompute_on is not None:
        model = copy.deepcopy(model)
        for mod in model.modules():
            if isinstance(mod, _NORM_TYPES):
                mod.reset_running_stats()
                mod.momentum = None
        model.train()
        model(recompute_on)
    was = model.training
    model.eval()
    out = model(x)
    model.train(was)
    return out


def relative_gap(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).double().norm() / ref.double().norm())


def _gaps(ctx, outputs: Callable[[nn.Module], torch.Tensor], metric: str) -> list[Row]:
    ref_arm = ctx.arms[ctx.reference]
    ref = outputs(ref_arm.model)
    return [(name, metric, relative_gap(outputs(arm.model), ref))
            for name, arm in ctx.arms.items() if name != ctx.reference]


def train_gap(ctx) -> list[Row]:
    """Relative function gap ‖f_arm − f_ref‖/‖f_ref‖ on the fixed probe batch, train-mode norms."""
    return _gaps(ctx, lambda m: train_mode_outputs(m, ctx.probe), "train_gap")


def eval_gap(ctx) -> list[Row]:
    """The same gap in eval mode: with the running statistics as trained (not predicted equal),
    and with statistics recomputed at the current weights on the probe batch (predicted equal)."""
    return (_gaps(ctx, lambda m: eval_mode_outputs(m, ctx.probe), "eval_gap")
            + _gaps(ctx, lambda m: eval_mode_outputs(m, ctx.probe, recompute_on=ctx.probe),
                    "eval_gap_recomputed"))


def si_norm(ctx) -> list[Row]:
    """‖θ‖ over all scale-invariant weights, and the schedule's predicted scale c_t vs the reference."""
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        sq = sum(float(p.detach().double().pow(2).sum()) for p in arm.si_params)
        rows.append((name, "si_norm", sq ** 0.5))
        scale = getattr(arm.spec.si.lr, "weight_scale", None)
        if scale is not None:
            rows.append((name, "predicted_scale", scale(ctx.t)))
    return rows


def loss(ctx) -> list[Row]:
    return [(name, "loss", arm.last_loss) for name, arm in ctx.arms.items()]


@torch.no_grad()
def test_accuracy(ctx, batch: int = 1000) -> list[Row]:
    src = ctx.source
    if src.test_x is None:
        raise ValueError("measurement 'test_acc' needs a data source with a test split")
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        was = arm.model.training
        arm.model.eval()
        correct = sum(int((arm.model(src.test_x[i:i + batch]).argmax(1) == src.test_y[i:i + batch]).sum())
                      for i in range(0, len(src.test_x), batch))
        arm.model.train(was)
        rows.append((name, "test_acc", correct / len(src.test_x)))
    return rows


MEASUREMENTS: dict[str, Callable] = {
    "train_gap": train_gap,
    "eval_gap": eval_gap,
    "si_norm": si_norm,
    "loss": loss,
    "test_acc": test_accuracy,
}


def resolve(spec: str | tuple[str, dict]) -> tuple[str, Callable, int]:
    """'name' or ('name', {'every': k}) -> (name, observer, every)."""
    name, kw = (spec, {}) if isinstance(spec, str) else spec
    if name not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}; known: {sorted(MEASUREMENTS)}")
    kw = dict(kw)
    every = int(kw.pop("every", 1))
    if kw:
        raise ValueError(f"measurement {name!r}: unknown options {sorted(kw)} (only 'every')")
    return name, MEASUREMENTS[name], every
