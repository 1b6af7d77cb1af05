"""Trains the arms of a case in lock-step: same initial weights, same batch at every step.

Each seed splits into independent streams (init, data, probe, augmentation) so that adding a probe
or an augmentation never shifts the batch sequence. Results come back as tidy rows.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness import measurements, trajectories
from harness import progress as progress_mod
from harness.datasets import build_source, slice_draws
from harness.models import ActivationNoise, build_model
from harness.optim import (DEFAULT_OPTIMIZER, accepts, first_line, load_factory, make_optimizer, parse_kwargs,
                           sut_failure, supports_momentum_buffer_state, supports_nesterov)
from harness.spec import Arm, Case, Group
from harness.stack import Stack, fresh_compiler, to_memory_format, unsupported_reason

RESULT_COLUMNS = ["case", "arm", "seed", "step", "metric", "value"]
PROBE_SIZE = 64
STREAMS = ("init", "data", "probe", "aug", "init_noise", "act_noise")  # append only: keeps the others


class Diverged(RuntimeError):
    """Training produced a non-finite loss; the rows up to that step are kept."""

    def __init__(self, case: str, arm: str, seed: int, step: int, value: float, rows: list):
        super().__init__(f"case {case}: arm {arm!r} diverged at step {step} (seed {seed}, loss {value}); "
                         f"lower the LR or check the schedule")
        self.rows = rows


class Unsupported(RuntimeError):
    """The system under test lacks a capability the case needs (the case is skipped, not failed)."""


@dataclass(frozen=True)
class RunEnv:
    """What the harness injects into every case: never set by the case itself."""

    device: str | None = None  # None: cpu for the cpu profile, cuda for the gpu profile
    optimizer: str = DEFAULT_OPTIMIZER
    optimizer_kwargs: str = ""  # JSON object of extra constructor keywords (`--optimizer-kwargs`)
    dtype: str | None = None  # None: the case's default for its profile
    smoke: bool = False
    seeds: tuple[int, ...] | None = None
    stack: Stack = Stack()  # training-stack switches (harness.stack), applied to every arm alike
    # The seeds of an arm as one stacked model (harness.stacked_seeds): "auto" where the case allows
    # it, "off" seed by seed, "force" for exact cases too (tests show their bounds hold stacked).
    stacked_seeds: str = "auto"

    def kwargs(self) -> dict:
        return parse_kwargs(self.optimizer_kwargs)

    def device_for(self, case: Case) -> str:
        return self.device or ("cpu" if case.profile == "cpu" else "cuda")

    def dtype_for(self, case: Case) -> str:
        # Autocast keeps float32 master weights: under bf16/fp16 a case whose dtype is the profile's
        # default runs in float32 (one that declares float64 is skipped: harness.stack).
        if self.dtype or case.dtype:
            return self.dtype or case.dtype
        return "float32" if self.stack.autocast_dtype is not None else case.default_dtype()

    def seeds_for(self, case: Case) -> tuple[int, ...]:
        seeds = self.seeds or case.seeds
        return seeds[:1] if self.smoke else seeds

    def steps_for(self, case: Case) -> int:
        return case.smoke_steps if self.smoke else case.steps


def seed_streams(seed: int) -> dict[str, int]:
    """Independent child seeds for each stream (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(ss.generate_state(1)[0]) for name, ss in zip(STREAMS, children)}


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class ArmState:
    def __init__(self, spec: Arm, model: nn.Module, factory, optimizer_spec: str, requires: tuple[str, ...],
                 noise_seed: int = 0, optimizer_kwargs: dict | None = None, stack: Stack = Stack()):
        self.spec, self.model, self.stack = spec, model, stack
        # Micro-batches per update: the arm's own (the accumulation claim) times the stack's.
        self.micro = spec.accumulate * stack.accumulate
        self.noise_layers = [m for m in model.modules() if isinstance(m, ActivationNoise)]
        if spec.act_noise is not None:
            if not self.noise_layers:
                raise ValueError(f"arm {spec.name!r} sets act_noise but the model has no ActivationNoise "
                                 f"layers (build it with act_noise=True)")
            for layer in self.noise_layers:
                layer.generator = _generator(noise_seed)
        named = dict(model.named_parameters())
        si_names = set(model.si_names)
        self.si_params = [named[n] for n in model.si_names]
        self.other_params = [p for n, p in named.items() if n not in si_names and p.requires_grad]
        if spec.other is None:
            for p in self.other_params:
                p.requires_grad_(False)
            self.other_params = []
        # One optimizer group per distinct Group: when SI and other parameters train alike (the WD
        # arms) one group does the work of two (SGD is per parameter, so the numbers are the same)
        # and the harness's per-step overhead stays within its budget (docs/benchmarks.md).
        self.groups: list[tuple[Group, list[nn.Parameter]]] = []
        if self.other_params and spec.other == spec.si:
            self.groups.append((spec.si, self.si_params + self.other_params))
        else:
            self.groups += [(g, ps) for g, ps in ((spec.si, self.si_params), (spec.other, self.other_params)) if ps]
        if not self.groups:
            raise ValueError(f"arm {spec.name!r} has no trainable parameter: the model declares no SI weights "
                             f"and the arm freezes the rest (other=None)")
        if any(g.momentum for g, _ in self.groups) and not accepts(factory, "momentum"):
            raise Unsupported(f"optimizer {optimizer_spec} takes no momentum, and arm {spec.name!r} uses "
                              f"momentum {max(g.momentum for g, _ in self.groups):g}")
        self.optimizer = make_optimizer(factory, optimizer_spec, [
            dict(params=params, lr=g.lr(0), momentum=g.momentum,
                 weight_decay=0.0 if g.decoupled else g.weight_decay, **({"nesterov": True} if g.nesterov else {}))
            for g, params in self.groups], optimizer_kwargs)
        if any(g.nesterov for g, _ in self.groups) and not supports_nesterov(self.optimizer):
            raise Unsupported(f"optimizer {optimizer_spec} does not declare Nesterov momentum support "
                              f"(torch.optim.SGD's per-group 'nesterov'), which this case uses")
        needs_state = "momentum_buffer_state" in requires or any(
            g.initial_buffer or g.buffer_correction for g, _ in self.groups)
        if needs_state and not supports_momentum_buffer_state(self.optimizer):
            raise Unsupported(f"optimizer {optimizer_spec} does not expose torch.optim.SGD's "
                              f"'momentum_buffer' state, which this case seeds before step 1")
        seeds = [(p, g.lr.initial_buffer(p.detach()).clone()) for g, params in self.groups if g.initial_buffer
                 for p in params]  # harness arithmetic: outside the guard below
        try:
            for p, buf in seeds:
                self.optimizer.state[p]["momentum_buffer"] = buf
        except Exception as exc:
            raise sut_failure(optimizer_spec, "its state (seeding 'momentum_buffer')", exc) from exc
        self.optimizer_spec = optimizer_spec
        self._optimizer_step = self.optimizer.step
        self._tensor_lr = stack.compile_step
        if stack.compile_step:
            # torch's recipe for a compiled step: the LR in a 0-d tensor updated in place (a Python float
            # is a constant to the compiler, so a schedule would recompile every step until the
            # recompile limit, then silently run eager; measured 1 s per recompile on the MLP), and
            # step() called from a plain function (compiling the bound method diverges in dynamo).
            try:
                for group in self.optimizer.param_groups:
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
            except Exception as exc:
                raise sut_failure(optimizer_spec, "param_groups (a tensor 'lr' for compile_step)", exc) from exc
            optimizer = self.optimizer

            def compiled_step() -> None:
                optimizer.step()
            self._optimizer_step = torch.compile(compiled_step)
        if stack.compile:
            model.compile()  # in place: parameter names and state-dict keys stay as they are
        self.scaler = torch.amp.GradScaler("cuda") if stack.fp16 else None
        self.step_seconds: list[float] = []  # wall time per update: compile time shows as spikes
        self.last_loss = float("nan")
        self.last_output: torch.Tensor | None = None
        self.updates = 0  # parameter updates so far (the batch-size claim counts them)
        self.epoch_loss = float("nan")  # epoch-unit cases: mean training loss over the last epoch
        self.batch_size = 0  # the batch size of the last update
        # model.train() re-sets every module (12 us a call on the MLP: 5% of its step). Whatever
        # leaves train mode (observers) restores the whole tree, so step() calls it only when some
        # module is out of train mode, and always for a model with its own train() override.
        self._modules = list(model.modules())
        self._plain_train = all(type(m).train is nn.Module.train for m in self._modules)
        # Only groups with decoupled WD or a buffer correction need work between backward and step.
        self._pre_step = any((g.decoupled and g.weight_decay) or g.buffer_correction for g, _ in self.groups)

    def step(self, k: int, x: torch.Tensor, y: torch.Tensor) -> float:
        # Every call into the system under test sits in its own try: an exception there becomes
        # OptimizerFailed (an `error` outcome for this case only). try costs nothing until it raises.
        lrs = [g.lr(k) for g, _ in self.groups]  # the schedules are harness code: not guarded
        try:  # the harness changes the LR only through param_groups[i]['lr']
            for i, lr in enumerate(lrs):
                if self._tensor_lr:
                    self.optimizer.param_groups[i]["lr"].fill_(lr)
                else:
                    self.optimizer.param_groups[i]["lr"] = lr
        except Exception as exc:
            raise sut_failure(self.optimizer_spec, "param_groups (setting 'lr')", exc) from exc
        if self.noise_layers:
            sigma = float(self.spec.act_noise(k)) if self.spec.act_noise is not None else 0.0
            for layer in self.noise_layers:
                layer.sigma = sigma
        if not (self._plain_train and all(m.training for m in self._modules)):
            self.model.train()
        t0 = time.perf_counter()
        try:
            self.optimizer.zero_grad(set_to_none=True)
        except Exception as exc:
            raise sut_failure(self.optimizer_spec, "zero_grad()", exc) from exc
        x = to_memory_format(self.stack, x)
        if self.micro == 1:
            with self.stack.autocast(x.device):
                out = self.model(x)
                loss = self._loss(out, y)
            self._backward(loss)
        else:
            out, loss = self._accumulate(x, y)
        self.last_output = out.detach()  # the 'batch_gap' observer compares arms on it, for free
        if self._pre_step:
            self._before_optimizer_step(k)
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self._optimizer_step()
        except Exception as exc:
            if self.stack.compile_step and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                # The compiler failed, not the optimizer: torch does not support compiling this step.
                raise Unsupported(f"torch.compile of {self.optimizer_spec}'s step() failed ({type(exc).__name__}: "
                                  f"{first_line(exc)[:120]}); torch.optim.SGD compiles with "
                                  f"--optimizer-kwargs '{{\"fused\": true}}' (docs/stack.md)") from exc
            raise sut_failure(self.optimizer_spec, "step()", exc) from exc
        self.step_seconds.append(time.perf_counter() - t0)
        self.updates += 1
        self.batch_size = y.shape[-1]
        self.last_loss = loss.item()
        return self.last_loss

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient accumulation: k equal micro-batches, each loss a mean over its part and divided
        by k before backward, so the gradient is the mean over the whole batch (the update is the
        one of the whole batch only for nets without batch statistics: the accumulation claim)."""
        n, k = len(y), self.micro
        if n % k:
            raise Unsupported(f"arm {self.spec.name!r}: a batch of {n} does not split into {k} equal "
                              f"micro-batches (accumulate={k})")
        outs, losses = [], []
        for xs, ys in zip(x.split(n // k), y.split(n // k)):
            with self.stack.autocast(x.device):
                out = self.model(xs)
                loss = self._loss(out, ys)
            self._backward(loss / k)
            outs.append(out.detach())
            losses.append(loss.detach())
        return torch.cat(outs), torch.stack(losses).mean()

    @torch.no_grad()
    def _before_optimizer_step(self, k: int) -> None:
        """Decoupled weight decay and TEXP's buffer correction, for the groups that have them."""
        for g, params in self.groups:
            if g.decoupled and g.weight_decay:
                for p in params:
                    p.mul_(1 - g.lr(k) * g.weight_decay)
            coef = g.lr.buffer_correction(k) if g.buffer_correction else None
            if coef is not None:
                try:  # only the optimizer's state is the system under test here
                    for p in params:
                        self.optimizer.state[p]["momentum_buffer"].add_(p, alpha=coef)
                except Exception as exc:
                    raise sut_failure(self.optimizer_spec, "its state (the 'momentum_buffer' correction)",
                                      exc) from exc


@torch.no_grad()
def arm_model(model0: nn.Module, arm: Arm, gen: torch.Generator) -> nn.Module:
    """The arm's copy of the shared initial model: rescaled and/or perturbed as the arm declares."""
    model = copy.deepcopy(model0)
    if arm.init_scale != 1.0:
        si = set(model.si_names)
        for n, p in model.named_parameters():
            if n in si or (arm.scale_other and p.requires_grad):
                p.mul_(arm.init_scale)
    rel = arm.init_noise_ulps * torch.finfo(next(model.parameters()).dtype).eps
    if rel:
        named = dict(model.named_parameters())
        for n in model.si_names:
            p = named[n]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
            p.add_(noise * (rel * p.norm() / noise.norm()))
    return model


class SingleProcess:
    """How run_seed executes: everything in this process. harness.distributed.DataParallel splits
    every batch over processes instead. The training loops reach the arms only through these hooks,
    so a data-parallel run executes the same case code (step or epoch unit, batch multipliers,
    activation noise) as a single-process one."""

    def prepare(self, case: Case, model0: nn.Module, source) -> None:
        """Adapt the shared initial model before the arms copy it."""

    def attach(self, arms: dict) -> None:
        """The arms exist (models built, optimizers made)."""

    def step(self, arm: "ArmState", k: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """One update of `arm` on the global batch (x, y); returns the batch's mean loss."""
        return arm.step(k, x, y)

    def observe(self, measure) -> list[tuple]:
        """The rows of the due measurements (`measure()`), on the process that records them."""
        return measure()

    def finish(self, arms: dict) -> None:
        """After the last update."""


SINGLE = SingleProcess()


@dataclass
class SeededSetUp:
    """What one seed of a case trains from: its generators, data, the arms' initial models, the probe."""

    streams: dict
    gens: dict
    source: object
    models: dict  # arm name -> that arm's copy of the seed's initial model
    probe: torch.Tensor


def set_up_seed(case: Case, seed: int, env: RunEnv, execution: SingleProcess = None) -> SeededSetUp:
    """One seed's set-up, consuming its streams in a fixed order (data, init, the arms' init noise in
    arm order, probe): the stacked-seeds path calls this too, so both start from the same tensors."""
    execution = execution or SINGLE
    dtype = getattr(torch, env.dtype_for(case))
    device = torch.device(env.device_for(case))
    streams = seed_streams(seed)
    gens = {k: _generator(v) for k, v in streams.items()}
    if device.type == "cuda":
        from harness.device import conformance_mode
        conformance_mode(device)  # deterministic kernels, no autotuning, no TF32
    source = build_source(case.data[0], dict(case.data[1]), gen=gens["data"], aug_gen=gens["aug"],
                          dtype=dtype, device=device, smoke=env.smoke)
    model0 = build_model(case.model[0], dict(case.model[1]), generator_seed=streams["init"],
                         dtype=dtype, device=device)
    stack = env.stack
    if not stack.plain:
        why = unsupported_reason(stack, model0, device, source.train_x[:1], dtype)
        if why:
            raise Unsupported(why)
        if stack.channels_last:
            model0 = model0.to(memory_format=torch.channels_last)
    execution.prepare(case, model0, source)
    models = {a.name: arm_model(model0, a, gens["init_noise"]) for a in case.arms}
    probe = to_memory_format(stack, source.probe(min(PROBE_SIZE, len(source.train_x)), gens["probe"]))
    return SeededSetUp(streams, gens, source, models, probe)


def run_seed(case: Case, seed: int, env: RunEnv, execution: SingleProcess = SINGLE, *,
             progress=progress_mod.NULL, resume: dict | None = None, on_epoch=None,
             timings: list | None = None, only: frozenset[str] | None = None) -> list[tuple]:
    """One seed of a case. Epoch-unit cases: `on_epoch(epoch, rows, capture)` runs after each epoch
    (capture() returns the seed's whole training state), and `resume` (a saved epoch, its rows and
    state) continues a seed from there: set-up is replayed, then the state loaded over it. Every
    update's wall time is appended to `timings` when given. `only`: train just these arms (every
    arm is still built, so each one's initial model is the one a whole-case run gives it) and put
    their rows in the arm store (harness.trajectories.prefill)."""
    steps = env.steps_for(case)
    seeded = set_up_seed(case, seed, env, execution)
    gens, source, probe, stack = seeded.gens, seeded.source, seeded.probe, env.stack
    factory = load_factory(env.optimizer)
    kwargs = env.kwargs()
    arms = {a.name: ArmState(a, seeded.models[a.name], factory, env.optimizer, case.requires,
                             noise_seed=seeded.streams["act_noise"], optimizer_kwargs=kwargs, stack=stack)
            for a in case.arms}
    execution.attach(arms)
    observers = [measurements.resolve(m) for m in case.measurements]
    store = trajectories.current() if execution is SINGLE else None
    keys = {a.name: k for a in case.arms if store is not None and (only is None or a.name in only)
            and (k := trajectories.arm_key(case, a, seed, env, _draws(case))) is not None}
    with (store.locked(list(keys.values())) if keys else contextlib.nullcontext()):
        # Arms another case of this run already trained (same key): their rows are reused, and only
        # the others train (the arms were all built above: building consumes the init-noise stream).
        cached = {name: got for name, k in keys.items() if (got := store.get(k, case.id)) is not None}
        active = {name: a for name, a in arms.items() if name not in cached and (only is None or name in only)}
        rows = _train_active(case, seed, env, steps, source, active, gens, probe, observers, execution,
                             progress=progress, resume=resume, on_epoch=on_epoch) if active else []
        for name in active:
            if name in keys:
                store.put(keys[name], [r for r in rows if r[1] == name])
    if cached:
        progress.advance(steps * len(cached))
    execution.finish(arms)
    if timings is not None:
        timings.extend(t for a in active.values() for t in a.step_seconds)
    return canonical_order(rows + [r for got in cached.values() for r in got], case)


def _draws(case: Case) -> int:
    """Base batches drawn per update: the largest batch multiplier of the case's arms (every arm
    sees the first m of them), whichever arms train."""
    return max(a.batch_multiplier for a in case.arms)


def canonical_order(rows: list[tuple], case: Case) -> list[tuple]:
    """Rows by seed, step and arm (in the case's arm order), each arm's metrics in observer order:
    the same table whether an arm was trained here or reused from the arm store."""
    index = {a.name: i for i, a in enumerate(case.arms)}
    return sorted(rows, key=lambda r: (r[2], r[3], index.get(r[1], len(index))))


def _train_active(case: Case, seed: int, env: RunEnv, steps: int, source, arms: dict, gens: dict, probe, observers,
                  execution, *, progress, resume, on_epoch) -> list[tuple]:
    ctx = SimpleNamespace(arms=arms, reference=case.reference, probe=probe, source=source, t=0,
                          state={})  # `state`: observers' memory between calls
    if case.unit == "epoch":
        start, rows = 0, []
        if resume is not None:
            _restore_state(resume["state"], arms, gens, source, ctx)
            start, rows = resume["epoch"], list(resume["rows"])
        capture = lambda: _capture_state(arms, gens, source, ctx)  # noqa: E731
        rows = _train_epochs(case, seed, steps, source, arms, ctx, observers, execution, smoke=env.smoke,
                             start=start, rows=rows, progress=progress,
                             on_epoch=(lambda e, r: on_epoch(e, r, capture)) if on_epoch else None)
    else:
        rows = _train_steps(case, seed, steps, source, arms, ctx, observers, execution, progress=progress)
    return rows


def step_timings(seconds: list[float]) -> dict:
    """Step time apart from compile time: the median update, and the excess over it of the updates
    that took more than 5× the median plus 1 ms (compilations and recompilations; with a plain stack
    this is first-touch allocation and scheduler noise, a few ms)."""
    if not seconds:
        return {}
    t = np.asarray(seconds)
    median = float(np.median(t))
    spikes = t[t > 5 * median + 1e-3]
    return {"updates": int(len(t)), "step_ms": round(1e3 * median, 3),
            "compile_s": round(float((spikes - median).sum()), 2)}


def _optimizer_state(arm: ArmState) -> dict:
    try:
        return arm.optimizer.state_dict()
    except Exception as exc:
        raise sut_failure(arm.optimizer_spec, "state_dict() (writing a checkpoint)", exc) from exc


def _capture_state(arms: dict, gens: dict, source, ctx) -> dict:
    """Everything a seed's remaining epochs depend on, as tensors and plain containers."""
    return {
        "arms": {name: {"model": a.model.state_dict(), "optimizer": _optimizer_state(a),
                        "updates": a.updates, "epoch_loss": a.epoch_loss, "batch_size": a.batch_size,
                        "last_loss": a.last_loss,
                        "noise": [layer.generator.get_state() for layer in a.noise_layers
                                  if layer.generator is not None]}
                 for name, a in arms.items()},
        "generators": {k: g.get_state() for k, g in gens.items()},
        "source": {"gen": source.gen.get_state(),
                   "aug_gen": source.aug_gen.get_state() if source.aug_gen is not None else None},
        "observers": ctx.state, "t": ctx.t,
    }


class ResumeFailed(RuntimeError):
    """A checkpoint could not be loaded into the rebuilt seed: the case starts over instead."""


def _on_device(obj, device: torch.device):
    """The observers' memory comes back on the CPU (map_location): put its tensors where the case runs."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _on_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_device(v, device) for v in obj)
    return obj


def _restore_state(state: dict, arms: dict, gens: dict, source, ctx) -> None:
    try:
        _load_state(state, arms, gens, source, ctx)
    except Exception as exc:
        raise ResumeFailed(f"{type(exc).__name__}: {first_line(exc)}") from exc


def _load_state(state: dict, arms: dict, gens: dict, source, ctx) -> None:
    for name, a in arms.items():
        saved = state["arms"][name]
        a.model.load_state_dict(saved["model"])
        a.optimizer.load_state_dict(saved["optimizer"])
        a.updates, a.epoch_loss = saved["updates"], saved["epoch_loss"]
        a.batch_size, a.last_loss = saved["batch_size"], saved["last_loss"]
        for layer, g in zip([m for m in a.noise_layers if m.generator is not None], saved["noise"]):
            layer.generator.set_state(g)
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    source.gen.set_state(state["source"]["gen"])
    if source.aug_gen is not None:
        source.aug_gen.set_state(state["source"]["aug_gen"])
    ctx.state.clear()
    ctx.state.update(_on_device(state["observers"], source.train_x.device))
    ctx.t = state["t"]


def _observe(case: Case, seed: int, ctx, observers, last: int) -> list[tuple]:
    return [(case.id, arm, seed, ctx.t, metric, value)
            for _, observe, every in observers if ctx.t % every == 0 or ctx.t == last
            for arm, metric, value in observe(ctx)]


def _train_steps(case: Case, seed: int, steps: int, source, arms: dict, ctx, observers,
                 execution: SingleProcess, *, progress=progress_mod.NULL) -> list[tuple]:
    rows: list[tuple] = []
    # Arms with batch_multiplier m train on the first m base batches of the step's draw, so every
    # arm still sees the same examples in the same order (linear-scaling comparisons).
    draws = _draws(case)
    for k in range(steps):
        batches = [source.next_batch() for _ in range(draws)]
        x, y = (batches[0] if draws == 1 else
                (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
        for name, arm in arms.items():
            n = arm.spec.batch_multiplier * len(batches[0][1])
            value = execution.step(arm, k, x[:n], y[:n])
            if not np.isfinite(value):
                raise Diverged(case.id, name, seed, k + 1, value, rows)
        ctx.t = k + 1
        rows.extend(execution.observe(lambda: _observe(case, seed, ctx, observers, steps)))
        progress.advance(len(arms))
    return rows


def _train_epochs(case: Case, seed: int, epochs: int, source, arms: dict, ctx, observers,
                  execution: SingleProcess, *, smoke: bool = False, start: int = 0, rows: list | None = None,
                  progress=progress_mod.NULL, on_epoch=None) -> list[tuple]:
    """Every arm walks the epoch's shared example order in batches of its own size (the last
    partial batch dropped); `step` in the rows counts epochs. A smoke run's tiny training set caps
    the batch size at its size. Starts at epoch `start` with `rows` when resuming."""
    rows = [] if rows is None else rows
    n = len(source.train_x)
    for e in range(start, epochs):
        order, draws = source.epoch_plan()
        for name, arm in arms.items():
            b = arm.spec.batch_size(e) if arm.spec.batch_size else source.batch_size
            b = min(b, n) if smoke else b
            if not 1 <= b <= n:
                raise ValueError(f"case {case.id}: arm {name!r} asks for batch size {b} in epoch {e}, "
                                 f"but the training set has {n} examples")
            losses = []
            for lo in range(0, n - b + 1, b):
                x, y = source.take(order[lo:lo + b], slice_draws(draws, lo, lo + b))
                value = execution.step(arm, e, x, y)
                if not np.isfinite(value):
                    raise Diverged(case.id, name, seed, e + 1, value, rows)
                losses.append(value)
            arm.epoch_loss = float(np.mean(losses))
            progress.advance(1)
        ctx.t = e + 1
        rows.extend(execution.observe(lambda: _observe(case, seed, ctx, observers, epochs)))
        if on_epoch is not None and e + 1 < epochs:
            on_epoch(e + 1, rows)
    return rows


def work_units(case: Case, env: RunEnv) -> tuple[int, str]:
    """The case's total work for progress: arm-steps (arm-epochs for epoch-unit cases) over its seeds."""
    per_seed = env.steps_for(case) * len(case.arms)
    return per_seed * len(env.seeds_for(case)), ("arm-epoch" if case.unit == "epoch" else "arm-step")


def run_case(case: Case, env: RunEnv, *, make_progress=None, checkpoint_dir=None) -> pd.DataFrame:
    """Every seed of `case`. `make_progress(total, unit, initial)` gives the progress reporter.
    With `checkpoint_dir`, an epoch-unit case saves a checkpoint after every epoch (best effort: a
    state that cannot be saved turns checkpointing off for the case, with a note) and resumes from
    one it finds there; the caller removes it (harness.checkpoint.clear) once the case's rows are
    safely stored."""
    ckpt = saved = None
    if checkpoint_dir is not None and case.unit == "epoch":
        from harness.checkpoint import EpochCheckpoints
        from harness.store import git_commit
        ckpt = EpochCheckpoints(checkpoint_dir, case.id, dict(
            case=case.id, seeds=env.seeds_for(case), epochs=env.steps_for(case), dtype=env.dtype_for(case),
            device=env.device_for(case), optimizer=env.optimizer, optimizer_kwargs=env.optimizer_kwargs,
            smoke=env.smoke, torch=torch.__version__, commit=git_commit()))
        saved = ckpt.load()
        if ckpt.note:
            print(f"{case.id}: {ckpt.note}", file=sys.stderr)
        elif saved:
            print(f"{case.id}: resuming seed {env.seeds_for(case)[saved['seed_index']]} at epoch {saved['epoch']} "
                  f"of {env.steps_for(case)} (checkpoint {ckpt.path.name})", file=sys.stderr)
    try:
        return _run_seeds(case, env, make_progress, ckpt, saved)
    except ResumeFailed as exc:
        print(f"{case.id}: checkpoint not usable ({exc}), case restarted", file=sys.stderr)
        return _run_seeds(case, env, make_progress, ckpt, None)


def _run_seeds(case: Case, env: RunEnv, make_progress, ckpt, saved: dict | None) -> pd.DataFrame:
    seeds = env.seeds_for(case)
    first = saved["seed_index"] if saved else 0
    rows: list[tuple] = list(saved["finished_rows"]) if saved else []
    seconds: list[float] = []
    if env.stack.compile or env.stack.compile_step:
        fresh_compiler()
    graphs_before = _compiled_graphs() if (env.stack.compile or env.stack.compile_step) else 0
    total, unit = work_units(case, env)
    done = first * (total // len(seeds)) + (saved["epoch"] * len(case.arms) if saved else 0)
    progress = make_progress(total, unit, done) if make_progress else progress_mod.NULL
    from harness import stacked_seeds  # imported here: it builds on this module
    why = "resumed from a checkpoint" if saved else stacked_seeds.why_not(case, env, seeds)
    how = None  # how the seeds ran, for the metadata
    try:
        if why is None:
            try:
                rows, how = stacked_seeds.run(case, seeds, env, progress=progress, timings=seconds)
                first = len(seeds)  # every seed done
            except stacked_seeds.Fallback as exc:  # seed by seed instead, from the start
                why, rows = str(exc), []
                seconds.clear()
                progress.close()
                progress = make_progress(total, unit, 0) if make_progress else progress_mod.NULL
        how = how or f"seed by seed: {why}"
        for i, seed in enumerate(seeds):
            if i < first:
                continue
            on_epoch = None
            if ckpt is not None:
                def on_epoch(epoch, seed_rows, capture, i=i, finished=list(rows)):
                    ckpt.try_save(lambda: dict(seed_index=i, epoch=epoch, finished_rows=finished, rows=seed_rows,
                                               state=capture()))
            try:
                rows.extend(run_seed(case, seed, env, progress=progress, on_epoch=on_epoch, timings=seconds,
                                     resume=saved if (saved and i == first and saved["epoch"] > 0) else None))
            except Diverged as exc:
                exc.rows = rows + exc.rows  # keep the earlier seeds' rows too
                raise
            if ckpt is not None and i + 1 < len(seeds):  # a kill between seeds loses no finished seed
                ckpt.try_save(lambda i=i: dict(seed_index=i + 1, epoch=0, finished_rows=rows, rows=[], state={}))
    finally:
        progress.close()
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    table.attrs["timings"] = step_timings(seconds)  # kept apart from the tidy rows (session.Outcome)
    if len(seeds) > 1:  # stacked in one pass, or seed by seed and why (harness.stacked_seeds)
        table.attrs["timings"]["seeds"] = how
    if env.stack.compile or env.stack.compile_step:  # evidence that the compiler ran, not a silent eager run
        table.attrs["timings"]["graphs_compiled"] = _compiled_graphs() - graphs_before
    return table


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters  # dynamo's own count of the graphs it compiled
    return int(counters["stats"]["unique_graphs"])
