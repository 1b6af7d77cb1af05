"""Report plots for epoch-unit cases (batch-size and learning-order claims): curves per epoch with
the schedule's changes marked, and training loss against parameter updates.

The changes are read from the results (the 'schedule' measurement's lr and batch_size rows), so the
marks show what ran, not what a case file says."""
from __future__ import annotations

import pandas as pd

from harness.report import line_plot, register_plot

EPOCH_METRICS = ("epoch_loss", "test_acc")


def is_epoch_unit(results: pd.DataFrame) -> bool:
    return bool((results.metric == "epoch_loss").any())


def schedule_changes(results: pd.DataFrame) -> list[float]:
    """Epoch boundaries where some arm's LR or batch size changed (x = last epoch before the change + 0.5)."""
    marks = set()
    for _, grp in results[results.metric.isin(["lr", "batch_size"])].groupby(["arm", "seed", "metric"]):
        v = grp.sort_values("step")
        changed = v.value.diff().fillna(0).ne(0)
        marks.update(float(s) - 0.5 for s in v.step[changed])
    return sorted(marks)


def _mark(fig, marks: list[float]) -> None:
    ax = fig.axes[0]
    for i, m in enumerate(marks):
        ax.axvline(m, color="#888", ls=":", lw=1, label="LR / batch change" if i == 0 else None)
    if marks:
        ax.legend(fontsize=7)


@register_plot("curves per epoch")
def _per_epoch(results: pd.DataFrame, ctx) -> list:
    if not is_epoch_unit(results):
        return []
    marks = schedule_changes(results)
    metrics = [m for m in dict.fromkeys(results.metric) if m in EPOCH_METRICS or m.startswith("acc_")]
    out = []
    for m in metrics:
        fig = line_plot(results[results.metric == m], ylabel=m, xlabel="epoch", bounds=ctx.bounds.get(m, []))
        _mark(fig, marks)
        out.append((fig, f"{ctx.case_id}: {m} vs epoch (dotted: schedule changes)"))
    return out


@register_plot("training loss vs parameter updates")
def _per_update(results: pd.DataFrame, ctx) -> list:
    loss = results[results.metric == "epoch_loss"]
    updates = results[results.metric == "updates"]
    if loss.empty or updates.empty:
        return []
    merged = loss.merge(updates[["arm", "seed", "step", "value"]].rename(columns={"value": "updates"}),
                        on=["arm", "seed", "step"])
    fig = line_plot(merged, x="updates", ylabel="training loss (epoch mean)", xlabel="parameter updates")
    fig.axes[0].set_xscale("log")
    return [(fig, f"{ctx.case_id}: training loss vs parameter updates (log scale)")]
