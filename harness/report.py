"""The HTML report of a run directory: one self-contained file (styles and plots inlined, no
network fetches). A pure function of the run's tables; every text from cases or metadata is escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import pandas as pd

from harness.store import RunDir, atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-family:monospace}
tr.ok td.status{background:#dfd}tr.bad td.status{background:#fdd}
.meta td:first-child{font-weight:bold}figure{display:inline-block;margin:0 1em 1em 0}
figcaption{font-size:12px;color:#555}
"""

# Metrics plotted against steps, with a log scale where the values span orders of magnitude.
PLOTS = {"train_gap": True, "eval_gap": True, "eval_gap_recomputed": True, "loss": False,
         "test_acc": False}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _plot(results: pd.DataFrame, case_id: str, metric: str, log: bool) -> str | None:
    sel = results[(results.case == case_id) & (results.metric == metric)]
    if sel.empty:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=90)
    for (arm, seed), grp in sel.groupby(["arm", "seed"]):
        values = grp.value.clip(lower=1e-300) if log else grp.value
        ax.plot(grp.step, values, lw=1, label=f"{arm} s{seed}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{_e(metric)} vs step for {_e(case_id)}" src="{src}">'
            f"<figcaption>{_e(case_id)}: {_e(metric)}</figcaption></figure>")


def render(results: pd.DataFrame, verdicts: pd.DataFrame, meta: dict) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>lr-conformance report</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>lr-conformance report</h1>"]
    ok = verdicts.ok.astype(bool) if not verdicts.empty else pd.Series(dtype=bool)
    parts.append(f"<p><b>{int(ok.sum())} of {len(verdicts)} verdicts as intended</b> "
                 f"({int((~ok).sum())} not). A negative control is as intended when its property fails.</p>")
    parts.append("<table class='meta'>")
    for key in ("created", "git_commit", "profile", "device", "device_name", "dtype", "optimizer",
                "smoke", "status", "versions", "command"):
        value = meta.get(key)
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        parts.append(f"<tr><td>{_e(key)}</td><td>{_e(value)}</td></tr>")
    parts.append("</table>")
    cases_meta = meta.get("cases", {})
    for claim, claim_verdicts in verdicts.groupby("claim", sort=True):
        parts.append(f"<h2>{_e(claim)}</h2><table><tr><th>case</th><th>property</th><th>measured</th>"
                     "<th>expected</th><th>tolerance</th><th>held</th><th>negative control</th>"
                     "<th>status</th><th>tolerance source</th></tr>")
        for r in claim_verdicts.itertuples():
            good = bool(r.ok)
            parts.append(
                f"<tr class='{'ok' if good else 'bad'}'><td>{_e(r.case)}</td><td>{_e(r.property)}</td>"
                f"<td class='num'>{_e(_fmt(r.measured))}</td><td>{_e(r.expected)}</td>"
                f"<td class='num'>{_e(_fmt(r.tolerance))}</td><td>{_e(r.passed)}</td>"
                f"<td>{_e(r.negative)}</td><td class='status'>{'as intended' if good else 'NOT as intended'}</td>"
                f"<td>{_e(r.source)}</td></tr>")
        parts.append("</table>")
        for case_id in claim_verdicts.case.unique():
            figs = [f for m, log in PLOTS.items() if (f := _plot(results, case_id, m, log))]
            if figs:
                secs = cases_meta.get(case_id, {}).get("seconds")
                parts.append(f"<h3>{_e(case_id)}" + (f" <small>({_e(secs)} s)</small>" if secs else "") + "</h3>")
                parts.extend(figs)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path | str, out: Path | str) -> None:
    results, verdicts, meta = RunDir(run_dir).read()
    atomic_write_text(Path(out), render(results, verdicts, meta))
