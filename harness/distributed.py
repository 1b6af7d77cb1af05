"""Data-parallel runs of a case: the same global batches as the single-process run, split across
processes, with DistributedDataParallel (gloo on the CPU, nccl on CUDA).

    torchrun --nproc_per_node=2 -m harness.distributed --case CASE --steps N --out DIR
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        -m harness.distributed --case CASE --out DIR

Every rank runs harness.runner.run_seed itself, with the DataParallel execution hooks: the same
seed streams, initial weights and batch sequence (each rank draws the whole global batch,
augmentation included, and keeps its contiguous shard, rank r of W taking rows [r·B/W, (r+1)·B/W)),
and the same training loops, so step- and epoch-unit cases, batch multipliers, batch-size
schedules and activation noise all run data-parallel. Each arm's model is wrapped in DDP, so the
arms still step in lock-step. Rank 0 runs the case's measurements
and writes a run directory: results.csv and verdicts.csv as `python -m harness run` writes them
(verdicts only when the full case ran), metadata.json, and the final weights of every arm as
weights-<arm>-seed<seed>.npz (numpy, no pickle).

Why the result equals the single-process run (up to float roundoff):
- The loss is a mean over the batch and every shard has B/W examples, so the mean over ranks of
  the shard gradients, which DDP computes, is the gradient of the global mean loss. B must be a
  multiple of W (checked).
- Batch norm couples the examples of a batch. Per-rank statistics over B/W examples are a
  different function (`--bn local`, the negative control), so by default (`--bn global`) every
  BatchNorm layer becomes a GlobalBatchNorm: the per-channel sums and squared deviations are
  all-reduced with autograd (torch.distributed.nn.functional.all_reduce), so the forward uses the
  statistics of the global batch and the backward gets the cross-rank terms, exactly as
  nn.SyncBatchNorm does. torch's SyncBatchNorm is not used because it accepts CUDA/XPU/HPU inputs
  only, and the test of this module runs on the CPU with gloo. GhostBatchNorm2d needs no
  communication to normalize when every shard is a whole number of ghost batches (checked); its
  running statistics are all-gathered so every rank tracks what one process would.
  GroupNorm / LayerNorm / InstanceNorm act per example and need nothing.
- Measurements run on rank 0 only, on the unwrapped models, with the cross-rank statistics off
  (`local_statistics()`): they see the same weights and buffers as every other rank.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness.runner import SingleProcess

_STATE = {"group": None, "enabled": True}


# ---- batch statistics across ranks -----------------------------------------------------------------

def _sync_group():
    """The process group for cross-rank batch statistics, or None (single process, or disabled)."""
    import torch.distributed as dist
    if not _STATE["enabled"] or _STATE["group"] is None or not dist.is_initialized():
        return None
    return _STATE["group"]


@contextlib.contextmanager
def local_statistics():
    """Inside: every normalization layer uses this process's batch only (for rank-0 measurements)."""
    before = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = before


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum is the sum of the ranks' gradients
    (what the deprecated torch.distributed.nn.functional.all_reduce does)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of a data-parallel run (any input N × C × ...). In train
    mode, with a sync group, the per-channel sum and count, then the sum of squared deviations,
    are all-reduced (two-pass variance, as F.batch_norm on the CPU), with autograd; running
    statistics are updated with the global mean and unbiased variance. Otherwise it is BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N × C × ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = _sync_group() if self.training else None
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        total = all_reduce_sum(torch.cat([x.sum(dims), count]), group)
        n = total[-1].detach()
        mean = total[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims), group) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)), alpha=f)
        return y


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def use_global_batch_stats(model: nn.Module) -> int:
    """Swap every plain BatchNorm*d for a GlobalBatchNorm (same parameters and buffers) and let every
    GhostBatchNorm2d gather its running statistics across ranks. Returns the number of layers touched."""
    from harness.models import GhostBatchNorm2d
    touched = 0
    for name, child in list(model.named_children()):
        if type(child) in _PLAIN_BN:
            new = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                  affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            ref = next(child.parameters(), None)
            if ref is None:
                ref = next(child.buffers(), None)
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            new.train(child.training)
            setattr(model, name, new)
            touched += 1
        elif isinstance(child, GhostBatchNorm2d):
            child.stats_group = _sync_group  # a function: deep copies of the model keep working
            touched += 1
        else:
            touched += use_global_batch_stats(child)
    return touched


def check_ghost_shards(model: nn.Module, shard: int) -> None:
    from harness.models import GhostBatchNorm2d
    for name, mod in model.named_modules():
        if isinstance(mod, GhostBatchNorm2d) and shard % mod.ghost_batch:
            raise ValueError(f"{name}: the per-rank batch {shard} is not a multiple of ghost_batch "
                             f"{mod.ghost_batch}, so the ranks' ghost batches would differ from the "
                             f"single-process run's")


# ---- the run -------------------------------------------------------------------------------------

def world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of a global batch (its first dimension)."""
    b = t.shape[0]
    if b % size:
        raise ValueError(f"the global batch of {b} does not split into {size} equal shards; "
                         f"use a batch size that is a multiple of the number of processes")
    n = b // size
    return t[rank * n:(rank + 1) * n]


def _global_mean(value: float, device: torch.device, size: int) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / size


def _gather_batch(t: torch.Tensor, size: int) -> torch.Tensor:
    """The global batch's rows from every rank's shard, in rank order (= batch order)."""
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class DataParallel(SingleProcess):
    """harness.runner's execution hooks for one rank of a data-parallel run (see the module
    docstring): the shared initial model gets global batch statistics, each arm's model is wrapped
    in DDP, every update takes this rank's shard of the global batch, and rank 0 records the
    measurements. With a single process every hook is the runner's own."""

    def __init__(self, bn: str = "global"):
        if bn not in ("global", "local"):
            raise ValueError(f"bn must be 'global' or 'local', got {bn!r}")
        self.bn = bn
        self.rank, self.size = world()
        self.case_id, self.device = "", torch.device("cpu")
        self.wrapped: dict[str, nn.Module] = {}
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self._shards_checked: set[int] = set()

    def prepare(self, case, model0: nn.Module, source) -> None:
        self.case_id, self.device = case.id, source.train_x.device
        if self.size > 1 and self.bn == "global":
            use_global_batch_stats(model0)  # every batch an arm takes is checked in step()

    def _check_batch(self, model: nn.Module, b: int) -> None:
        if b % self.size:
            raise ValueError(f"case {self.case_id}: batch size {b} is not a multiple of the {self.size} processes")
        if b not in self._shards_checked:
            check_ghost_shards(model, b // self.size)
            self._shards_checked.add(b)

    def attach(self, arms: dict) -> None:
        if self.size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = {name: DDP(arm.model, device_ids=ids) for name, arm in arms.items()}

    def step(self, arm, k: int, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.size == 1:
            return super().step(arm, k, x, y)
        b = len(y)
        self._check_batch(arm.model, b)  # epoch-unit arms change their batch size
        raw, arm.model = arm.model, self.wrapped[arm.spec.name]  # ArmState.step calls self.model(x)
        try:
            arm.step(k, shard(x, self.rank, self.size), shard(y, self.rank, self.size))
        finally:
            arm.model = raw
        arm.last_loss = value = _global_mean(arm.last_loss, self.device, self.size)
        arm.last_output = _gather_batch(arm.last_output, self.size)  # batch_gap on the global batch
        arm.batch_size = b
        return value

    def observe(self, measure) -> list[tuple]:
        if self.rank != 0:
            return []
        with local_statistics():
            return measure()

    def finish(self, arms: dict) -> None:
        self.states = {name: {k: v.detach().cpu() for k, v in arm.model.state_dict().items()}
                       for name, arm in arms.items()}
        self.wrapped = {}


def run_seed(case, seed: int, *, steps: int, env, bn: str = "global") -> tuple[list[tuple], dict]:
    """One seed of `case` for `steps` updates (or epochs) on this rank. Returns (tidy rows, final
    state dicts per arm); the rows are complete on rank 0 only (the other ranks return none)."""
    from harness import runner
    execution = DataParallel(bn)
    rows = runner.run_seed(dataclasses.replace(case, steps=steps, smoke_steps=steps), seed, env, execution)
    return rows, execution.states


def run(case, *, steps: int | None = None, env=None, bn: str = "global", out: Path | None = None,
        command: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Every seed of the case (env.seeds_for(case)); rank 0 writes the run directory `out`."""
    from harness import store
    from harness.checks import VERDICT_COLUMNS, evaluate
    from harness.runner import RESULT_COLUMNS, RunEnv

    env = env or RunEnv()
    steps = steps or env.steps_for(case)
    rank, size = world()
    t0 = time.perf_counter()
    rows, states = [], {}
    for seed in env.seeds_for(case):
        seed_rows, seed_states = run_seed(case, seed, steps=steps, env=env, bn=bn)
        rows.extend(seed_rows)
        states.update({(arm, seed): s for arm, s in seed_states.items()})
    if size > 1:
        import torch.distributed as dist
        dist.barrier()  # every collective is done before any rank leaves, or rank 0 writes
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if rank == 0 and out is not None:
        full = steps == case.steps and not env.smoke
        verdicts = evaluate(case, results) if full else pd.DataFrame(columns=VERDICT_COLUMNS)
        rd = store.RunDir(out)
        rd.write_results(results)
        rd.write_verdicts(verdicts)
        for (arm, seed), state in states.items():
            np.savez(Path(out) / f"weights-{arm}-seed{seed}.npz",
                     **{k: v.numpy() for k, v in state.items()})
        meta = store.metadata(profile=case.profile, device=env.device_for(case), dtype=env.dtype_for(case),
                              optimizer=env.optimizer, seeds={case.id: list(env.seeds_for(case))},
                              smoke=env.smoke, command=command or sys.argv)
        meta.update(distributed={"world_size": size, "bn": bn, "steps": steps,
                                 "backend": _backend_name()},
                    cases={case.id: {"status": ("ok" if verdicts.ok.astype(bool).all() else "fail")
                                     if full else "partial", "seconds": round(time.perf_counter() - t0, 2)}})
        rd.write_metadata(meta)
    return results, states


def _backend_name() -> str | None:
    import torch.distributed as dist
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def init_process_group(device_kind: str, **kwargs) -> None:
    """Join the job: by default torchrun's (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the
    environment), else whatever `kwargs` pass to dist.init_process_group (init_method, rank,
    world_size). nccl on CUDA, gloo on the CPU. A second group of the same ranks carries the batch
    statistics, so they never interleave with DDP's gradient buckets."""
    import torch.distributed as dist
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", **kwargs)
    _STATE["group"] = dist.new_group(backend=dist.get_backend())


def shutdown() -> None:
    """Leave the job (every rank, also after an error). Dropping our own reference to the
    statistics group, and collecting, frees every process group (and any finished gloo work still
    holding tensors) while the interpreter is whole: a group that survives into interpreter
    finalization can have a gloo worker thread release a tensor then, which aborts the process
    ("terminate called without an active exception", SIGABRT; seen about once in 30-100 spawned
    two-rank runs before this). No barrier here: `run` has one after its last collective, and a
    rank that failed mid-run must not wait for peers blocked in a training collective."""
    import gc

    import torch.distributed as dist
    _STATE["group"] = None
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    from harness import registry
    from harness.optim import DEFAULT_OPTIMIZER
    from harness.runner import Diverged, RunEnv, Unsupported

    p = argparse.ArgumentParser(prog="python -m harness.distributed",
                                description="Run one case data-parallel under torchrun (DDP).")
    p.add_argument("--case", required=True, help="a registered case id")
    p.add_argument("--steps", type=int, default=None, help="updates, or epochs for an epoch-unit case "
                                                           "(default: the case's own; verdicts are "
                                                           "written only for the full case)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the case's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the case profile's; on CUDA each "
                                                  "process takes GPU LOCAL_RANK)")
    p.add_argument("--dtype", default=None, choices=("float64", "float32"))
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, metavar="pkg.module:Name")
    p.add_argument("--bn", default="global", choices=("global", "local"),
                   help="batch-norm statistics over the global batch (default, = single process) or "
                        "per rank (a different function: the negative control)")
    p.add_argument("--smoke", action="store_true", help="tiny data, the case's smoke steps")
    p.add_argument("--out", required=True, help="run directory (written by rank 0)")
    args = p.parse_args(argv)

    cases = registry.all_cases()
    if args.case not in cases:
        print(f"error: unknown case {args.case!r} (see `python -m harness list`)", file=sys.stderr)
        return 2
    case = cases[args.case]
    env = RunEnv(device=args.device, optimizer=args.optimizer, dtype=args.dtype, smoke=args.smoke,
                 seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None)
    kind = torch.device(env.device_for(case)).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            print(f"error: case {case.id} runs on CUDA and none is available (--device cpu for a dry run)",
                  file=sys.stderr)
            return 2
        from harness.device import conformance_mode
        conformance_mode("cuda")  # before CUDA starts (CUBLAS_WORKSPACE_CONFIG)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        init_process_group(kind)
        if kind == "cuda":
            env = RunEnv(device=f"cuda:{torch.cuda.current_device()}", optimizer=env.optimizer,
                         dtype=env.dtype, smoke=env.smoke, seeds=env.seeds)
    try:
        run(case, steps=args.steps, env=env, bn=args.bn, out=Path(args.out),
            command=["python", "-m", "harness.distributed", *(argv if argv is not None else sys.argv[1:])])
    except (ValueError, Unsupported) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
