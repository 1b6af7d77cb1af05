"""The seeds of a case in one pass: each arm's K seeds trained as one stacked model (issue 17).

Where it applies (`why_not` says why not, and the run's metadata records either): a step-unit case
with two or more seeds, the plain stack, in this process, on a harness.models.NormMLP that the
grouped kernel of harness.vectorized covers (BatchNorm1d or no norm), with an optimizer that passes
the elementwise probe (stacked steps equal per-slice steps: torch SGD does, bitwise), and arms
without activation noise, gradient accumulation or a momentum buffer seeded from the weights (each
of those reads a whole tensor or draws per seed). Exact cases run seed by seed unless forced: their
bounds were measured on the per-seed kernels (`stacked_seeds="force"` runs them stacked, and a test
shows they keep their bounds).

How: every seed is set up exactly as the per-seed path sets it up (harness.runner.set_up_seed: the
same data, initial models, probes). For each arm, the K seeds' models become one module whose
parameters and buffers are (K, ...) tensors under the model's own names, trained by an ordinary
harness.runner.ArmState (so groups, decoupled weight decay, schedules and the failure guards are the
per-seed path's code); its loss is the sum over seeds of each seed's mean cross-entropy, so seed k's
gradient is its own loss's. Each seed's own model then has its parameters and buffers re-pointed at
its slices of the stacked tensors: the observers read seed k's model, loss and output as before,
and no copy is made. Batches are drawn from each seed's own source in the per-seed path's order.

What it computes: the same training up to roundoff (batched matmuls and a K·C-channel batch norm
instead of K separate ones): harness.vectorized measured 1.3e-15 relative over 200 float64 updates and
1.8e-14 over 2,000; the CPU profile's stacked cases are float64 statistical claims with ±5-10% bands.
A stacked run that meets a non-finite loss or an exception from the optimizer is discarded and the
case runs again seed by seed, so a divergence or a failing optimizer is reported exactly as the
per-seed path reports it.
"""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from harness import measurements, trajectories
from harness import progress as progress_mod
from harness.optim import load_factory
from harness.runner import ArmState, RunEnv, _draws, _observe, canonical_order, set_up_seed
from harness.spec import Case
from harness.vectorized import NotElementwise, StackedModels, check_elementwise

MODES = ("auto", "off", "force")


class Fallback(RuntimeError):
    """The stacked run cannot give this case's results: run it seed by seed (the message says why)."""


def why_not(case: Case, env: RunEnv, seeds: tuple[int, ...]) -> str | None:
    """Why the case's seeds cannot train in one pass, from its declaration alone; None if they can
    (the model's layers and the optimizer are checked when the run starts)."""
    if env.stacked_seeds not in MODES:
        raise ValueError(f"stacked_seeds must be one of {MODES}, got {env.stacked_seeds!r}")
    if env.stacked_seeds == "off":
        return "turned off (--stacked-seeds off)"
    if len(seeds) < 2:
        return "one seed"
    if case.unit != "step":
        return f"an {case.unit}-unit case (batches of each arm's own size)"
    if not env.stack.plain:
        return f"the training stack {env.stack.label} (stacked seeds run the plain stack only)"
    if case.exact and env.stacked_seeds != "force":
        return "an exact claim: its bounds were measured on the per-seed kernels"
    if env.dtype_for(case) != "float64" and env.stacked_seeds != "force":
        # float32 roundoff grows chaotically over hundreds of updates (harness.vectorized measured
        # 3.5e-2 apart after 200, per-seed loop and stack alike): the values would follow the kernel.
        return f"{env.dtype_for(case)}: its trajectories over hundreds of updates follow the kernels' roundoff"
    if case.model[0] != "norm_mlp":
        return f"model {case.model[0]}: the grouped kernel covers norm_mlp only"
    for a in case.arms:
        if a.act_noise is not None:
            return f"arm {a.name!r} has activation noise (its own generator per seed)"
        if a.accumulate != 1:
            return f"arm {a.name!r} accumulates micro-batches"
        if any(g is not None and g.initial_buffer for g in (a.si, a.other)):
            return f"arm {a.name!r} seeds its momentum buffer from the whole weight tensor"
    return None


# ---- the stacked model --------------------------------------------------------------------------

def stacked_module(models: list[nn.Module]) -> nn.Module:
    """One module holding the K models' parameters and buffers stacked ((K, ...) tensors) under the
    models' own names (and their si_names), whose forward takes x of shape (K, B, ...) and returns
    (K, classes, B) by the grouped kernel. Built from a copy of models[0] so that ArmState and its
    optimizer groups address it exactly as they address one seed's model."""
    stacked = StackedModels(models, "grouped")
    net = copy.deepcopy(models[0])
    for name, t in list(stacked.params.items()):
        mod, leaf = _owner(net, name)
        param = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        mod._parameters[leaf] = param
        stacked.params[name] = param  # the kernel reads the parameters the optimizer steps
    for name, t in stacked.buffers.items():
        mod, leaf = _owner(net, name)
        mod._buffers[leaf] = t  # the kernel updates these in place (BN running statistics)

    def forward(x: torch.Tensor) -> torch.Tensor:
        stacked.train(net.training)  # the kernel reads its own skeleton's modes
        return stacked.logits_class_first(x)
    net.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    return net


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


@torch.no_grad()
def alias_slices(net: nn.Module, models: list[nn.Module]) -> list[tuple[nn.Parameter, list[nn.Parameter]]]:
    """Point models[k]'s parameters and buffers at their slices of `net`'s stacked tensors (views:
    whatever the stacked optimizer and kernel write, the per-seed models read). Returns each stacked
    parameter with the K per-seed parameters that view it (for `alias_grads`)."""
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    pairs = {name: (p, []) for name, p in params.items()}
    for k, model in enumerate(models):
        for name, p in model.named_parameters():
            p.data = params[name].detach()[k]
            pairs[name][1].append(p)
        for name, _ in list(model.named_buffers()):
            mod, leaf = _owner(model, name)
            mod._buffers[leaf] = buffers[name][k]
    return list(pairs.values())


def alias_grads(pairs: list[tuple[nn.Parameter, list[nn.Parameter]]]) -> None:
    """After an update: each per-seed parameter's .grad is its slice of the stacked gradient (seed
    k's own loss's gradient; the SMD observers read it). zero_grad sets the stacked one to None and
    backward makes a new one every update, hence once per update."""
    for stacked, per_seed in pairs:
        g = stacked.grad
        for k, p in enumerate(per_seed):
            p.grad = None if g is None else g[k]


class StackedArm(ArmState):
    """An arm's K seeds as one ArmState on `stacked_module`: the loss is the sum of the seeds' mean
    cross-entropies (seed k's gradient is its own loss's), each kept in `seed_losses`."""

    seed_losses: torch.Tensor
    seed_params: list  # alias_slices' pairs: each stacked parameter and the per-seed ones viewing it

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_seed = F.cross_entropy(out, y, reduction="none").mean(1)
        self.seed_losses = per_seed.detach()
        return per_seed.sum()


class SeedFace:
    """Seed k of a StackedArm as the observers see an arm: its own model (views of the stacked
    tensors), loss and output; anything else (spec, optimizer, updates, batch size) is the arm's."""

    def __init__(self, arm: StackedArm, k: int, model: nn.Module):
        self._arm, self._k, self.model = arm, k, model
        named = dict(model.named_parameters())
        self.si_params = [named[n] for n in model.si_names]

    @property
    def last_loss(self) -> float:
        return float(self._arm.seed_losses[self._k])

    @property
    def last_output(self) -> torch.Tensor | None:
        out = self._arm.last_output
        return None if out is None else out[self._k].T  # (B, classes), as the per-seed path keeps it

    def __getattr__(self, name: str):
        return getattr(self._arm, name)


# ---- the run ------------------------------------------------------------------------------------

def run(case: Case, seeds: tuple[int, ...], env: RunEnv, *, progress=progress_mod.NULL,
        timings: list | None = None) -> tuple[list[tuple], str]:
    """Every seed of `case` in one pass: (rows in the per-seed path's order, a line for the metadata).
    Raises Fallback before training when the model or the optimizer does not allow it, and after a
    non-finite loss or an optimizer exception (the caller then runs the case seed by seed)."""
    steps = env.steps_for(case)
    set_ups = [set_up_seed(case, seed, env) for seed in seeds]
    factory = load_factory(env.optimizer)
    kwargs = env.kwargs()
    try:
        elementwise = check_elementwise(factory, kwargs, getattr(torch, env.dtype_for(case)))
    except NotElementwise as exc:
        raise Fallback(f"{env.optimizer}: {exc}") from None
    try:
        nets = {a.name: stacked_module([s.models[a.name] for s in set_ups]) for a in case.arms}
    except ValueError as exc:  # the grouped kernel does not cover one of the model's layers
        raise Fallback(str(exc)) from exc
    arms = {a.name: StackedArm(a, nets[a.name], factory, env.optimizer, case.requires, optimizer_kwargs=kwargs)
            for a in case.arms}
    for a in case.arms:
        arms[a.name].seed_params = alias_slices(nets[a.name], [s.models[a.name] for s in set_ups])
    observers = [measurements.resolve(m) for m in case.measurements]
    ctxs = [SimpleNamespace(arms={a.name: SeedFace(arms[a.name], k, s.models[a.name]) for a in case.arms},
                            reference=case.reference, probe=s.probe, source=s.source, t=0, state={})
            for k, s in enumerate(set_ups)]
    store = trajectories.current()
    keys = {(a.name, seed): key for a in case.arms for seed in seeds if store is not None
            and (key := trajectories.arm_key(case, a, seed, env, _draws(case), stacked=seeds)) is not None}
    with (store.locked(list(keys.values())) if keys else contextlib.nullcontext()):
        cached = {k: got for k, key in keys.items() if (got := store.get(key, case.id)) is not None}
        # An arm trains again unless every one of its seeds is stored (the seeds share its tensors).
        reused = {a.name for a in case.arms if all((a.name, seed) in cached for seed in seeds)}
        active = {name: arm for name, arm in arms.items() if name not in reused}
        rows = _train_steps(case, seeds, steps, set_ups, active, ctxs, observers, progress) if active else []
        for (name, seed), key in keys.items():
            if name in active:
                store.put(key, [r for r in rows if r[1] == name and r[2] == seed])
    if reused:
        progress.advance(steps * len(reused) * len(seeds))
    if timings is not None:
        timings.extend(t for a in active.values() for t in a.step_seconds)
    rows += [r for (name, _), got in cached.items() if name in reused for r in got]
    by_seed = {seed: [] for seed in seeds}
    for r in rows:
        by_seed[r[2]].append(r)
    note = f"{len(seeds)} seeds in one pass (grouped kernel; {elementwise})"
    return [r for seed in seeds for r in canonical_order(by_seed[seed], case)], note


def _train_steps(case: Case, seeds, steps: int, set_ups, arms: dict, ctxs, observers, progress) -> list[tuple]:
    """harness.runner._train_steps for K seeds at once: each seed draws its own batches, every arm
    takes one stacked update, then each seed's observers read their own views."""
    rows: list[tuple] = []
    draws = _draws(case)
    for k in range(steps):
        xs, ys = [], []
        for s in set_ups:
            batches = [s.source.next_batch() for _ in range(draws)]
            xs.append(batches[0][0] if draws == 1 else torch.cat([b[0] for b in batches]))
            ys.append(batches[0][1] if draws == 1 else torch.cat([b[1] for b in batches]))
        x, y = torch.stack(xs), torch.stack(ys)
        base = len(ys[0]) // draws
        for name, arm in arms.items():
            n = arm.spec.batch_multiplier * base
            try:
                arm.step(k, x[:, :n], y[:, :n])
            except Exception as exc:  # the per-seed path reports it, with its seed and step
                raise Fallback(f"update {k + 1} of arm {name!r} raised {type(exc).__name__}") from exc
            if not bool(torch.isfinite(arm.seed_losses).all()):
                raise Fallback(f"a non-finite loss at update {k + 1} of arm {name!r}")
            alias_grads(arm.seed_params)
        for seed, ctx in zip(seeds, ctxs):
            ctx.t = k + 1
            rows.extend(_observe(case, seed, ctx, observers, steps))
        progress.advance(len(arms) * len(seeds))
    return rows
