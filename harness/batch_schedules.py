"""Batch-size schedules and the noise-scale arithmetic of Smith, Kindermans, Ying & Le (ICLR 2018).

In an epoch-unit case (Case.unit == "epoch") schedules are functions of the 0-based epoch: the LR
schedule gives η for the epoch and a BatchSize gives B. The SGD noise scale is
g = η(N/B − 1) ≈ ηN/(B(1 − γ)) (CLAIMS.md §5), so dividing η by k and multiplying B by k anneal the
noise alike; `anneal_noise` builds both forms (and the capped hybrid) from one declaration so the
arms of a case cannot drift apart by a typo.
"""
from __future__ import annotations

from harness.schedules import Piecewise, SettingError


class BatchSize:
    """Piecewise-constant batch size: `values[i]` from epoch `starts[i]` on (starts[0] == 0)."""

    def __init__(self, starts: tuple[int, ...], values: tuple[int, ...]):
        if (not starts or starts[0] != 0 or list(starts) != sorted(set(starts)) or len(starts) != len(values)
                or not all(isinstance(v, int) and v >= 1 for v in values)):
            raise SettingError(f"bad batch-size schedule: starts={starts}, values={values} "
                               f"(epochs from 0, increasing; batch sizes positive ints)")
        self.starts, self.values = tuple(starts), tuple(values)

    def __call__(self, epoch: int) -> int:
        return self.values[sum(epoch >= s for s in self.starts) - 1]

    def __repr__(self) -> str:
        return f"batch({dict(zip(self.starts, self.values))})"


def anneal_noise(lr: float, batch: int, milestones: tuple[int, ...], factor: float, *, by: str,
                 batch_max: int | None = None) -> tuple[Piecewise, BatchSize]:
    """(LR schedule, batch schedule) that divide the noise scale ηN/B by `factor` at each milestone
    epoch, `by` dividing the LR ("lr") or multiplying the batch ("batch"). With `batch_max`, a batch
    that would exceed it stays at `batch_max` and the LR takes the remaining factor (the paper's
    hybrid: grow B up to ~N/10, then decay η), so ηN/B follows the same path in every form."""
    if by not in ("lr", "batch"):
        raise SettingError(f"anneal_noise: by must be 'lr' or 'batch', got {by!r}")
    if not (lr > 0 and factor > 1 and isinstance(batch, int) and batch >= 1):
        raise SettingError(f"anneal_noise: need lr > 0, factor > 1 and an int batch >= 1; got "
                           f"lr={lr}, factor={factor}, batch={batch}")
    if batch_max is not None and batch_max < batch:
        raise SettingError(f"anneal_noise: batch_max {batch_max} is below the initial batch {batch}")
    starts = (0, *milestones)
    lrs, batches = [], []
    for i in range(len(starts)):
        if by == "lr":
            lrs.append(lr / factor ** i)
            batches.append(batch)
            continue
        wanted = batch * factor ** i
        b = min(round(wanted), batch_max) if batch_max is not None else round(wanted)
        batches.append(int(b))
        lrs.append(lr * b / wanted)  # the part of the factor the capped batch could not take
    return Piecewise(starts, tuple(lrs)), BatchSize(starts, tuple(batches))


def noise_scale(lr: float, n: int, batch: int, momentum: float = 0.0) -> float:
    """g = η(N/B − 1)/(1 − γ): the paper's SGD noise scale (≈ ηN/(B(1 − γ)) for B ≪ N)."""
    return lr * (n / batch - 1) / (1 - momentum)


def count_updates(batch: BatchSize, epochs: int, n: int) -> int:
    """Parameter updates of `epochs` epochs over n examples, the last partial batch of each epoch
    dropped (as the runner does)."""
    return sum(n // batch(e) for e in range(epochs))
