"""Shared set-up for the asv suite (no benchmarks here: asv only collects time_/peakmem_/track_ names).

* The harness is imported from the checkout the suite belongs to (or from $LRC_BENCH_ROOT, which is
  how docs/benchmarks.md compares against main without reinstalling anything): asv's "existing" environment
  never installs the project, and the venv need not hold an editable install of it.
* torch runs on LRC_BENCH_THREADS threads (default 1): the CPU profile runs at 1 thread per
  pytest-xdist worker, and a single thread keeps timings stable on a shared 2-core machine.
* Timings are CPU time of the benchmark process (TIMER), see below.
* Everything is CPU-only; nothing here touches CUDA, so the suite imports on any machine.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import sys
import time
from types import SimpleNamespace

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]  # the checkout holding this suite
ROOT = pathlib.Path(os.environ.get("LRC_BENCH_ROOT") or CHECKOUT).resolve()  # the harness measured
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]  # first, ahead of the cwd
THREADS = int(os.environ.get("LRC_BENCH_THREADS", "1"))
QUICK = os.environ.get("LRC_BENCH_QUICK") == "1"  # set by scripts/asv-quick: a smoke run, not figures


_IMPORT_ERRORS: list[ImportError] = []


@contextlib.contextmanager
def safe_import():
    """scipy's pattern: a benchmark module whose imports fail still imports, so discovery of the
    whole suite never breaks; its benchmarks then fail in setup with the real error (require())."""
    try:
        yield
    except ImportError as exc:
        _IMPORT_ERRORS.append(exc)


def require() -> None:
    """Call first in every setup: re-raises an import error swallowed by safe_import."""
    if _IMPORT_ERRORS:
        raise _IMPORT_ERRORS[0]


def warm_torch_optim() -> None:
    """The first torch.optim optimizer of a process imports torch._dynamo (and sympy) lazily:
    about 1 s and 160 MB here. Paid in setup, so no timed figure includes it and every peakmem
    figure does (Baseline.peakmem_baseline measures exactly that floor)."""
    require()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


with safe_import():
    import torch
    from torch import nn

    from harness import measurements, registry
    from harness.datasets import build_source
    from harness.models import build_model
    from harness.optim import DEFAULT_OPTIMIZER, load_factory
    from harness.runner import PROBE_SIZE, ArmState, RunEnv, seed_streams

    torch.set_num_threads(THREADS)

# One 2-arm (WD vs exp-LR) case per model in harness.models.MODELS. The CPU cases keep their own
# model, data and dtype (float64); ResNet-18 exists only in the GPU case, so it runs here in float32
# on a small Gaussian batch (8 images of 3x32x32) to stay quick on a CPU.
MODEL_CASES = {
    "norm_mlp": ("wdexp-zerobuf-mlp-bn", None),
    "norm_cnn": ("wdexp-zerobuf-cnn-bn", None),
    "resnet18_cifar": ("wdexp-gpu-resnet18-cifar10",
                       ("gaussian_mixture", {"n": 64, "shape": (3, 32, 32), "classes": 10, "batch_size": 8})),
    # The batch-size claim's GPU model (ghost BN 128), on the same small Gaussian batch.
    "wrn16_4": ("batch-gpu-wrn16-4-cifar10",
                ("gaussian_mixture", {"n": 64, "shape": (3, 32, 32), "classes": 10, "batch_size": 8})),
    "two_layer_relu": ("lwm-toy-learning-order", None),  # the learning-order toy, its own data
    # The SMD / intrinsic-LR cases' BN MLP (width 128, batch 128) with their per-step angular observer.
    "sphere_mlp": ("smd-momentum-equilibrium", None),
}
# Not here: WRN-16-10 (the learning-order GPU model, 6× WRN-16-4's FLOPs: seconds per CPU step) and
# the small CIFAR CNNs of the slow cases (norm_cnn, covered above at the exact cases' size).
NEEDS_TEST_SPLIT = {"test_acc", "eval_acc"}  # not measurable on the benchmarks' Gaussian ResNet batch
CYCLE = 200  # the LR index cycles over the CPU cases' 200 steps, so exp-LR stays in its real range


def lockstep_state(model_name: str, seed: int = 0) -> SimpleNamespace:
    """What harness.runner.run_seed builds before its loop, for one model: the case's arms as
    ArmStates, one batch, the probe batch, the observers and their context."""
    require()
    case = registry.get(MODEL_CASES[model_name][0])
    data = MODEL_CASES[model_name][1] or case.data
    env = RunEnv(device="cpu")
    dtype = getattr(torch, env.dtype_for(case))
    streams = seed_streams(seed)
    gens = {k: torch.Generator().manual_seed(v) for k, v in streams.items()}
    source = build_source(data[0], dict(data[1]), gen=gens["data"], aug_gen=gens["aug"], dtype=dtype,
                          device=torch.device("cpu"), smoke=False)
    model0 = build_model(case.model[0], dict(case.model[1]), generator_seed=streams["init"],
                         dtype=dtype, device=torch.device("cpu"))
    factory = load_factory(DEFAULT_OPTIMIZER)
    arms = {a.name: ArmState(a, copy.deepcopy(model0), factory, DEFAULT_OPTIMIZER, case.requires)
            for a in case.arms}
    probe = source.probe(min(PROBE_SIZE, len(source.train_x)), gens["probe"])
    ctx = SimpleNamespace(arms=arms, reference=case.reference, probe=probe, source=source, t=0, state={})
    x, y = source.next_batch()
    # The case's own measurements, each at its declared frequency (`every`).
    observers = [measurements.resolve(m) for m in case.measurements
                 if (m if isinstance(m, str) else m[0]) not in NEEDS_TEST_SPLIT]
    # Epoch-unit cases observe once per epoch: an observer call is spread over the epoch's updates.
    per_update = 1 / source.steps_per_epoch if case.unit == "epoch" else 1.0
    return SimpleNamespace(case=case, model0=model0, arms=arms, ctx=ctx, x=x, y=y, k=0, observers=observers,
                           per_update=per_update)


def lockstep_update(s: SimpleNamespace, measured: bool) -> None:
    """One iteration of run_seed's loop on a fixed batch: every arm steps, then (if `measured`)
    every observer runs, whatever its `every` (the cost of one measured step; see
    amortized_observer_seconds for the per-step average). Rows are built as the runner builds
    them, then dropped."""
    k = s.k % CYCLE
    s.k += 1
    for arm in s.arms.values():
        arm.step(k, s.x, s.y)
    if measured:
        s.ctx.t = k + 1
        for _, observe, _ in s.observers:
            observe_rows(s, observe)


def observe_rows(s: SimpleNamespace, observe) -> list:
    return [(s.case.id, arm, 0, s.ctx.t, metric, value) for arm, metric, value in observe(s.ctx)]


def amortized_observer_seconds(s: SimpleNamespace, rounds: int, inner: int) -> float:
    """CPU seconds per update spent in the case's observers: each observer's best time per call
    divided by its `every` (an observer that runs every 25th update costs 1/25 of a call per update),
    and by the updates per epoch in an epoch-unit case."""
    s.ctx.t = 1
    return s.per_update * sum(best_of(lambda: observe_rows(s, observe), rounds, inner) / every
                              for _, observe, every in s.observers)


class RawLoop:
    """The minimal hand-written PyTorch loop for the same model and batch: the yardstick for the
    harness's own overhead (one model, one optimizer over all trainable parameters)."""

    def __init__(self, s: SimpleNamespace):
        arm = s.arms[s.ctx.reference]  # the reference (WD) arm's hyper-parameters
        self.model = copy.deepcopy(s.model0)  # the arms train copies of it too
        frozen = arm.spec.other is None  # the harness freezes non-SI parameters when an arm says so
        si = set(self.model.si_names)
        params = [p for n, p in self.model.named_parameters()
                  if p.requires_grad and (n in si or not frozen)]
        g = arm.spec.si if arm.si_params else arm.spec.other  # the group that holds the parameters
        self.opt = torch.optim.SGD(params, lr=g.lr(0), momentum=g.momentum, weight_decay=g.weight_decay)
        self.x, self.y = s.x, s.y

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()


# CPU seconds of this process, not wall time: on 1 thread the two agree on an idle machine, and CPU
# time leaves out the time the process sits preempted by other jobs on a shared 2-core machine.
TIMER = time.process_time


def best_of(fn, rounds: int, inner: int) -> float:
    """CPU seconds per call: the best mean over `rounds` rounds of `inner` calls (the min is the
    figure least disturbed by other processes)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = TIMER()
        for _ in range(inner):
            fn()
        best = min(best, (TIMER() - t0) / inner)
    return best
