"""`scripts/gpu-quick OUT_DIR`: the first thing to run when a CUDA device is available (docs/gpu.md).

Five checks, each a small function returning one row {check, status: ok|fail|skipped, seconds,
figures..., message}, within a total time budget (8 minutes by default):

1. `exact`: every exact case (marker `exact`, CPU profile) on the device, in float64 unless the case
   declares its dtype (three bitwise claims are about float32), as a normal run directory
   OUT_DIR/exact/ and the HTML report OUT_DIR/report.html;
2. `determinism`: the first exact CNN case run twice in conformance mode, results bitwise equal;
3. `resnet18`: one short epoch of ResNet-18 on synthetic CIFAR-shaped data, in conformance mode and in
   throughput mode, with images/s for both;
4. `xdist`: which GPU each pytest-xdist worker of `-n auto` would get (the pure functions conftest.py
   uses);
5. `ddp`: the data-parallel smoke run under torchrun (2 processes; nccl on 2+ GPUs, gloo on the CPU).

Every row goes into OUT_DIR/gpu-quick.json, rewritten (atomically) after every check, so a kill keeps
what finished. A check that would start past the budget is recorded as skipped. Exit 0 when no check
failed, 1 when one did (one line on stderr says which), 2 for bad input.
`--device cpu --smoke` is the dry run CI does (tests/test_gpu_quick.py).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness import store
from harness.device import (auto_workers, conformance_mode, determinism_settings, gpu_count, pin_worker_gpu,
                            throughput_mode, timed, visible_device_for_worker)
from harness.optim import first_line

JSON_NAME = "gpu-quick.json"
REPORT_NAME = "report.html"
BUDGET_S = 480.0
ROW_STATUSES = ("ok", "fail", "skipped")
# Case outcomes that leave the exact check failing: the ones `harness run` exits 1 on.
FAILING_OUTCOMES = ("fail", "error", "xpass")
RESULT_KEYS = ["case", "arm", "seed", "step", "metric"]

RESNET_IMAGES, RESNET_SMOKE_IMAGES = 2048, 64
RESNET_BATCH, RESNET_SMOKE_BATCH = 128, 32
# Throughput switches, tried in order until one trains. On the CPU, torch.compile is left out:
# measured on this project's 2-core machine it took 52 s to compile ResNet-18 and the compiled step
# was no faster (0.44-0.59 s against 0.37 s eager, batch 32, bf16). bf16 autocast is kept there
# (0.37 s against 0.61 s in float32 on the same machine); a CPU without bf16 kernels falls back.
THROUGHPUT_TRIES = {
    "cuda": ({"compile": True, "bf16_autocast": True}, {"compile": False, "bf16_autocast": True}),
    "cpu": ({"compile": False, "bf16_autocast": True}, {"compile": False, "bf16_autocast": False}),
}

DDP_CASE = "wdexp-gpu-resnet18-cifar10"  # the case docs/gpu.md runs data-parallel
DDP_MIN_TIMEOUT_S = 120.0  # two processes start torch and join the group before the first step


@dataclass
class Budget:
    seconds: float
    start: float

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


@dataclass
class Quick:
    """What every check is given."""

    out: Path
    device: str  # "cuda" or "cpu"
    smoke: bool
    budget: Budget
    command: list[str]


# ---- the JSON -------------------------------------------------------------------------------------

def finite(obj):
    """The document with NaN and ±inf as None: JSON has no NaN (json.dumps(allow_nan=False) refuses it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return finite(obj.item())
    return obj


def write_json(path: Path, doc: dict) -> None:
    store.atomic_write_text(path, json.dumps(finite(doc), indent=2, allow_nan=False) + "\n")


def machine(device: str) -> dict:
    n = gpu_count()
    return {"device": device, "device_name": store.device_name(device), "gpu_count": n,
            "gpus": [torch.cuda.get_device_name(i) for i in range(n)] if n else [],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "host": platform.node(), "git_commit": store.git_commit()}


# ---- running the checks ---------------------------------------------------------------------------

def run_check(name: str, check: Callable[[Quick], dict], q: Quick) -> dict:
    """The check's row; a check that raises fails with the exception's first line."""
    if q.budget.left() <= 0:
        return {"check": name, "status": "skipped", "seconds": 0.0,
                "message": f"over budget ({q.budget.used():.0f} s of {q.budget.seconds:.0f} s used)"}
    t0 = time.perf_counter()
    try:
        found = check(q)
    except Exception as exc:
        first = first_line(exc)
        found = {"status": "fail", "message": f"raised {type(exc).__name__}" + (f": {first}" if first else "")}
    status, message = found.pop("status"), found.pop("message", "")
    if status not in ROW_STATUSES:
        raise ValueError(f"check {name} returned status {status!r}, not one of {ROW_STATUSES}")
    return {"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 2), **found,
            "message": message}


def row_line(row: dict) -> str:
    return f"{row['status'].upper():8s} {row['check']:12s} {row['seconds']:7.1f}s  {row['message']}".rstrip()


# ---- 1. the exact cases ---------------------------------------------------------------------------

def exact_cases() -> list:
    from harness import registry
    return [c for c in registry.all_cases().values() if c.exact and c.profile == "cpu"]


def _exact_env(case, q: Quick):
    from harness.runner import RunEnv
    # float64 unless the case declares its dtype: the float32 ones claim bitwise equality in float32.
    return RunEnv(device=q.device, dtype=case.default_dtype(), smoke=q.smoke)


def _run_exact_case(case, q: Quick, run_dir: store.RunDir) -> tuple[object | None, dict]:
    """(Outcome or None, the metadata entry) of one case; whatever it raises is its error only."""
    from harness import session
    from harness.checkpoint import file_stem
    t0 = time.perf_counter()
    try:
        outcome = session.execute(case, _exact_env(case, q))
    except Exception as exc:  # bad input (no data, a malformed case) still ends this case only
        first = first_line(exc)
        return None, {"status": "error", "seconds": round(time.perf_counter() - t0, 2),
                      "message": f"{case.id} raised {type(exc).__name__}" + (f": {first}" if first else "")}
    entry = {"status": outcome.status, "seconds": round(time.perf_counter() - t0, 2), "message": outcome.message}
    if outcome.traceback:
        tb_file = run_dir.path / "errors" / f"{file_stem(case.id)}.txt"
        store.atomic_write_text(tb_file, f"{case.id}: {outcome.message}\n\n{outcome.traceback}")
        entry["traceback"] = str(tb_file.relative_to(run_dir.path))
    return outcome, entry


def _counts(statuses: dict, smoke: bool) -> dict:
    seen = collections.Counter(("ok" if smoke and s["status"] == "smoke" else s["status"])
                               for s in statuses.values())
    return {k: seen.get(k, 0) for k in ("ok", "fail", "error", "skipped", "xfail", "xpass")}


def _table(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]  # pandas warns on concatenating empty frames
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def check_exact(q: Quick) -> dict:
    from harness import report
    from harness.checks import VERDICT_COLUMNS
    from harness.optim import DEFAULT_OPTIMIZER
    from harness.runner import RESULT_COLUMNS

    cases = exact_cases()
    run_dir = store.RunDir(q.out / "exact")
    meta = store.metadata(profile=None, device=q.device, dtype=None, optimizer=DEFAULT_OPTIMIZER, smoke=q.smoke,
                          seeds={c.id: list(_exact_env(c, q).seeds_for(c)) for c in cases}, command=q.command)
    statuses: dict[str, dict] = {}
    results, verdicts = [], []
    meta.update(status="running", cases=statuses)
    run_dir.write_metadata(meta)
    for case in cases:
        if q.budget.left() <= 0:  # the budget bounds the whole script, this check included
            statuses[case.id] = {"status": "skipped", "seconds": 0.0, "message": "not run: gpu-quick over budget"}
        else:
            outcome, statuses[case.id] = _run_exact_case(case, q, run_dir)
            if outcome is not None:
                results.append(outcome.results)
                verdicts.append(outcome.verdicts)
        # After every case, as `harness run` does: a kill keeps every finished case.
        run_dir.write_results(_table(results, RESULT_COLUMNS))
        run_dir.write_verdicts(_table(verdicts, VERDICT_COLUMNS))
        run_dir.write_metadata(meta)
        s = statuses[case.id]
        print(f"  exact {s['status']:8s} {case.id}  {s['seconds']:.1f}s  {s['message']}".rstrip(), flush=True)
    meta.update(status="finished")
    run_dir.write_metadata(meta)
    report.write_report(run_dir.path, q.out / REPORT_NAME, baseline=None)
    counts = _counts(statuses, q.smoke)
    bad = [c for c, s in statuses.items() if s["status"] in FAILING_OUTCOMES]
    summary = f"{len(cases)} cases on {q.device}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in
                                                               ("ok", "fail", "error", "skipped"))
    message = summary + (f"; not as intended: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} "
                         f"(see exact/verdicts.csv and exact/metadata.json)" if bad else "")
    dtypes = collections.Counter(c.default_dtype() for c in cases)
    return {"status": "fail" if bad else "ok", "cases": len(cases), **counts, "dtypes": dict(dtypes),
            "run_dir": str(run_dir.path), "report": str(q.out / REPORT_NAME), "message": message}


# ---- 2. determinism -------------------------------------------------------------------------------

def determinism_case():
    """The first exact CNN case, preferring a float32 one: convolutions are where CUDA kernels may be
    non-deterministic (atomics in the weight gradient), and float32 is where the choice of kernel
    shows first."""
    cnn = [c for c in exact_cases() if c.model[0] == "norm_cnn"]
    if not cnn:
        raise LookupError("no exact CNN case is registered")
    f32 = [c for c in cnn if c.default_dtype() == "float32"]
    return (f32 or cnn)[0]


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Whether two results tables are bitwise equal: the same rows (case, arm, seed, step, metric) in
    the same order, and every value with the same bits (`==` on the float64 bit patterns, so a NaN
    equals the same NaN and -0.0 differs from 0.0; never isclose)."""
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    if len(a) != len(b) or not a[RESULT_KEYS].astype(str).equals(b[RESULT_KEYS].astype(str)):
        return {"equal": False, "rows": [len(a), len(b)], "differing": None, "max_abs_diff": None,
                "why": "the tables hold different rows"}
    va = a["value"].to_numpy(dtype=np.float64)
    vb = b["value"].to_numpy(dtype=np.float64)
    same = va.view(np.int64) == vb.view(np.int64)
    with np.errstate(invalid="ignore"):
        gaps = np.abs(va - vb)[~same]
    return {"equal": bool(same.all()), "rows": len(a), "differing": int((~same).sum()),
            "max_abs_diff": float(gaps.max()) if gaps.size else 0.0,
            "why": "" if same.all() else f"{int((~same).sum())} of {len(a)} values differ"}


def run_once(case, env) -> pd.DataFrame:
    from harness.runner import run_case
    return run_case(case, env)  # run_seed puts CUDA in conformance mode


def check_determinism(q: Quick) -> dict:
    from harness.runner import RunEnv
    case = determinism_case()
    env = RunEnv(device=q.device, smoke=q.smoke)  # the case's own dtype
    first, second = run_once(case, env), run_once(case, env)
    diff = compare_tables(first, second)
    figures = {"case": case.id, "dtype": env.dtype_for(case), "rows": diff["rows"], "differing": diff["differing"],
               "max_abs_diff": diff["max_abs_diff"], "settings": determinism_settings()}
    if diff["equal"]:
        return {"status": "ok", **figures,
                "message": f"{case.id} ({figures['dtype']}) twice: {diff['rows']} values bitwise equal"}
    gap = f", max abs diff {diff['max_abs_diff']:.3g}" if diff["max_abs_diff"] is not None else ""
    return {"status": "fail", **figures, "message": f"{case.id} twice in conformance mode: {diff['why']}{gap}"}


# ---- 3. ResNet-18, one short epoch ----------------------------------------------------------------

def synthetic_cifar(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n CIFAR-shaped images and labels, drawn on the CPU (the same on every device): the real
    CIFAR-10 may be absent on a fresh GPU machine, and images/s does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 32, 32), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def train_pass(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int,
               autocast: Callable = contextlib.nullcontext, prepare: Callable = lambda t: t) -> float:
    """One pass over (x, y) in batches; the mean training loss. The losses stay on the device until
    the end, so the loop never waits for the GPU."""
    total, steps = torch.zeros((), device=x.device), 0
    for i in range(0, len(y), batch):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(prepare(x[i:i + batch])), y[i:i + batch])
        loss.backward()
        opt.step()
        total += loss.detach().float()
        steps += 1
    return float(total) / steps


def _resnet(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    from harness.models import build_model
    model = build_model("resnet18_cifar", {}, generator_seed=0, dtype=torch.float32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]  # BN affine is frozen by default
    return model, torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _timed_epoch(run: nn.Module, opt, x, y, batch: int, device, autocast=contextlib.nullcontext,
                 prepare=lambda t: t) -> dict:
    """A warm-up batch (first-call allocation, cuDNN set-up, compilation), then the timed pass."""
    _, warmup_s = timed(lambda: train_pass(run, opt, x[:batch], y[:batch], batch, autocast, prepare), device)
    loss, seconds = timed(lambda: train_pass(run, opt, x, y, batch, autocast, prepare), device)
    return {"seconds": round(seconds, 3), "images_per_s": len(y) / seconds, "warmup_s": round(warmup_s, 3),
            "loss": loss}


def conformance_pass(x, y, batch: int, device: torch.device) -> dict:
    settings = conformance_mode(device)
    model, opt = _resnet(device)
    return {**_timed_epoch(model, opt, x, y, batch, device), "settings": settings}


def throughput_pass(x, y, batch: int, device: torch.device) -> dict:
    """The first switch set of THROUGHPUT_TRIES that trains; the ones that raised are recorded."""
    fallbacks = []
    for switches in THROUGHPUT_TRIES[device.type]:
        model, opt = _resnet(device)
        tp = throughput_mode(model, channels_last=True, **switches)
        try:
            found = _timed_epoch(tp.model, opt, x, y, batch, device, tp.autocast, tp.prepare)
        except Exception as exc:
            fallbacks.append(f"{switches}: {type(exc).__name__}: {first_line(exc)[:200]}")
            if switches.get("compile"):
                torch._dynamo.reset()
            continue
        return {**found, "settings": tp.settings, "fallbacks": fallbacks}
    raise RuntimeError("no throughput setting trained: " + "; ".join(fallbacks))


def check_resnet18(q: Quick) -> dict:
    device = torch.device(q.device)
    n, batch = (RESNET_SMOKE_IMAGES, RESNET_SMOKE_BATCH) if q.smoke else (RESNET_IMAGES, RESNET_BATCH)
    x, y = synthetic_cifar(n, device)
    try:
        strict = conformance_pass(x, y, batch, device)
        fast = throughput_pass(x, y, batch, device)
    finally:
        conformance_mode(device)  # throughput_mode's switches are process-wide: turn them back
    ratio = fast["images_per_s"] / strict["images_per_s"]
    figures = {"images": n, "batch": batch, "conformance_images_per_s": strict["images_per_s"],
               "throughput_images_per_s": fast["images_per_s"], "speedup": ratio,
               "conformance": strict, "throughput": fast}
    switches = ", ".join(k for k in ("channels_last", "bf16_autocast", "compile") if fast["settings"].get(k))
    message = (f"{n} images, batch {batch}: conformance {strict['images_per_s']:.0f} img/s, throughput "
               f"({switches}) {fast['images_per_s']:.0f} img/s, {ratio:.2f}x"
               + (f"; {len(fast['fallbacks'])} fallback(s)" if fast["fallbacks"] else ""))
    if not (math.isfinite(strict["loss"]) and math.isfinite(fast["loss"])):
        return {"status": "fail", **figures, "message": f"non-finite training loss; {message}"}
    return {"status": "ok", **figures, "message": message}


# ---- 4. one GPU per pytest-xdist worker -----------------------------------------------------------

def pinning_problems(n_gpus: int) -> tuple[dict, list[str]]:
    """The GPU each worker of `pytest -m gpu -n auto` would see, and what is inconsistent about it."""
    workers = auto_workers(n_gpus, "gpu", None)
    pins = {f"gw{i}": visible_device_for_worker(f"gw{i}", n_gpus) for i in range(workers or 0)}
    problems = []
    if workers != n_gpus:
        problems.append(f"-n auto gives {workers} workers for {n_gpus} GPUs")
    if sorted(pins.values(), key=int) != [str(i) for i in range(n_gpus)]:
        problems.append(f"the workers do not see one GPU each: {pins}")
    if visible_device_for_worker(f"gw{n_gpus}", n_gpus) != "0":
        problems.append(f"worker gw{n_gpus} does not wrap around to GPU 0")
    if auto_workers(n_gpus, "gpu", "cpu") is not None or auto_workers(n_gpus, "cpu", None) is not None:
        problems.append("-n auto pins workers for the CPU dry run or the CPU profile")
    if pin_worker_gpu("gw0", n_gpus, {"CUDA_VISIBLE_DEVICES": "0"}) is not None:
        problems.append("a CUDA_VISIBLE_DEVICES set by the user is overridden")
    return pins, problems


def check_xdist(q: Quick) -> dict:
    n = gpu_count()
    if n == 0:
        return {"status": "ok", "gpus": 0, "workers": {},
                "message": "0 GPUs: no pinning (-n auto keeps one worker per CPU)"}
    pins, problems = pinning_problems(n)
    user = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f"; CUDA_VISIBLE_DEVICES={user} is set here, so pytest would not pin" if user is not None else ""
    if problems:
        return {"status": "fail", "gpus": n, "workers": pins, "message": "; ".join(problems) + note}
    return {"status": "ok", "gpus": n, "workers": pins,
            "message": f"{n} GPU(s): " + ", ".join(f"{w}->GPU {g}" for w, g in pins.items()) + note}


# ---- 5. data-parallel --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(q: Quick, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            "-m", "harness.distributed", "--case", DDP_CASE, "--device", q.device, "--smoke", "--out", str(out)]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _ddp_run_dir_problem(out: Path, backend: str) -> tuple[dict, str]:
    """Figures of the run directory rank 0 wrote, and what is wrong with it ("" when nothing)."""
    results, _, meta = store.RunDir(out).read()
    dist = meta.get("distributed", {})
    figures = {"backend": dist.get("backend"), "world_size": dist.get("world_size"), "rows": len(results)}
    if dist.get("backend") != backend or dist.get("world_size") != 2:
        return figures, f"ran with backend {dist.get('backend')} on {dist.get('world_size')} processes"
    if results.empty or not np.isfinite(results.value.astype(float)).all():
        return figures, f"{len(results)} rows, not all finite"
    return figures, ""


def check_ddp(q: Quick) -> dict:
    from harness.cifar import DataNotFound, load_cifar10
    cuda = q.device.startswith("cuda")
    if cuda and gpu_count() < 2:
        return {"status": "skipped", "message": f"needs 2+ GPUs ({gpu_count()} here)"}
    try:
        load_cifar10()  # decoded (and cached) once here, not by both ranks at once
    except DataNotFound:
        return {"status": "skipped", "message": f"{DDP_CASE} reads CIFAR-10, not found under HARNESS_DATA "
                                                f"({os.environ.get('HARNESS_DATA', 'unset')}; docs/data.md)"}
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.empty_cache()  # rank 0 shares GPU 0 with this process and its cached blocks
    out = q.out / "ddp"
    cmd = ddp_command(q, out)
    timeout = max(q.budget.left(), DDP_MIN_TIMEOUT_S)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(store.REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, cwd=store.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        store.atomic_write_text(q.out / "ddp.log", _text(exc.stdout) + _text(exc.stderr))
        return {"status": "fail", "backend": backend, "message": f"torchrun timed out after {timeout:.0f} s (ddp.log)"}
    store.atomic_write_text(q.out / "ddp.log", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"status": "fail", "backend": backend, "returncode": proc.returncode,
                "message": f"torchrun exited {proc.returncode}: {_last_line(proc.stderr or proc.stdout)} (ddp.log)"}
    figures, problem = _ddp_run_dir_problem(out, backend)
    if problem:
        return {"status": "fail", **figures, "message": f"{DDP_CASE}: {problem} (see {out})"}
    return {"status": "ok", **figures, "run_dir": str(out),
            "message": f"{DDP_CASE} --smoke on 2 processes ({backend}): {figures['rows']} finite rows"}


def _text(output) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


CHECKS: tuple[tuple[str, Callable[[Quick], dict]], ...] = (
    ("exact", check_exact),
    ("determinism", check_determinism),
    ("resnet18", check_resnet18),
    ("xdist", check_xdist),
    ("ddp", check_ddp),
)


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu-quick", description=(
        "The first run on a CUDA machine: the exact cases on the device, a determinism check, a short "
        "ResNet-18 epoch (conformance and throughput mode), xdist pinning and the DDP path, within a time "
        "budget. Writes OUT_DIR/gpu-quick.json, OUT_DIR/report.html and OUT_DIR/exact/."))
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the JSON, the report and the run directories go")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default), or cpu for the dry run")
    p.add_argument("--smoke", action="store_true", help="tiny runs: the cases' smoke steps, 64 ResNet images")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"total seconds; a check that would start later is skipped (default {BUDGET_S:g})")
    return p.parse_args(argv)


def _summary(rows: list[dict], seconds: float) -> str:
    counts = collections.Counter(r["status"] for r in rows)
    return (f"gpu-quick: {len(rows)} checks: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ROW_STATUSES)
            + f" in {seconds:.0f} s")


def _failure_line(rows: list[dict], path: Path) -> str | None:
    failed = [r for r in rows if r["status"] == "fail"]
    if not failed:
        return None
    return (f"gpu-quick: {len(failed)} check(s) failed: "
            + "; ".join(f"{r['check']}: {r['message']}" for r in failed) + f" (details in {path})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-quick: --device cuda, and no CUDA device is available (the CPU dry run: --device cpu --smoke)",
              file=sys.stderr)
        return 2
    conformance_mode(args.device)  # before anything starts CUDA: CUBLAS_WORKSPACE_CONFIG is read once
    q = Quick(out=Path(args.out_dir), device=args.device, smoke=args.smoke,
              budget=Budget(args.budget_s, time.perf_counter()),
              command=["python", "-m", "harness.gpu_quick", *argv])
    path = q.out / JSON_NAME
    doc = {"machine": machine(q.device), "created": store.utc_now(), "command": q.command, "device": q.device,
           "smoke": q.smoke, "budget_s": q.budget.seconds, "status": "running", "elapsed_s": 0.0, "checks": []}
    write_json(path, doc)
    try:
        for name, check in CHECKS:
            row = run_check(name, check, q)
            doc["checks"].append(row)
            doc["elapsed_s"] = round(q.budget.used(), 1)
            write_json(path, doc)
            print(row_line(row), flush=True)
    except KeyboardInterrupt:
        doc.update(status="interrupted", elapsed_s=round(q.budget.used(), 1))
        write_json(path, doc)
        print(f"gpu-quick: interrupted; the finished checks are in {path}", file=sys.stderr)
        return 130
    doc.update(status="finished", elapsed_s=round(q.budget.used(), 1))
    write_json(path, doc)
    report = q.out / REPORT_NAME
    print(_summary(doc["checks"], q.budget.used()) + f"; {path}" + (f", {report}" if report.exists() else ""))
    why = _failure_line(doc["checks"], path)
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
