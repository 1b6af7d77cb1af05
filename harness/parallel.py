"""`harness run -j N`: cases in N worker processes, one torch thread each.

A worker receives a case *id* (cases hold closures, so they are rebuilt from the registry there, and
matrix cells from their id) and the run's RunEnv, runs harness.session.execute, and sends back the
outcome's tables and status. The parent (harness.cli) writes the tables after every finished case in
case order, so a finished run's files are exactly those of a sequential run, and an interrupted one
keeps every finished case. Workers are started with 'spawn': a forked child would inherit the
parent's torch and OpenMP state, which torch does not support.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd


@dataclass
class WorkerOutcome:
    """What a worker sends back: a session.Outcome without its Case (which holds closures)."""

    case_id: str
    status: str
    message: str
    traceback: str
    timings: dict | None
    results: pd.DataFrame
    verdicts: pd.DataFrame
    seconds: float = 0.0  # the case's wall time in its worker
    bad_input: str | None = None  # SettingError, DataNotFound, CaseError: the CLI exits 2


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)  # N workers on N cores: one thread each (two threads each spin 10–50× slower)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers


def resolve_case(case_id: str, env):
    """The case (or matrix cell) behind an id, with the env it runs under (a cell's implementation)."""
    from harness import matrix, registry
    parts = matrix.parse_cell(case_id)
    if parts is None:
        return registry.get(case_id), env
    case, spec = matrix.resolve(*parts)
    return case, (dataclasses.replace(env, optimizer=spec) if spec else env)


def run_one(case_id: str, env, checkpoint_dir: str | None) -> WorkerOutcome:
    from harness import progress, session
    from harness.cifar import DataNotFound
    from harness.schedules import SettingError
    from harness.spec import CaseError
    import time
    t0 = time.perf_counter()
    case, case_env = resolve_case(case_id, env)
    try:
        outcome = session.execute(
            case, case_env, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            # Several processes share one terminal: plain lines, never tqdm bars drawn over each other.
            make_progress=lambda total, unit, initial: progress.PlainProgress(case_id, total, unit, initial=initial))
    except (SettingError, DataNotFound, CaseError) as exc:
        empty = pd.DataFrame()
        return WorkerOutcome(case_id, "error", str(exc), "", None, empty, empty, bad_input=str(exc))
    return WorkerOutcome(case_id, outcome.status, outcome.message, outcome.traceback, outcome.timings,
                         outcome.results, outcome.verdicts, time.perf_counter() - t0)


JOBS_ENV = "HARNESS_JOBS"  # the default of -j where set (the test suite sets 1: its in-process runs stay in-process)


def default_jobs() -> int:
    """$HARNESS_JOBS, else the cores this process may use."""
    if os.environ.get(JOBS_ENV, "").strip().isdigit() and int(os.environ[JOBS_ENV]) >= 1:
        return int(os.environ[JOBS_ENV])
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_parallel(case_ids: list[str], env, jobs: int, checkpoint_dir: str | None) -> Iterator[WorkerOutcome]:
    """Yield each case's outcome as it finishes (any order). A worker that dies (killed, out of
    memory, a segfault in a kernel) ends the cases that were running in error, and the pool is
    restarted for the rest. On KeyboardInterrupt the workers are stopped before it propagates."""
    pending = list(case_ids)
    while pending:
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
        futures: dict[Future, str] = {pool.submit(run_one, cid, env, checkpoint_dir): cid for cid in pending}
        running: list[str] = []
        try:
            todo, broken = set(futures), False
            while todo and not broken:
                running = [futures[f] for f in todo if f.running()]
                done, todo = wait(todo, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        out = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    pending.remove(out.case_id)
                    yield out
        except BaseException:
            _stop(pool)
            raise
        _stop(pool) if broken else pool.shutdown(wait=True)
        if broken:
            # The cases that were running when a worker died end in error (which one killed it is
            # not knowable from here); the others run again in a fresh pool.
            for cid in [c for c in running if c in pending] or pending[:1]:
                pending.remove(cid)
                yield WorkerOutcome(cid, "error", f"{cid}: a worker process died while it ran (killed, out of memory "
                                                  f"or a crash inside a kernel); rerun it alone to see why", "", None,
                                    pd.DataFrame(), pd.DataFrame())


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers (their finished cases are already
    with the parent)."""
    procs = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():  # a stopped (SIGSTOP) or wedged worker ignores SIGTERM until it runs again
            p.kill()
            p.join(timeout=5)
