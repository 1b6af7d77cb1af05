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
import sys
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


def plan(case_ids: list[str], env) -> list[list[str]]:
    """The run's cases as chains: cases that share an arm (harness.trajectories) run one after
    another on one worker, so the second reuses the first's rows instead of waiting on its lock
    with a worker idle; chains ordered by their work, largest first (longest-processing-time
    first: the tail of the run is short cases). Work = arm-steps (arm-epochs), reused ones not
    counted."""
    from harness import trajectories
    from harness.runner import _draws, work_units
    cases = {cid: resolve_case(cid, env) for cid in case_ids}
    parent = {cid: cid for cid in case_ids}

    def root(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c
    owner: dict[str, str] = {}
    work: dict[str, int] = {}
    for cid, (case, case_env) in cases.items():
        keys = {trajectories.arm_key(case, a, seed, case_env, _draws(case))
                for a in case.arms for seed in case_env.seeds_for(case)} - {None}
        fresh = [k for k in keys if k not in owner]
        total, _ = work_units(case, case_env)
        per_arm_seed = total // max(len(case.arms) * len(case_env.seeds_for(case)), 1)
        work[cid] = total - per_arm_seed * (len(keys) - len(fresh))
        for k in keys:
            if k in owner:
                parent[root(cid)] = root(owner[k])
            else:
                owner[k] = cid
    chains: dict[str, list[str]] = {}
    for cid in case_ids:
        chains.setdefault(root(cid), []).append(cid)
    return sorted(chains.values(), key=lambda chain: -sum(work[c] for c in chain))


def run_parallel(chains: list[list[str]], env, jobs: int, checkpoint_dir: str | None) -> Iterator[WorkerOutcome]:
    """Yield each case's outcome as it finishes (any order). At most `jobs` cases run at once, the
    next case of a chain as soon as its predecessor is done, then the next chain. A worker that
    dies (killed, out of memory, a segfault in a kernel) breaks the whole pool, and which worker
    it was is not knowable from here: the one case that was running ends in error; when several
    were, each runs again alone, and only one that dies alone ends in error (the others, cut off
    innocent, give their own outcome). A fresh pool runs the rest. On KeyboardInterrupt the workers
    are stopped before it propagates."""
    queue = [list(chain) for chain in chains if chain]
    suspects: list[list[str]] = []  # chains whose running case was cut off with others by a dead worker
    while queue or suspects:
        alone = suspects.pop(0) if suspects else None
        width = 1 if alone else min(jobs, len(queue))
        pool = ProcessPoolExecutor(max_workers=width, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
        # Every worker started, and running, before any case: with 'spawn' the executor starts one
        # worker per submit, and its monitor watches only the workers there when it last woke, so
        # a worker started after that which died went unnoticed until another case finished
        # (CPython 3.11; measured: a killed worker seen 60 s late, when its neighbour's case ended).
        wait([pool.submit(os.getpid) for _ in range(width)])
        running: dict[Future, list[str]] = {}  # future -> its chain (the running case first)
        cut: list[list[str]] = []  # the chains that were running when the pool broke
        try:
            if alone:
                running[pool.submit(run_one, alone[0], env, checkpoint_dir)] = alone
            while running or (queue and not alone):
                while queue and not alone and len(running) < jobs:
                    chain = queue.pop(0)
                    running[pool.submit(run_one, chain[0], env, checkpoint_dir)] = chain
                done, _ = wait(set(running), return_when=FIRST_COMPLETED)
                if any(isinstance(fut.exception(), BrokenProcessPool) for fut in done):
                    # A broken pool fails every future it still holds at once; those that finished
                    # just before keep their outcome. The timeout only guards against a hang.
                    done, _ = wait(set(running), timeout=60)
                for fut in done:
                    chain = running.pop(fut)
                    if isinstance(fut.exception(), BrokenProcessPool):
                        cut.append(chain)
                        continue
                    yield fut.result()
                    if chain[1:]:
                        queue.insert(0, chain[1:])  # the chain goes on at once: its arms are stored now
                if cut:
                    cut += running.values()  # none left, unless the timeout above ran out
                    break
        except BaseException:
            _stop(pool)
            raise
        if not cut:
            pool.shutdown(wait=True)
            continue
        _stop(pool)
        if len(cut) > 1:
            ids = ", ".join(chain[0] for chain in cut)
            print(f"harness: a worker process died while {len(cut)} cases ran ({ids}); each runs again alone, "
                  f"to find which", file=sys.stderr, flush=True)
            suspects[:0] = cut
            continue
        (chain,) = cut
        where = " alone, run again after a worker died with other cases running" if alone else ""
        yield WorkerOutcome(chain[0], "error", f"{chain[0]}: a worker process died while it ran{where} (killed, "
                            f"out of memory or a crash inside a kernel); rerun it alone to see why", "", None,
                            pd.DataFrame(), pd.DataFrame())
        if chain[1:]:
            queue.insert(0, chain[1:])


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
