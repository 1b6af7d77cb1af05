"""Epoch checkpoints of a running case, so a killed run resumes mid-case (`harness run --resume`).

An epoch-unit case writes RUN_DIR/checkpoints/<case>.pt at the end of every epoch: the rows of the
seeds already finished, the current seed's rows so far, and that seed's whole training state (each
arm's model and optimizer state dicts and counters, every generator's state, the observers' memory).
A resumed seed replays its set-up (deterministic: the same initial model, probe and data), loads that
state over it and continues, so its rows are bitwise those of an uninterrupted run.

Files hold tensors and plain containers only and are read with `torch.load(weights_only=True)`: no
pickle of arbitrary objects. Each is written atomically (temp file, then rename), so a kill at any
moment leaves the previous epoch's checkpoint whole. A checkpoint written for other settings (seeds,
epochs, dtype, device, optimizer, torch version) is never resumed from: the case restarts, and says so.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import torch

from harness.optim import first_line

# Testing hook: after this many checkpoints written by this process, stop it (SIGSTOP) so that a test
# can kill it at a known epoch with a real signal. Never set in normal use.
STOP_AFTER_ENV = "HARNESS_STOP_AFTER_CHECKPOINT"


def file_stem(case_id: str) -> str:
    """A file name for any case id (matrix cells hold brackets and commas), unique by a short hash."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[:60] + "-" + hashlib.sha1(case_id.encode()).hexdigest()[:8]


class EpochCheckpoints:
    def __init__(self, directory: Path, case_id: str, fingerprint: dict):
        self.path = Path(directory) / f"{file_stem(case_id)}.pt"
        self.case_id = case_id
        self.fingerprint = {k: str(v) for k, v in fingerprint.items()}
        self.note = ""  # why an existing checkpoint was not used (shown in the case's message)
        self.disabled = False

    def load(self) -> dict | None:
        """The saved progress, or None (no file, other settings, unreadable: the case restarts)."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file or a state weights_only refuses: start over
            self.note = f"checkpoint {self.path.name} unreadable ({type(exc).__name__}), case restarted"
            return None
        if saved.get("fingerprint") != self.fingerprint:
            self.note = f"checkpoint {self.path.name} was written for other settings, case restarted"
            return None
        return saved

    def try_save(self, make_record) -> None:
        """Best effort: a state that cannot be captured or saved (e.g. an optimizer whose state_dict()
        raises or holds objects torch cannot save) turns checkpointing off for this case, with a note;
        the case itself goes on as if it had never checkpointed."""
        if self.disabled:
            return
        try:
            record = make_record()
            self.save(**record)
        except Exception as exc:
            self.disabled = True
            self.clear()
            first = first_line(exc)
            print(f"{self.case_id}: checkpointing off for this case ({type(exc).__name__}: {first}); "
                  f"a resume restarts it", file=sys.stderr)
            return
        _maybe_stop_for_test()

    def save(self, *, seed_index: int, epoch: int, finished_rows: list, rows: list, state: dict) -> None:
        # Plain Python values only (an observer may hand back numpy scalars, which weights_only refuses).
        finished_rows, rows = _plain(finished_rows), _plain(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"fingerprint": self.fingerprint, "seed_index": seed_index, "epoch": epoch,
                        "finished_rows": finished_rows, "rows": rows, "state": state}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        clear(self.path.parent, self.case_id)


def clear(directory: Path, case_id: str) -> None:
    """Remove a case's checkpoint (once its rows are stored), and the folder when it is empty."""
    directory = Path(directory)
    (directory / f"{file_stem(case_id)}.pt").unlink(missing_ok=True)
    try:
        directory.rmdir()  # only when no other case left one
    except OSError:
        pass


def _plain(rows: list) -> list:
    return [(str(c), str(a), int(s), int(t), str(m), float(v)) for c, a, s, t, m, v in rows]


_written = 0


def _maybe_stop_for_test() -> None:
    global _written
    _written += 1
    limit = os.environ.get(STOP_AFTER_ENV)
    if limit and _written == int(limit):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
