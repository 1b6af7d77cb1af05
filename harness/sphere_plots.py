"""Report plots for the sphere measurements (registered into harness.report's plot registry)."""
from __future__ import annotations

import pandas as pd

from harness.report import line_plot, register_plot


def _layers(results: pd.DataFrame, quantity: str) -> pd.DataFrame:
    sel = results[results.metric.str.startswith(quantity + ":")]
    return sel.assign(layer=sel.metric.str.split(":", n=1).str[1])


@register_plot("angular update vs theory")
def _angular(results: pd.DataFrame, ctx) -> list:
    sel = _layers(results, "angular_rms")
    theory = results[results.metric == "angular_theory"]
    out = []
    for layer, grp in sel.groupby("layer", sort=False):
        fig = line_plot(grp, log=True, ylabel="RMS angular update (rad)")
        ax = fig.axes[0]
        for arm, th in theory.groupby("arm"):
            th = th[th.seed == th.seed.min()].sort_values("step")
            ax.plot(th.step, th.value, color="k", ls=":", lw=1.2, label=f"Δ* ({arm})")
        ax.legend(fontsize=7)
        out.append((fig, f"{ctx.case_id}: RMS angular update of {layer} vs Δ* (dotted)"))
    return out


@register_plot("weight norm relaxation")
def _norms(results: pd.DataFrame, ctx) -> list:
    sel = _layers(results, "norm")
    return [(line_plot(grp, log=True, ylabel="‖w‖"), f"{ctx.case_id}: ‖w‖ of {layer} vs step")
            for layer, grp in sel.groupby("layer", sort=False)]
