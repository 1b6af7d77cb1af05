"""Optimizers that fail in the ways a real plug-in can: the system under test for the harness's own
failure handling (tests/test_failing_optimizer.py and tests/test_parallel.py run them through the
real CLI, this folder on the path). Each is otherwise torch.optim.SGD, so everything before the
failure is ordinary."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch


class CrashesInStep(torch.optim.SGD):
    """Raises inside step() at its 4th call (the arms' steps interleave: the first arm's 2nd update)."""

    def step(self, closure=None):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 4:
            raise ZeroDivisionError("planted bug in step()\nsecond line, never shown on the console")
        return super().step(closure)


class CrashesInZeroGrad(torch.optim.SGD):
    def zero_grad(self, set_to_none: bool = True):
        raise RuntimeError("planted bug in zero_grad()")


class CrashesInConstructorForSomeGroups(torch.optim.SGD):
    """Builds for the harness's construction check (one group) but not for two groups: a per-case
    constructor failure."""

    def __init__(self, params, **kw):
        params = list(params)
        if len(params) > 1:
            raise NotImplementedError("only one parameter group is supported")
        super().__init__(params, **kw)


class WrongSignature(torch.optim.SGD):
    def __init__(self, params, learning_rate: float):
        super().__init__(params, lr=learning_rate)


class ReturnsNaN(torch.optim.SGD):
    """Writes NaN into every parameter at its 3rd step: the run diverges on the next loss."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 3:
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
        return loss


def sgd_without_momentum(params, lr: float, weight_decay: float = 0.0):
    """A pure SGD variant: its constructor has no `momentum` (runs only the momentum-free cases)."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


class StateDictRaises(torch.optim.SGD):
    """Trains like SGD, but its state cannot be saved: checkpointing must step aside, not fail the case."""

    def state_dict(self):
        raise RuntimeError("planted: no state_dict")


KILL_MARKER_ENV = "BUGGY_KILL_MARKER"


class KillsItsWorkerOnConvNets(torch.optim.SGD):
    """At its 3rd step, on a conv net (a 4-dim weight), SIGKILLs its own process: what the OOM
    killer or a segfault inside a kernel does to a `run -j` worker. So that under `run -j 2` a
    second case is certainly running when that happens, the first process to reach its 3rd step on
    any other net creates $BUGGY_KILL_MARKER and waits there (60 s at most) to be cut off with the
    pool, and the conv net waits for that marker before it dies; later processes (each case run
    again alone) find the marker: the conv net dies at once, the other net trains as under SGD."""

    def step(self, closure=None):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 3:
            marker = Path(os.environ[KILL_MARKER_ENV])
            if any(p.dim() == 4 for group in self.param_groups for p in group["params"]):
                deadline = time.monotonic() + 60
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                time.sleep(60)
        return super().step(closure)
