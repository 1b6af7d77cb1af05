"""Many seeds in one pass: the K seeds of one arm trained as one stacked model.

Every parameter and buffer of the K per-seed models is stacked along a new leading dimension
(torch.func.stack_module_state), each seed's batch along the same dimension (x of shape (K, B, ...)),
and the optimizer steps the stacked (K, ...) tensors. That is the same training as K separate runs
exactly when the optimizer's update of an element depends on that element (and its own state)
only: torch.optim.SGD with or without momentum, coupled weight decay, for-loop, foreach or fused.
`is_elementwise` decides that by a probe, once per optimizer; an optimizer that fails it (a
trust-ratio / LARS-like update reading a tensor's norm, a clip by a group's total norm) must be run
seed by seed, and `StackedTrainer` refuses it (NotElementwise, with the probe's one-line reason).

Two forward kernels, both evaluating seed k's model on seed k's batch:

* ``vmap`` (any model): torch.func.functional_call of a meta-device skeleton, vmapped over the
  stacked parameters, buffers and batches (in_dims 0 for all three).
* ``grouped`` (harness.models.NormMLP with BatchNorm1d or no norm: the SMD / intrinsic-LR net): the
  same layers written as batched matmuls in a feature-major layout (K, C, B), so that one
  F.batch_norm call over K·C channels normalizes every seed's layer at once, with no copy. ``auto``
  takes it when the model fits, else ``vmap``.

BatchNorm in train mode (what was chosen, and measured). torch.func offers two ways: replace the
BN modules' running statistics by none (replace_all_batch_norm_modules_: batch statistics
everywhere, eval mode included) or pass the buffers in batched. The harness reads the running
statistics (eval-mode measurements), so both kernels keep them: the buffers are stacked like the
parameters and updated in place, per seed, as nn.BatchNorm1d updates its own (num_batches_tracked
included; momentum None, the cumulative average, works in the grouped kernel only: the vmap path
would need a Python float of a batched counter). Measured on the SMD net (BN MLP 32-128-128-10,
affine, eps 1e-5, batch 128, the SMD data), K = 8, one train-mode forward against the K models' own:
  vmap     outputs and running mean / var / count BITWISE equal, float32 and float64;
  grouped  outputs within 5.1e-16 (float64) / 3.3e-7 (float32) relative, running statistics within
           1.9e-16 / 2.2e-7 relative, counts equal (F.batch_norm reduces each channel over B
           contiguous elements instead of across a (B, C) layout: roundoff, not another statistic).
The gradients differ from the per-seed ones at roundoff in both kernels (bmm against mm, the BN
backward's reductions): about 4e-16 (float64) and 2.4e-7 (float32) relative after one update.

Training equivalence (train_stacked against train_sequential: the SMD cases' seeds 0, 1, 2, their
initial models and batches, torch SGD η 0.1, γ 0.9, λ 5e-3), max over seeds and parameters of
‖θ_stacked − θ_seq‖ / ‖θ_seq‖:
  float64, 200 updates:  grouped 1.3e-15, vmap 1.6e-15 (5e-16 to 8e-16 after the first update:
                         roundoff that accumulates, no drift); 1.1e-15 to 1.4e-15 under AVX2 and
                         portable kernels (ATEN_CPU_CAPABILITY);
  float32,   1 update:   2.3e-7 to 4.5e-7, both kernels, all three kernel sets;
  float32,  20 updates:  grouped 4.2e-7, vmap 3.0e-7 (at most 1.0e-6 up to update 150); but vmap
                         under portable kernels: 2.2e-4 at update 5, 1.2e-2 at 20 (the chaos below,
                         met early);
  float32, 200 updates:  3.5e-2, both kernels: between updates 150 and 200 the gap jumps by five
                         orders of magnitude, the mark of chaos (most likely a pre-activation within
                         roundoff of a ReLU kink, on one side in one run and on the other in the
                         other). The per-seed loop itself under AVX2 kernels ends 3.5e-2 away from
                         the same loop under AVX-512 kernels, and docs/portability.md judges float32
                         cells on their first 20 updates for that reason.
  float64, 2000 updates (all of smd-momentum-equilibrium, batches drawn per update as the runner
                         draws them): grouped 1.7e-15 at 250, 6.7e-15 at 1000, 1.8e-14 at 2000, a
                         slow growth without a jump. The SMD / intrinsic-LR cases run in float64 on
                         the CPU profile (they set no dtype; cases/smd.py's docstring says float32),
                         so a stacked run of them follows the per-seed trajectories to about 1e-14,
                         twelve orders below their ±5-10% bands. Whether every verdict is the same is
                         still for the runner integration to show, case by case.

Speed, per seed-step against the per-seed loop on one thread (benchmarks/bench_seeds.py, docs/
benchmarks.md "Seeds in one pass"): the grouped kernel 1.8-1.9× at K = 8 and 1.4-1.5× at K = 3 in
float32, 1.3-1.35× in float64 (the matmuls, which run no faster batched, bound it near 3× and 2×).
The vmap kernel is no faster than the loop: 0.83-1.0× in float32, 0.62-0.77× in float64 (its batch
rules transpose and copy around every batch norm). It is the general path, for correctness; a
runner should stack only when it gets the grouped kernel, or measure first.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from harness.models import NormMLP
from harness.optim import accepts, make_optimizer

KERNELS = ("auto", "grouped", "vmap")


class NotElementwise(RuntimeError):
    """The optimizer's update of a stacked tensor is not K independent updates of its slices."""


def _spec(factory) -> str:
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


# ---- stacking -------------------------------------------------------------------------------------

def _grouped_plan(model: nn.Module) -> tuple[list[tuple] | None, str]:
    """The NormMLP's layers as grouped-kernel steps, or None and why the grouped kernel cannot run it."""
    if type(model) is not NormMLP:
        return None, f"{type(model).__name__} is not a NormMLP"
    plan: list[tuple] = []
    for name, mod in model.features.named_children():
        prefix = f"features.{name}"
        if type(mod) is nn.Linear and mod.bias is None:
            plan.append(("linear", prefix))
        elif type(mod) is nn.BatchNorm1d:
            plan.append(("bn", prefix, mod))
        elif type(mod) is nn.ReLU:
            plan.append(("relu",))
        elif type(mod) is nn.Identity:
            continue
        else:
            return None, f"{prefix} is a {type(mod).__name__} (the grouped kernel has BatchNorm1d and Identity only)"
    if type(model.classifier) is not nn.Linear:
        return None, f"classifier is a {type(model.classifier).__name__}"
    return plan, ""


class StackedModels:
    """K models of one class stacked: `params` and `buffers` map each name to a (K, ...) tensor
    (the parameters new leaves, requires_grad as in the models). The models themselves are left
    as they are; `write_back` copies the stacked state into them."""

    def __init__(self, models: Sequence[nn.Module], kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        models = list(models)
        self.k = len(models)
        self.params, self.buffers = stack_module_state(models)
        # functional_call swaps these tensors into a skeleton: one on the meta device holds no data.
        self.base = copy.deepcopy(models[0]).to("meta")
        # The plan holds the skeleton's modules: their training flags (train()), eps and momentum.
        self._plan, why = _grouped_plan(self.base)
        if kernel == "grouped" and self._plan is None:
            raise ValueError(f"no grouped kernel for this model: {why}")
        self.kernel = "grouped" if (kernel != "vmap" and self._plan is not None) else "vmap"
        self.why_not_grouped = why
        self._vmapped = vmap(self._functional, in_dims=(0, 0, 0))

    def _functional(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def train(self, mode: bool = True) -> "StackedModels":
        self.base.train(mode)  # both kernels read the modes of the skeleton's modules
        return self

    def forward(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        """All K models on their own batches, x of shape (K, B, ...), by vmap over functional_call:
        (K, B, classes). Buffers are updated in place (BN running statistics in train mode)."""
        return self._vmapped(params, buffers, x)

    def logits_class_first(self, x: torch.Tensor) -> torch.Tensor:
        """(K, classes, B) with this object's own state, by its kernel: the layout cross_entropy
        takes with targets (K, B), and the one the grouped kernel produces without a copy."""
        if self.kernel == "grouped":
            return self._grouped(x)
        return self.forward(self.params, self.buffers, x).transpose(1, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, classes), by this object's kernel."""
        return self.logits_class_first(x).transpose(1, 2)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        k = x.shape[0]
        h = x.reshape(k, x.shape[1], -1).transpose(1, 2)  # (K, in, B): a strided view, BLAS reads it as is
        for step in self._plan:
            if step[0] == "linear":
                h = torch.bmm(p[f"{step[1]}.weight"], h)
            elif step[0] == "bn":
                h = self._batch_norm(h, step[1], step[2])
            else:
                h = F.relu(h)
        w, bias = p["classifier.weight"], p.get("classifier.bias")
        return torch.bmm(w, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), w, h)

    def _batch_norm(self, h: torch.Tensor, prefix: str, mod: nn.BatchNorm1d) -> torch.Tensor:
        """nn.BatchNorm1d.forward for K seeds at once: (K, C, B) is viewed as one sample of K·C
        channels over B positions, so each (seed, channel) pair gets its own statistics over its B
        examples, and the flat views of the (K, C) buffers are updated in place."""
        k, c, n = h.shape
        p, b = self.params, self.buffers
        rm, rv = b.get(f"{prefix}.running_mean"), b.get(f"{prefix}.running_var")
        factor = 0.0 if mod.momentum is None else mod.momentum
        if mod.training and mod.track_running_stats:
            count = b[f"{prefix}.num_batches_tracked"]
            count.add_(1)
            if mod.momentum is None:  # cumulative average; every seed has taken the same number of steps
                factor = 1.0 / float(count[0])
        use_batch = mod.training or rm is None
        track = not mod.training or mod.track_running_stats
        w, bias = p.get(f"{prefix}.weight"), p.get(f"{prefix}.bias")
        out = F.batch_norm(h.reshape(1, k * c, n),
                           rm.view(-1) if track and rm is not None else None,
                           rv.view(-1) if track and rv is not None else None,
                           w.reshape(-1) if w is not None else None, bias.reshape(-1) if bias is not None else None,
                           use_batch, factor, mod.eps)
        return out.view(k, c, n)

    @torch.no_grad()
    def load_slice(self, k: int, model: nn.Module) -> nn.Module:
        """Copy seed k's slice of every parameter and buffer into `model` (in place); returns it."""
        for name, t in model.named_parameters():
            t.copy_(self.params[name][k])
        for name, t in model.named_buffers():
            t.copy_(self.buffers[name][k])
        return model

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Seed k's state into models[k], for every k (the per-seed models observers read)."""
        for k, model in enumerate(models):
            self.load_slice(k, model)


def stack_seeds(models: Sequence[nn.Module], kernel: str = "auto") -> StackedModels:
    """The K per-seed models as one StackedModels (see there)."""
    return StackedModels(models, kernel)


def relative_differences(stacked: StackedModels, models: Sequence[nn.Module], *, buffers: bool = False) -> dict:
    """max over seeds of ‖stacked[k] − models[k]‖ / ‖models[k]‖, per parameter (and buffer) name,
    in float64 (a tensor of zeros counts its absolute difference)."""
    out = {}
    for kind, table, named in (("param", stacked.params, lambda m: m.named_parameters()),
                               ("buffer", stacked.buffers, lambda m: m.named_buffers())):
        if kind == "buffer" and not buffers:
            continue
        for k, model in enumerate(models):
            for name, ref in named(model):
                a, r = table[name][k].detach().double(), ref.detach().double()
                scale = float(r.norm()) or 1.0
                out[name] = max(out.get(name, 0.0), float((a - r).norm()) / scale)
    return out


# ---- the elementwise probe ------------------------------------------------------------------------

PROBE_SHAPES = ((6, 5), (7,), (3, 2, 4))  # a matrix, a vector, a 3-d tensor: per-tensor rules see all three
PROBE_SEEDS = 4
PROBE_STEPS = 3
# Accepted distance, in ulps of the slice's largest element: max |stacked − alone| / (eps · max |alone|).
# torch.optim.SGD measures 0 (bitwise) for-loop and foreach, and Adam too, in float32 and float64.
# Fused SGD measures 0.97 (float64) and 0.32 (float32) under AVX-512 and AVX2 kernels, 0 under the
# portable ones: its vectorized main loop and scalar tail split a stacked tensor elsewhere than its
# slices, one rounding apart (6 ulps of one small element, hence the slice's scale, not each
# element's). A norm-dependent rule misses by 2.6e12 (float64) and 4.9e3 (float32) of these units
# under all three kernel sets (tests/test_vectorized.py's TrustRatioSGD).
MAX_ULPS = 4.0


def _ulps(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) * torch.finfo(ref.dtype).eps
    diff = float((a - ref).abs().max())
    return diff / scale if scale else (0.0 if diff == 0 else math.inf)


@functools.lru_cache(maxsize=None)
def _probe(factory, kwargs_json: str, dtype: torch.dtype) -> tuple[bool, str]:
    kwargs = json.loads(kwargs_json)
    gen = torch.Generator().manual_seed(20240601)
    k = PROBE_SEEDS
    # Slices on different scales (1, 3, 9, 27): a rule that reads a norm over the stacked tensor
    # cannot agree with the per-slice runs by accident.
    scale = 3.0 ** torch.arange(k, dtype=torch.float64)

    def draw(shape):
        t = torch.randn((k, *shape), generator=gen, dtype=torch.float64)
        return (t * scale.view(-1, *[1] * len(shape))).to(dtype)

    inits = [draw(s) for s in PROBE_SHAPES]
    grads = [[draw(s) for s in PROBE_SHAPES] for _ in range(PROBE_STEPS)]
    momentum = 0.9 if accepts(factory, "momentum") else 0.0
    hyper = dict(lr=0.1, momentum=momentum, weight_decay=5e-3)  # the SMD cases' SGD
    spec = _spec(factory)
    stacked = [nn.Parameter(t.clone()) for t in inits]
    single = [[nn.Parameter(t[i].clone()) for t in inits] for i in range(k)]  # seed i's tensors
    try:
        opt_stacked = make_optimizer(factory, spec, [dict(params=stacked, **hyper)], kwargs)
        opts = [make_optimizer(factory, spec, [dict(params=ps, **hyper)], kwargs) for ps in single]
        worst = 0.0
        for s, g in enumerate(grads):
            for p, gs in zip(stacked, g):
                p.grad = gs.clone()
            opt_stacked.step()
            for i, (ps, opt) in enumerate(zip(single, opts)):
                for p, gs in zip(ps, g):
                    p.grad = gs[i].clone()
                opt.step()
            for j, p in enumerate(stacked):
                for i in range(k):
                    u = _ulps(p.detach()[i], single[i][j].detach())
                    if not u <= MAX_ULPS:  # NaN too: an optimizer writing NaN is not shown elementwise
                        ref = single[i][j].detach()
                        rel = float((p.detach()[i] - ref).norm() / ref.norm())
                        return False, (f"not elementwise: after step {s + 1} seed {i}'s slice of a stacked "
                                       f"{tuple(p.shape)} tensor differs from the same tensor stepped alone by "
                                       f"{rel:.2g} relative ({u:.3g} ulps > {MAX_ULPS}): the update reads more "
                                       f"than each element (e.g. a tensor or group norm)")
                    worst = max(worst, u)
    except Exception as exc:  # the optimizer could not run the probe: not known to be elementwise
        return False, f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    how = "bitwise" if worst == 0 else f"within {worst:.3g} ulps"
    return True, (f"elementwise: {PROBE_STEPS} steps on {k} stacked seeds equal the per-seed steps {how} "
                  f"({str(dtype).removeprefix('torch.')})")


def is_elementwise(factory: Callable, kwargs: dict | None = None, *,
                   dtype: torch.dtype = torch.float64) -> tuple[bool, str]:
    """Whether `factory` (torch.optim.SGD's signature, as harness.optim.make_optimizer calls it) steps
    a stacked (K, ...) tensor exactly as K optimizers step its slices: PROBE_STEPS steps with the
    same random gradients, per-slice scales 1, 3, 9, 27, lr 0.1, momentum 0.9 (when the factory takes
    it), weight decay 5e-3; equal within MAX_ULPS ulps. Returns (decision, one-line reason); the
    answer is cached per (factory, kwargs, dtype)."""
    key = json.dumps(kwargs or {}, sort_keys=True)
    try:
        hash(factory)
    except TypeError:
        return _probe.__wrapped__(factory, key, dtype)
    return _probe(factory, key, dtype)


def check_elementwise(factory: Callable, kwargs: dict | None, dtype: torch.dtype) -> str:
    """The probe in float64 (its resolving power: a norm-dependent rule misses by 1e12 ulps there)
    and in `dtype` (kernels that exist only for it): the reasons, joined, or NotElementwise."""
    reasons = []
    for d in dict.fromkeys((torch.float64, dtype)):
        ok, why = is_elementwise(factory, kwargs, dtype=d)
        if not ok:
            raise NotElementwise(why)
        reasons.append(why)
    return "; ".join(reasons)


# ---- training -------------------------------------------------------------------------------------

@dataclass
class GroupSpec:
    """One optimizer group: the parameters named `names` (None: every trainable one not claimed by
    another group), an LR (a float or a schedule k -> lr), momentum and coupled weight decay."""

    lr: float | Callable[[int], float]
    momentum: float = 0.0
    weight_decay: float = 0.0
    names: tuple[str, ...] | None = None

    def lr_at(self, k: int) -> float:
        return float(self.lr(k)) if callable(self.lr) else float(self.lr)


def _groups(named: dict[str, torch.Tensor], specs: Sequence[GroupSpec]) -> list[tuple[GroupSpec, list]]:
    """Each spec with its tensors, in `named`'s order (the same order for a model and its stack)."""
    claimed = {n for s in specs if s.names is not None for n in s.names}
    out = []
    for s in specs:
        names = set(s.names) if s.names is not None else {n for n, t in named.items()
                                                          if n not in claimed and t.requires_grad}
        order = [n for n in named if n in names]
        if order:
            out.append((s, [named[n] for n in order]))
    return out


def _make(factory, groups: list[tuple[GroupSpec, list]], kwargs: dict | None):
    return make_optimizer(factory, _spec(factory), [
        dict(params=ps, lr=s.lr_at(0), momentum=s.momentum, weight_decay=s.weight_decay) for s, ps in groups], kwargs)


class StackedTrainer:
    """K seeds of one arm, one update each per `step`: zero_grad, the stacked forward, each seed's
    mean cross-entropy on its own batch (their sum is backpropagated, so seed k's gradient is its
    own loss's), one optimizer step on the stacked tensors. Raises NotElementwise when the
    optimizer fails the probe."""

    def __init__(self, models: Sequence[nn.Module], groups: Sequence[GroupSpec], *,
                 factory: Callable = torch.optim.SGD, optimizer_kwargs: dict | None = None, kernel: str = "auto"):
        dtype = next(models[0].parameters()).dtype
        try:
            self.elementwise = check_elementwise(factory, optimizer_kwargs, dtype)  # for the run's metadata
        except NotElementwise as exc:
            raise NotElementwise(f"{_spec(factory)}: {exc}") from None
        self.stacked = stack_seeds(models, kernel)
        self.stacked.train(True)
        self.groups = _groups(self.stacked.params, groups)
        self.optimizer = _make(factory, self.groups, optimizer_kwargs)

    @property
    def kernel(self) -> str:
        return self.stacked.kernel

    def step(self, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update k (0-based) on x (K, B, ...), y (K, B): the K losses, detached."""
        for group, (spec, _) in zip(self.optimizer.param_groups, self.groups):
            group["lr"] = spec.lr_at(k)
        self.optimizer.zero_grad(set_to_none=True)
        losses = F.cross_entropy(self.stacked.logits_class_first(x), y, reduction="none").mean(1)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()


class SequentialTrainer:
    """The reference: each seed's own model and optimizer, one update each per `step`, as
    harness.runner.ArmState.step does it (zero_grad, forward, mean cross-entropy, backward, step)."""

    def __init__(self, models: Sequence[nn.Module], groups: Sequence[GroupSpec], *,
                 factory: Callable = torch.optim.SGD, optimizer_kwargs: dict | None = None):
        self.models = list(models)
        for m in self.models:
            m.train()
        self.groups = [_groups(dict(m.named_parameters()), groups) for m in self.models]
        self.optimizers = [_make(factory, g, optimizer_kwargs) for g in self.groups]

    def step(self, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = []
        for i, (model, opt, groups) in enumerate(zip(self.models, self.optimizers, self.groups)):
            for group, (spec, _) in zip(opt.param_groups, groups):
                group["lr"] = spec.lr_at(k)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)


def next_batches(sources: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch from each seed's source, stacked: x (K, B, ...), y (K, B)."""
    pairs = [s.next_batch() for s in sources]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@dataclass
class StackedRun:
    losses: torch.Tensor  # (steps, K): seed k's mean training loss at each update
    stacked: StackedModels
    kernel: str  # "grouped" or "vmap"
    elementwise: str  # the probe's reason line


def train_stacked(models: Sequence[nn.Module], sources: Sequence, steps: int, *, lr=0.1, momentum: float = 0.0,
                  weight_decay: float = 0.0, groups: Sequence[GroupSpec] | None = None,
                  factory: Callable = torch.optim.SGD, optimizer_kwargs: dict | None = None,
                  kernel: str = "auto") -> StackedRun:
    """Train models[k] on sources[k]'s batches (each with next_batch(), as harness.datasets'), all K
    at once, for `steps` updates. `groups` (default: one group of every trainable parameter with
    lr, momentum, weight_decay). The models are not modified: `write_back` copies the result."""
    groups = groups or [GroupSpec(lr, momentum, weight_decay)]
    trainer = StackedTrainer(models, groups, factory=factory, optimizer_kwargs=optimizer_kwargs, kernel=kernel)
    losses = [trainer.step(k, *next_batches(sources)) for k in range(steps)]
    return StackedRun(torch.stack(losses) if losses else torch.empty(0, len(models)), trainer.stacked,
                      trainer.kernel, trainer.elementwise)


def train_sequential(models: Sequence[nn.Module], sources: Sequence, steps: int, *, lr=0.1, momentum: float = 0.0,
                     weight_decay: float = 0.0, groups: Sequence[GroupSpec] | None = None,
                     factory: Callable = torch.optim.SGD, optimizer_kwargs: dict | None = None) -> torch.Tensor:
    """The per-seed reference for train_stacked, training `models` in place: (steps, K) losses.
    Batches are drawn exactly as train_stacked draws them (every source once per update)."""
    groups = groups or [GroupSpec(lr, momentum, weight_decay)]
    trainer = SequentialTrainer(models, groups, factory=factory, optimizer_kwargs=optimizer_kwargs)
    losses = [trainer.step(k, *next_batches(sources)) for k in range(steps)]
    return torch.stack(losses) if losses else torch.empty(0, len(models))
