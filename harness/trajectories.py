"""Shared trajectories: an arm that two cases declare identically is trained once per run.

An arm's rows depend only on what its key holds (the case's model, data, unit and measurements,
the arm's declaration, the seed, the number of updates or epochs, the base batches drawn per update,
dtype, device, optimizer and its kwargs, the training stack, smoke), provided every measurement of
the case is *per arm*: a function gap to the reference arm is not, and such a case never shares.
The store is content-addressed (sha256 of the key's repr; a declaration whose repr holds an object
address is never shared) and lives in one directory per run (`$HARNESS_ARM_STORE`, set by `harness
run` to RUN_DIR/arms and by the test session to a temporary directory), so the worker processes of
`-j N` and pytest-xdist share it. A file lock per key makes a second case wait for the first
instead of training the same arm twice. Rows are stored as CSV (no pickle).
"""
from __future__ import annotations

import hashlib
import io
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

STORE_ENV = "HARNESS_ARM_STORE"
# Measurements whose rows for an arm depend on that arm alone (the others compare arms).
PER_ARM = frozenset({"si_norm", "update_norm", "loss", "epoch_loss", "schedule", "test_acc", "eval_acc", "angular"})
ROW_COLUMNS = ["arm", "seed", "step", "metric", "value"]


def _name(measurement) -> str:
    return measurement if isinstance(measurement, str) else measurement[0]


def shareable(case) -> bool:
    return all(_name(m) in PER_ARM for m in case.measurements)


def arm_key(case, arm, seed: int, env, draws: int, stacked: tuple[int, ...] | None = None) -> str | None:
    """The content address of one arm's trajectory for one seed, or None when it cannot be shared.
    `stacked`: the seeds it trained with in one pass (harness.stacked_seeds), whose kernels round
    differently from one seed's: such rows are reused only by a run stacked alike."""
    if not shareable(case):
        return None
    text = repr(("v1", case.model, case.data, case.unit, case.measurements, arm, seed, env.steps_for(case),
                 draws, env.dtype_for(case), env.device_for(case), env.optimizer, env.optimizer_kwargs,
                 env.stack.label, env.smoke) + ((("stacked", tuple(stacked)),) if stacked else ()))
    if " at 0x" in text:  # a lambda or an object without a value repr: its identity is not its content
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ArmStore:
    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.csv"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str, case_id: str) -> list[tuple] | None:
        """The stored rows of `key`, relabelled to `case_id`; None when not stored (or unreadable)."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
            return None
        return [(case_id, r.arm, int(r.seed), int(r.step), r.metric, float(r.value)) for r in df.itertuples()]

    def put(self, key: str, rows: list[tuple]) -> None:
        from harness.store import atomic_write_text
        df = pd.DataFrame([r[1:] for r in rows], columns=ROW_COLUMNS)
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.17g")  # every float64 bit survives the round trip
        atomic_write_text(self._path(key), buf.getvalue())

    def lock(self, key: str):
        """The key's file lock: one object per path in this process, so a lock this process holds is
        taken again without waiting (filelock counts) while another process waits for it."""
        from filelock import FileLock
        path = str(self.dir / f"{key}.lock")
        if path not in _LOCKS:
            _LOCKS[path] = FileLock(path)
        return _LOCKS[path]

    @contextmanager
    def locked(self, keys: list[str]) -> Iterator[None]:
        """Hold the locks of `keys` (in sorted order: two cases never wait on each other)."""
        with ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.lock(key))
            yield


_LOCKS: dict = {}  # lock path -> FileLock (ArmStore.lock)


def current() -> ArmStore | None:
    path = os.environ.get(STORE_ENV)
    return ArmStore(path) if path else None


# ---- prefill: arm-seeds as the units of work of several processes ---------------------------------

def units(cases: list, env) -> list[tuple]:
    """Every (case, arm, seed, key) that the store can hold for `cases` and that trains seed by seed,
    each key once, longest first (arm-steps or arm-epochs; ties in case order)."""
    from harness.runner import _draws
    from harness.stacked_seeds import why_not
    seen, out = set(), []
    for case in cases:
        if why_not(case, env, env.seeds_for(case)) is None:
            continue  # its seeds train in one pass, under keys that name them all (arm_key's `stacked`)
        for seed in env.seeds_for(case):
            for arm in case.arms:
                key = arm_key(case, arm, seed, env, _draws(case))
                if key is not None and key not in seen:
                    seen.add(key)
                    out.append((case, arm, seed, key))
    return sorted(out, key=lambda u: -env.steps_for(u[0]))


def prefill(cases: list, env) -> int:
    """Train into the run's store (`current()`) every arm-seed of `cases` that is neither stored nor being trained by another
    process (its lock held), longest first; returns how many this process trained. Several processes
    calling this on the same cases split the arm-seeds between them as they free up, so a case whose
    arms and seeds add up to more than a worker's share of the run no longer sets its wall time
    (pytest-xdist hands out whole cases: one 26-minute case on one worker while the other idles).
    Each arm-seed trains as harness.runner.run_seed trains it within its case (`only`): the rows are
    the ones the case would compute (tests/test_trajectories.py)."""
    from filelock import Timeout

    from harness.runner import run_seed
    store = current()
    if store is None:
        return 0
    trained = 0
    for case, arm, seed, key in units(cases, env):
        if store.has(key):
            continue
        lock = store.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # another process trains it now
        try:  # held from here to the stored rows (run_seed takes it again: the same lock, counted)
            if not store.has(key):
                run_seed(case, seed, env, only=frozenset({arm.name}))
                trained += 1
        except Exception:  # noqa: BLE001 - the case itself trains it again and reports the error
            continue
        finally:
            lock.release()
    return trained
