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
    """Forward in train mode without leaving a trace: in running statistics, nor in the generators
    of activation-noise layers (a measurement that drew training noise would shift every later
    update's noise, so the trajectory would depend on what is measured and how often)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    gens = {id(m.generator): (m.generator, m.generator.get_state()) for m in model.modules()
            if isinstance(getattr(m, "generator", None), torch.Generator)}
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        for gen, state in gens.values():
            gen.set_state(state)


@torch.no_grad()
def train_mode_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # After a training step every module is already in train mode: the two model.train() walks
    # (12 us each on the MLP) would change nothing, so they are skipped.
    if all(m.training and type(m).train is nn.Module.train for m in model.modules()):
        with frozen_buffers(model):
            return model(x)
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


def batch_gap(ctx) -> list[Row]:
    """The same relative gap on the step's own training batch, from the outputs the training
    forward already computed (at the weights before the update): a function-space check at every
    step for the price of a subtraction. Arms trained on a different batch (batch_multiplier) are
    skipped. The fixed-probe `train_gap` complements it every few steps and after the last update."""
    ref = ctx.arms[ctx.reference].last_output
    return [(name, "batch_gap", relative_gap(arm.last_output, ref))
            for name, arm in ctx.arms.items()
            if name != ctx.reference and arm.last_output is not None and arm.last_output.shape == ref.shape]



def eval_gap(ctx) -> list[Row]:
    """The same gap in eval mode: with the running statistics as trained (not predicted equal),
    and with statistics recomputed at the current weights on the probe batch (predicted equal)."""
    return (_gaps(ctx, lambda m: eval_mode_outputs(m, ctx.probe), "eval_gap")
            + _gaps(ctx, lambda m: eval_mode_outputs(m, ctx.probe, recompute_on=ctx.probe),
                    "eval_gap_recomputed"))


def predicted_scale(arm, t: int) -> float | None:
    """The theory's c_t for this arm's SI weights relative to the reference arm, if it has one."""
    schedule_scale = getattr(arm.spec.si.lr, "weight_scale", None)
    if schedule_scale is None and arm.spec.init_scale == 1.0:
        return None
    return arm.spec.init_scale * (schedule_scale(t) if schedule_scale else 1.0)


def _flat_si(arm) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in arm.si_params])


def si_norm(ctx) -> list[Row]:
    """‖θ‖ over all scale-invariant weights, and the predicted scale c_t vs the reference."""
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        if not arm.si_params:
            continue
        rows.append((name, "si_norm", float(_flat_si(arm).norm())))
        scale = predicted_scale(arm, ctx.t)
        if scale is not None:
            rows.append((name, "predicted_scale", scale))
    return rows


def si_weight_gap(ctx) -> list[Row]:
    """‖w_arm − c_t w_ref‖ / ‖c_t w_ref‖ over the SI weights, for arms with a predicted scale.
    Exactly 0 when the arm is a bitwise-exact rescaled copy (power-of-two c in any dtype)."""
    ref = _flat_si(ctx.arms[ctx.reference])
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        scale = predicted_scale(arm, ctx.t)
        if name != ctx.reference and scale is not None:
            target = ref * scale
            rows.append((name, "si_weight_gap", float((_flat_si(arm) - target).norm() / target.norm())))
    return rows


def update_norm(ctx) -> list[Row]:
    """‖θ_t − θ_{t−1}‖ over all trainable parameters: zero at a fixed point of the dynamics."""
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        now = torch.cat([p.detach().reshape(-1).double() for p in arm.model.parameters() if p.requires_grad])
        before = ctx.state.get(("update_norm", name))
        if before is not None:
            rows.append((name, "update_norm", float((now - before).norm())))
        ctx.state[("update_norm", name)] = now.clone()
    return rows


def loss(ctx) -> list[Row]:
    return [(name, "loss", arm.last_loss) for name, arm in ctx.arms.items()]


def epoch_loss(ctx) -> list[Row]:
    """Epoch-unit cases: the mean training loss over the epoch's minibatches (free: the training
    forward computed it), the paper's training-loss-per-epoch curve."""
    return [(name, "epoch_loss", arm.epoch_loss) for name, arm in ctx.arms.items()]


def schedule(ctx) -> list[Row]:
    """What the arm trained with: cumulative parameter updates, the last batch size and LR (per
    group), so curves can be drawn against updates and the noise scale recomputed from results."""
    rows: list[Row] = []
    for name, arm in ctx.arms.items():
        rows += [(name, "updates", float(arm.updates)), (name, "batch_size", float(arm.batch_size))]
        rows += [(name, "lr" if i == 0 else f"lr_group{i}", float(g["lr"]))
                 for i, g in enumerate(arm.optimizer.param_groups)]
    return rows


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Eval-mode accuracy; the model's mode is restored afterwards."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(x)


def test_accuracy(ctx, batch: int = 1000) -> list[Row]:
    src = ctx.source
    if src.test_x is None:
        raise ValueError("measurement 'test_acc' needs a data source with a test split")
    return [(name, "test_acc", accuracy(arm.model, src.test_x, src.test_y, batch))
            for name, arm in ctx.arms.items()]


def eval_accuracy(ctx, batch: int = 1000) -> list[Row]:
    """Accuracy on each of the source's named eval sets, as metric 'acc_<set name>'."""
    if not ctx.source.eval_sets:
        raise ValueError("measurement 'eval_acc' needs a data source with named eval sets")
    return [(name, f"acc_{set_name}", accuracy(arm.model, x, y, batch))
            for name, arm in ctx.arms.items() for set_name, (x, y) in ctx.source.eval_sets.items()]


def _linear_baseline(ctx) -> list[Row]:
    """The two-pattern toy's best linear rule (harness.two_pattern, imported lazily)."""
    from harness.two_pattern import linear_baseline
    return linear_baseline(ctx)


MEASUREMENTS: dict[str, Callable] = {
    "train_gap": train_gap,
    "batch_gap": batch_gap,
    "eval_gap": eval_gap,
    "si_norm": si_norm,
    "si_weight_gap": si_weight_gap,
    "update_norm": update_norm,
    "loss": loss,
    "epoch_loss": epoch_loss,
    "schedule": schedule,
    "test_acc": test_accuracy,
    "eval_acc": eval_accuracy,
    "linear_baseline": _linear_baseline,
}


def _register_sphere() -> None:
    from harness import sphere
    MEASUREMENTS.update(sphere.MEASUREMENTS)


_register_sphere()


def resolve(spec: str | tuple[str, dict]) -> tuple[str, Callable, int]:
    """'name' or ('name', {'every': k}) -> (name, observer, every)."""
    name, kw = (spec, {}) if isinstance(spec, str) else spec
    if name not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}; known: {sorted(MEASUREMENTS)}")
    kw = dict(kw)
    every = int(kw.pop("every", 1))
    observer = MEASUREMENTS[name]
    if kw:  # any other option goes to the observer itself (e.g. a window length)
        import functools
        import inspect
        unknown = set(kw) - set(inspect.signature(observer).parameters)
        if unknown:
            raise ValueError(f"measurement {name!r}: unknown options {sorted(unknown)}")
        observer = functools.partial(observer, **kw)
    return name, observer, every
