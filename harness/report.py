"""The HTML report of a run directory: one self-contained file (styles and plots inlined, no
network fetches, no scripts). A pure function of the run's tables and, when there is one, the
comparison with a baseline (harness.baseline). Every text from cases or metadata is escaped.

Plots come from a registry: `register_plot(name)` adds a function
`(case_results, PlotContext) -> [(figure, caption), ...]`, so a later claim can add, say, an
angular-update-vs-theory plot without touching the rest of the report.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from harness import baseline as bl
from harness.checks import XFAIL_MARK
from harness.store import RunDir, atomic_write_text

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em 2em;max-width:1500px;color:#222;
 line-height:1.35}
h1{margin:.2em 0 .4em}h2{margin:1.6em 0 .4em;border-bottom:2px solid #ddd;padding-bottom:.15em}
h3{margin:1em 0 .3em;font-size:15px}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;
 vertical-align:top}
th{background:#f3f3f3;text-align:left;white-space:nowrap}td.num{text-align:right;font-family:ui-monospace,monospace;
 white-space:nowrap}
td.id{font-family:ui-monospace,monospace;font-size:12px;min-width:8em;max-width:19em;overflow-wrap:anywhere}
td.src,td.note{font-size:11px;color:#555;max-width:18em}td.src{min-width:10em}td.change{white-space:normal;min-width:6em}
.tablewrap{overflow-x:auto;max-width:100%}table.verdicts th{white-space:normal}
tr.ok td.status{background:#dfd}tr.bad td.status{background:#fdd}td.status{white-space:nowrap}
td.mark{font-family:ui-monospace,monospace;font-weight:bold;white-space:nowrap}
td.m-unchanged{font-weight:normal;color:#777}td.held{font-size:12px;max-width:7em}td.expected{min-width:10em;max-width:16em}td.band{white-space:normal;min-width:9em}
td.m-flipped-bad,td.m-regressed{background:#f8c9c9;color:#8b0000}
td.m-flipped-good,td.m-improved{background:#cdebd0;color:#1f5f2a}
td.m-new{background:#dbe8f7;color:#1d4b80}
.meta td:first-child{font-weight:bold;white-space:nowrap}.meta td{font-size:12px;max-width:70em;word-break:break-word}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-size:12px;color:#555}
.banner{padding:.6em 1em;border-radius:4px;margin:.6em 0;font-size:14px}
.fail{background:#fde2e2;border:1px solid #e08a8a}.pass{background:#e3f4e5;border:1px solid #8cc596}
.warn{background:#fff6d6;border:1px solid #e0c96a}.info{background:#eef2f7;border:1px solid #b8c4d6}
.banner ul{margin:.3em 0 0 1.2em;padding:0}
details{margin:.5em 0 1em}summary{cursor:pointer;font-weight:bold}
.legend td{font-size:12px}
.cases{display:flex;flex-wrap:wrap;gap:0 1.5em}.case{flex:0 0 auto}
ul.toc{columns:2;font-size:13px}
table.scoreboard td{font-size:13px}td.s-ok{background:#e3f4e5}td.s-xfail{background:#fff6d6}
td.s-fail{background:#fde2e2;font-weight:bold}td.s-not-run{color:#777}td.margin{font-size:12px}
details.plots>summary{font-weight:normal;color:#335}
"""



def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    """A palette PNG: line plots hold a few dozen colours, so an adaptive 128-colour palette keeps them
    visually identical at about a third of the RGBA size (the page stays self-contained)."""
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    buf.seek(0)
    small = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
        small, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()


def _figure_html(fig, alt: str, caption: str) -> str:
    # The lowest y of any log axis, for tests and tools: a zero must never drag it to 1e-314.
    lows = [ax.get_ylim()[0] for ax in fig.axes if ax.get_yscale() == "log"]
    ymin = f" data-log-ymin='{min(lows):.3e}'" if lows else ""
    return (f'<figure{ymin}><img alt="{_e(alt)}" src="{_png(fig)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# ---- the plot registry --------------------------------------------------------------------------

@dataclass
class PlotContext:
    case_id: str
    # metric -> tolerances of the case's properties that name that metric in `expected`
    bounds: dict[str, list[float]] = field(default_factory=dict)


PlotFn = Callable[[pd.DataFrame, PlotContext], list]
PLOTTERS: dict[str, PlotFn] = {}


def register_plot(name: str):
    """Decorator: add a per-case plot. The function gets the case's tidy results and a
    PlotContext, and returns [(matplotlib figure, caption), ...] (empty when it does not apply)."""
    def deco(fn: PlotFn) -> PlotFn:
        PLOTTERS[name] = fn
        return fn
    return deco


# Below float32's smallest normal a gap is roundoff's floor or an exact zero: drawn as "0" on log axes.
ZERO_BELOW = float(np.finfo(np.float32).tiny)


def line_plot(sel: pd.DataFrame, *, x: str = "step", log: bool = False, ylabel: str = "",
              xlabel: str | None = None, bounds: list[float] = (), xscale: float = 1.0):
    """One line per (arm, seed) of `sel` (tidy rows of one metric): one colour per arm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 2.7), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(dict.fromkeys(sel.arm))
    labelled = set()
    values_all = pd.to_numeric(sel.value, errors="coerce")
    # Log axes: exact zeros (bitwise-equal arms) and denormals would stretch the axis to 1e-314. They
    # are drawn at a floor a decade below the smallest normal positive value, with their own marker.
    positive = values_all[(values_all >= ZERO_BELOW) & np.isfinite(values_all)]
    floor = (positive.min() / 10 if len(positive) else 1e-16) if log else None
    zeros_drawn = False
    for (arm, seed), grp in sel.groupby(["arm", "seed"], sort=False):
        grp = grp.sort_values(x)
        color = colors[arms.index(arm) % len(colors)]
        values = pd.to_numeric(grp.value, errors="coerce")
        if log:
            zero = values < ZERO_BELOW
            values = values.where(~zero)
            if zero.any():
                ax.plot(grp[x][zero] / xscale, np.full(int(zero.sum()), floor), ls="none", marker="v", ms=3,
                        color=color, label=None if zeros_drawn else f"0: bitwise equal (at {floor:.0e})")
                zeros_drawn = True
        ax.plot(grp[x] / xscale, values, lw=1, color=color,
                label=None if arm in labelled else str(arm), alpha=0.9)
        labelled.add(arm)
    for b in sorted(set(bounds)):
        ax.axhline(b, color="#c00", ls="--", lw=1, label=f"bound {b:.3g}")
    if log:
        ax.set_yscale("log")
        top = max([*positive.tolist(), *[b for b in bounds if b > 0], floor * 10])
        ax.set_ylim(floor / 3, top * 3)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    seeds = sorted(set(sel.seed))
    ax.legend(fontsize=7, title=f"seeds {','.join(map(str, seeds))}", title_fontsize=7)
    fig.tight_layout()
    return fig


GAP_METRICS = ("train_gap", "eval_gap", "eval_gap_recomputed")


@register_plot("function gap vs steps")
def _gap_plots(results: pd.DataFrame, ctx: PlotContext) -> list:
    metrics = [m for m in dict.fromkeys(results.metric) if m in GAP_METRICS or m.endswith("_gap")]
    out = []
    for m in metrics:
        sel = results[results.metric == m]
        fig = line_plot(sel, log=True, ylabel=f"{m} (relative)", bounds=ctx.bounds.get(m, []))
        out.append((fig, f"{ctx.case_id}: {m} vs step (log scale)"))
    return out


@register_plot("accuracy vs epochs")
def _accuracy_plot(results: pd.DataFrame, ctx: PlotContext) -> list:
    if (results.metric == "epoch_loss").any():
        return []  # an epoch-unit case: harness.epoch_plots draws its curves
    sel = results[results.metric.isin(["test_acc", "train_acc"])]
    out = []
    for m, grp in sel.groupby("metric", sort=False):
        steps = sorted(set(grp.step))
        every = min((b - a for a, b in zip(steps, steps[1:])), default=steps[0] if steps else 1) or 1
        fig = line_plot(grp, ylabel=m, xlabel=f"epoch (one evaluation every {every} steps)", xscale=every)
        out.append((fig, f"{ctx.case_id}: {m} vs epochs"))
    return out


@register_plot("loss vs steps")
def _loss_plot(results: pd.DataFrame, ctx: PlotContext) -> list:
    sel = results[results.metric == "loss"]
    if sel.empty:
        return []
    spans = bool((sel.value > 0).all()) and sel.value.max() > 30 * sel.value.min()
    return [(line_plot(sel, log=spans, ylabel="training loss"), f"{ctx.case_id}: training loss vs step")]


def _bounds(case_verdicts: pd.DataFrame, metrics) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in case_verdicts.itertuples():
        for m in metrics:
            if re.search(rf"(?<![\w\[]){re.escape(str(m))}(?![\w\]])", str(r.expected)) \
                    and isinstance(r.tolerance, float) and math.isfinite(r.tolerance):
                out.setdefault(m, []).append(r.tolerance)
    return out


def case_figures(results: pd.DataFrame, case_id: str, case_verdicts: pd.DataFrame) -> list[str]:
    sel = results[results.case == case_id]
    if sel.empty:
        return []
    ctx = PlotContext(case_id, _bounds(case_verdicts, set(sel.metric)))
    figs = []
    for name, fn in PLOTTERS.items():
        for fig, caption in fn(sel, ctx) or []:
            figs.append(_figure_html(fig, f"{caption} ({name})", caption))
    return figs


# ---- the margin chart ---------------------------------------------------------------------------

def margin_chart(verdicts: pd.DataFrame, comparison) -> tuple[str | None, int]:
    """Per verdict: decades between the value and its tolerance (right = intended side), the
    baseline median and band when there is one. One look shows what is close to its bound.
    Returns (PNG data URI or None, number of verdicts that cannot be placed: no finite value, or a
    tolerance ≤ 0). A value of 0 under an upper bound sits at the right edge (▶)."""
    rows, omitted = [], 0
    for r in verdicts.itertuples():
        value, tol = float(r.measured), float(r.tolerance)
        crow = comparison.rows.get((str(r.case), str(r.property))) if comparison else None
        better = crow.better if crow else bl._better(value, tol, bool(r.passed), bool(r.negative))
        d = bl.margin_decades(value, tol, better)
        if not math.isfinite(d) and math.isfinite(value) and value <= 0 < tol and better is not None:
            d = math.inf if better == "lower" else -math.inf
        band = crow.band if crow else None
        b_lo = b_hi = b_c = math.nan
        if band is not None and band.scale == "log10":
            b_lo, b_hi = sorted(bl.margin_decades(v, tol, better) for v in (band.lo, band.hi))
            b_c = bl.margin_decades(band.center, tol, better)
        if math.isnan(d) and not math.isfinite(b_c):
            omitted += 1
            continue
        rows.append((f"{r.case} · {r.property}", d, b_lo, b_hi, b_c, bool(r.ok),
                     crow.status if crow else None))
    if not rows:
        return None, omitted
    finite = [x for r in rows for x in (r[1], r[2], r[3]) if math.isfinite(x)] + [0.0, bl.SAFE_DECADES]
    x_lo, x_hi = min(finite) - 0.8, max(finite) + 0.8
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 0.9 + 0.24 * len(rows)), dpi=100)
    ys = list(range(len(rows)))[::-1]
    for y, (label, d, lo, hi, c, ok, status) in zip(ys, rows):
        if math.isfinite(lo):
            ax.plot([lo, hi], [y, y], color="#9bb7d4", lw=6, solid_capstyle="butt", zorder=1)
            ax.plot([c], [y], marker="|", color="#2b5d8c", ms=10, mew=2, zorder=2)
        if math.isnan(d):
            continue
        color = "#1a7f37" if ok else "#c62828"
        marker = "D" if status in bl.FAILING else "o"
        if math.isinf(d):
            d, marker = (x_hi - 0.3, ">") if d > 0 else (x_lo + 0.3, "<")
        ax.plot([d], [y], marker=marker, color=color, ms=6, zorder=3, mec="black", mew=0.5)
    ax.axvline(0, color="#c62828", ls="--", lw=1.2)
    ax.axvline(bl.SAFE_DECADES, color="#555", ls=":", lw=1.5)
    ax.set_xlim(x_lo, x_hi)
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows], fontsize=7, family="monospace")
    ax.set_xlabel("decades inside the tolerance (log10; right = intended side)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    fig.tight_layout()
    return _png(fig), omitted


# ---- the page -----------------------------------------------------------------------------------

def _seeds_summary(seeds) -> str:
    if not isinstance(seeds, dict):
        return json.dumps(seeds)
    groups: dict[str, int] = {}
    for v in seeds.values():
        key = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{k} ({n} case{'s' if n != 1 else ''})" for k, n in groups.items())


def _meta_table(meta: dict) -> list[str]:
    parts = ["<table class='meta'>"]
    for key in ("created", "git_commit", "profile", "device", "device_name", "dtype", "optimizer", "stack",
                "seeds", "smoke", "status", "versions", "command"):
        value = meta.get(key)
        if key == "seeds" and value is not None:
            value = _seeds_summary(value)
        elif key == "command" and isinstance(value, list):
            value = " ".join(map(str, value))
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        parts.append(f"<tr><td>{_e(key)}</td><td>{_e(value)}</td></tr>")
    parts.append("</table>")
    return parts


def _top_banner(verdicts: pd.DataFrame, meta: dict, comparison, trend=None) -> str:
    """Green: every verdict as intended. Amber: as intended apart from documented non-reproductions
    (cases whose status is xfail), listed by name, or a sustained shift in the history's trend while
    every value still passes. Red: anything unexpected, or a regression against the baseline. A red
    page on a healthy run would teach people to ignore red."""
    if verdicts.empty:
        return "<div class='banner info' data-state='empty'><b>No verdicts in this run.</b></div>"
    ok = verdicts.ok.astype(bool)
    cases_meta = meta.get("cases") if isinstance(meta.get("cases"), dict) else {}
    status = {c: (v.get("status") if isinstance(v, dict) else None) for c, v in cases_meta.items()}
    not_ok = list(dict.fromkeys(verdicts.case[~ok]))
    documented = [c for c in not_ok if status.get(c) == "xfail"]
    unexpected = [c for c in not_ok if c not in documented]
    regressed = comparison is not None and comparison.failed
    head = f"{int(ok.sum())} of {len(verdicts)} verdicts as intended"
    note = " A negative control is as intended when its property fails."
    if unexpected or regressed:
        why = []
        if unexpected:
            why.append(f"not as intended: {', '.join(unexpected[:8])}" + (", …" if len(unexpected) > 8 else ""))
        if regressed:
            why.append("a regression against the baseline (below)")
        return f"<div class='banner fail' data-state='red'><b>{_e(head)}</b>: {_e('; '.join(why))}.{_e(note)}</div>"
    shifted = [] if trend is None else [f"{r.case}/{r.property}" for r in trend.shifts[trend.shifts.flagged].itertuples()]
    if documented or shifted:
        why = []
        if documented:
            why.append(f"{len(documented)} documented non-reproduction(s): {', '.join(documented)} (expected to fail "
                       f"at this scale, with the measured numbers in their rows)")
        if shifted:
            why.append(f"{len(shifted)} sustained shift(s) in the trend: {', '.join(shifted[:6])}"
                       + (", …" if len(shifted) > 6 else "") + " (every value still passes; see Trend)")
        return (f"<div class='banner warn' data-state='amber'><b>As intended apart from</b> "
                f"{_e('; '.join(why))}. {_e(head)}.{_e(note)}</div>")
    return f"<div class='banner pass' data-state='green'><b>{_e(head)}</b>.{_e(note)}</div>"


def _trend_section(trend: "Trend", comparison) -> list[str]:
    """Each flagged property's value over the comparable runs, with its tolerance and baseline band;
    then every property's trend summary, folded."""
    runs = list(dict.fromkeys(trend.series.sort_values(["created", "run_id"]).run_id))
    flagged = trend.shifts[trend.shifts.flagged]
    parts = [f"<h2 id='trend'>Trend over {len(runs)} run(s)</h2>",
             f"<p>Runs compared: {_e(trend.key)}. A sustained shift (a step in the values kept by at least two "
             f"runs, larger than the seed noise and the band's floor; harness.history) is flagged even while every "
             f"value passes.</p>",
             f"<div class='banner {'warn' if len(flagged) else 'pass'}' data-trend='{len(flagged)}'>"
             f"<b>{len(flagged)} sustained shift(s)</b> among {len(trend.shifts)} properties.</div>"]
    plt = _pyplot()
    for r in flagged.itertuples():
        s = trend.series[(trend.series.case == r.case) & (trend.series.property == r.property)]
        s = s.assign(i=s.run_id.map({rid: i for i, rid in enumerate(runs)})).sort_values("i")
        fig, ax = plt.subplots(figsize=(4.0, 2.7), dpi=100)
        ax.plot(s.i, s.measured, marker="o", ms=3, lw=1, label="measured")
        tol = s.tolerance.dropna()
        if len(tol):
            ax.axhline(float(tol.iloc[-1]), color="#c00", ls="--", lw=1, label=f"bound {float(tol.iloc[-1]):.3g}")
        crow = comparison.rows.get((str(r.case), str(r.property))) if comparison is not None else None
        if crow is not None and crow.band is not None:
            ax.axhspan(crow.band.lo, crow.band.hi, color="#9bb7d4", alpha=0.4, label="baseline band")
        if r.scale == "log":
            ax.set_yscale("log")
        ax.set_xlabel("run (oldest first)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(str(r.property))
        ax.legend(fontsize=7)
        fig.tight_layout()
        parts.append(_figure_html(fig, f"{r.case} {r.property} over the history",
                                  f"{r.case} / {r.property}: {r.detail}"))
    parts.append("<details><summary>every property's trend</summary><table class='trend'><tr><th>case</th>"
                 "<th>property</th><th>runs</th><th>scale</th><th>flagged</th><th>detail</th></tr>")
    for r in trend.shifts.itertuples():
        row_cls = " class='bad'" if r.flagged else ""
        parts.append(f"<tr{row_cls}><td class='id'>{_e(r.case)}</td>"
                     f"<td class='id'>{_e(r.property)}</td><td class='num'>{_e(r.n)}</td><td>{_e(r.scale)}</td>"
                     f"<td>{'shift' if r.flagged else ''}</td><td>{_e(r.detail)}</td></tr>")
    parts.append("</table></details>")
    return parts


def _certificate_section(cert: dict) -> list[str]:
    """`harness conform`'s certificate: the diagnosed update rule, then one row per claim family."""
    from harness.conform import _margin_text
    d = cert.get("diagnosis") or {}
    ok = bool(cert.get("conforms"))
    parts = ["<h2>Certificate</h2>",
             f"<div class='banner {'pass' if ok else 'fail'}'><b>{_e(cert.get('optimizer'))} "
             f"{_e(cert.get('optimizer_kwargs') or '')}: {'conforms' if ok else 'does NOT conform'} to "
             f"Definition 1.2</b><br>Update rule: {_e(d.get('label'))}. {_e(d.get('implication'))}</div>",
             "<table><tr><th>form</th><th>max deviation</th><th>matched</th><th>note</th></tr>"]
    for m in d.get("matches") or []:
        parts.append(f"<tr><td>{_e(m.get('label') or m.get('form'))}</td><td>{_e(_fmt(m.get('deviation')))}</td>"
                     f"<td>{'yes' if m.get('matched') else ''}</td><td>{_e(m.get('note') or '')}</td></tr>")
    parts.append("</table><table><tr><th>claim family</th><th>verdict</th><th>worst margin to a bound</th>"
                 "<th>why</th></tr>")
    for f in cert.get("families") or []:
        parts.append(f"<tr><td>{_e(f.get('title'))}</td><td>{_e(f.get('status'))}</td>"
                     f"<td>{_e(_margin_text(f.get('worst')))}</td><td>{_e(f.get('why') or '')}</td></tr>")
    parts.append("</table>")
    return parts


def _legend() -> str:
    rows = "".join(f"<tr><td class='mark m-{s}'>{_e(m if m.strip() else '·')}</td><td>{_e(s)}</td>"
                   f"<td>{_e(d)}</td></tr>" for m, s, d in bl.LEGEND)
    return (
        "<details><summary>How to read this report</summary>"
        "<p><b>status</b> says whether each verdict came out as intended (a negative control is as "
        "intended when its property fails). <b>mark</b> compares the measured value with the baseline: "
        f"the <b>band</b> is the baseline median ± {bl.K:g} × max(spread, floor), where spread is max − min "
        f"over the baseline's runs (different seeds). Gaps and ratios that are ≥ 10× from their tolerance "
        f"are compared in log10 (floor {bl.LOG_FLOOR:g} decade), others linearly (floor "
        f"{bl.LINEAR_FLOOR:g} × distance to the tolerance). A value ≥ 100× inside its tolerance, with a "
        "baseline that was too, is unchanged whatever it did: roundoff moves by orders between machines. "
        "The chart above each table plots every verdict as decades inside its tolerance (right is good), "
        "with the baseline band as a blue bar and its median as a tick.</p>"
        f"<table class='legend'><tr><th>mark</th><th>meaning</th><th></th></tr>{rows}</table>"
        "<p>The command exits 1 when any row is marked !, *, + or −.</p></details>")


def _status_text(good: bool, detail) -> str:
    if good:
        return "as intended"
    reason = str(detail).partition(XFAIL_MARK)[2].rstrip("]")
    return f"NOT as intended: expected here (xfail: {reason})" if reason else "NOT as intended"


def _truthy(x) -> bool:
    return str(x).strip().lower() in ("true", "1", "yes")


def _profile_of(case_id: str) -> str:
    from harness import registry
    case = registry.all_cases().get(str(case_id).split("[")[0])  # matrix cells: their base case
    return case.profile if case is not None else "cpu"


def _state(cv: pd.DataFrame, cases_meta: dict) -> str:
    """A claim's (or a profile's) verdicts in one word: ok / xfail / FAIL."""
    ok = cv.ok.astype(bool)
    bad = set(cv.case[~ok])
    if not bad:
        return "ok"
    status = {c: (v.get("status") if isinstance(v, dict) else None) for c, v in cases_meta.items()}
    return "xfail" if all(status.get(c) == "xfail" for c in bad) else "FAIL"


def _changes(cv: pd.DataFrame, comparison) -> list[str]:
    if comparison is None:
        return []
    rows = [comparison.rows.get((str(r.case), str(r.property))) for r in cv.itertuples()]
    return [r.status for r in rows if r is not None and r.status in bl.FAILING]


def _needs_attention(cv: pd.DataFrame, cases_meta: dict, comparison) -> bool:
    return _state(cv, cases_meta) == "FAIL" or bool(_changes(cv, comparison))


def _against_plain(cv: pd.DataFrame, plain: pd.DataFrame) -> tuple[str, str, bool]:
    """(the plain stack's state for these verdicts, what changed under this stack, whether any
    verdict held on the plain stack and not here)."""
    base = plain.set_index(["case", "property"])
    keys = list(zip(cv.case.astype(str), cv.property.astype(str)))
    known = [k for k in keys if k in base.index]
    if not known:
        return "no plain-stack baseline row", "", False
    from harness.conform import _margin_text, worst_margin
    plain_ok = {k: bool(base.loc[k, "ok"]) for k in known}
    # The plain stack's positive verdict closest to its bound (baseline medians), beside this run's.
    rows = base.loc[[k for k in known if not bool(base.loc[k, "negative"])]].reset_index()
    closest = _margin_text(worst_margin(rows.rename(columns={"median": "measured"}))) if len(rows) else ""
    here_ok = dict(zip(keys, cv.ok.astype(bool)))
    lost = [f"{c}/{p}" for (c, p) in known if plain_ok[(c, p)] and not here_ok[(c, p)]]
    gained = [f"{c}/{p}" for (c, p) in known if here_ok[(c, p)] and not plain_ok[(c, p)]]
    state = f"{sum(plain_ok.values())}/{len(known)} as intended" + (f"; closest: {closest}" if closest else "")
    if lost:
        change = f"{len(lost)} held on plain, not here: " + ", ".join(lost[:4]) + (", …" if len(lost) > 4 else "")
    elif gained:
        change = f"same, and {len(gained)} only here: " + ", ".join(gained[:4])
    else:
        change = "same verdicts as on the plain stack"
    return state, change, bool(lost)


def _scoreboard(claims: list, cases_meta: dict, comparison, plain: pd.DataFrame | None = None,
                stack: str = "plain") -> list[str]:
    """The first screen: one row per claim, its CPU and GPU status, the positive verdict closest to
    its bound, and the change against the baseline. Under a training stack (`plain`: the plain
    stack's baseline), the plain stack's verdicts side by side instead of a band comparison."""
    from harness.conform import _margin_text, worst_margin
    last = (f"<th>plain stack (baseline)</th><th>under {_e(stack)}, against the plain stack</th>"
            if plain is not None else "<th>against the baseline</th>")
    parts = ["<table class='scoreboard'><tr><th>claim</th><th>CPU</th><th>GPU</th>"
             f"<th>closest to its bound (positive cases)</th>{last}</tr>"]
    for i, (claim, cv) in enumerate(claims):
        profiles = cv.case.map(_profile_of)
        cells = []
        for prof in ("cpu", "gpu"):
            sel = cv[profiles == prof]
            state = _state(sel, cases_meta) if len(sel) else "not run"
            cells.append(f"<td class='state s-{_e(state.lower().replace(' ', '-'))}'>{_e(state)}"
                         + (f" <small>{int(sel.ok.astype(bool).sum())}/{len(sel)}</small>" if len(sel) else "")
                         + "</td>")
        margin = _margin_text(worst_margin(cv[~cv.negative.map(_truthy)]))
        if plain is not None:
            state, change, lost = _against_plain(cv, plain)
            parts.append(f"<tr class='score' data-claim='{_e(claim)}'><td><a href='#claim-{i}'>{_e(claim)}</a></td>"
                         + "".join(cells) + f"<td class='margin'>{_e(margin)}</td><td class='plain'>{_e(state)}</td>"
                         f"<td class='{'m-regressed' if lost else ''}' data-lost='{int(lost)}'>{_e(change)}</td></tr>")
            continue
        changed = _changes(cv, comparison)
        change = ("no baseline" if comparison is None else
                  f"{len(changed)} changed ({', '.join(sorted(set(changed)))})" if changed else "unchanged")
        parts.append(f"<tr class='score' data-claim='{_e(claim)}'><td><a href='#claim-{i}'>{_e(claim)}</a></td>"
                     + "".join(cells) + f"<td class='margin'>{_e(margin)}</td>"
                     f"<td class='{'m-regressed' if changed else ''}'>{_e(change)}</td></tr>")
    parts.append("</table>")
    return parts


def render(results: pd.DataFrame, verdicts: pd.DataFrame, meta: dict, comparison=None,
           baseline_error: str | None = None, trend: "Trend | None" = None,
           plain: pd.DataFrame | None = None) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<title>lr-conformance report</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>lr-conformance report</h1>"]
    parts.append(_top_banner(verdicts, meta, comparison, trend))
    if comparison is not None:
        cls = "fail" if comparison.failed else "pass"
        parts.append(f"<div class='banner {cls}'><b>Against the baseline: {_e(comparison.summary())}</b>"
                     f"<br><small>{_e(comparison.source)}</small>")
        if comparison.failed:
            parts.append("<ul>" + "".join(
                f"<li><code>{_e(r.mark)}</code> {_e(r.status)}: {_e(r.case)} / {_e(r.property)} "
                f"{_e(r.change)} {_e('(' + r.note + ')' if r.note else '')}</li>" for r in comparison.failing)
                + "</ul>")
        parts.append("</div>")
        for w in comparison.warnings:
            parts.append(f"<div class='banner warn'>{_e(w)}</div>")
    elif baseline_error:
        parts.append(f"<div class='banner warn'>No baseline comparison: {_e(baseline_error)}</div>")
    elif bl.stack_of(meta) != "plain":
        parts.append(f"<div class='banner info'>Training stack <b>{_e(bl.stack_of(meta))}</b>: no band comparison "
                     f"(the baseline was made under the plain stack). "
                     + ("The scoreboard puts the plain stack's verdicts beside this run's." if plain is not None
                        else "No plain-stack baseline was found to show beside it.") + "</div>")
    else:
        parts.append("<div class='banner info'>No baseline comparison (no baseline for this run's profile, "
                     "or a smoke run).</div>")
    claims = list(verdicts.groupby("claim", sort=True))
    cases_meta = meta.get("cases", {}) if isinstance(meta.get("cases"), dict) else {}
    if claims:
        parts.extend(_scoreboard(claims, cases_meta, comparison, plain, bl.stack_of(meta)))
    if isinstance(meta.get("certificate"), dict):
        parts.extend(_certificate_section(meta["certificate"]))
    parts.extend(_meta_table(meta))
    parts.append(_legend())
    has_base = comparison is not None
    for i, (claim, claim_verdicts) in enumerate(claims):
        parts.append(f"<h2 id='claim-{i}'>{_e(claim)}</h2>")
        chart, omitted = margin_chart(claim_verdicts, comparison)
        if chart:
            parts.append(f'<figure><img alt="margin to the tolerance per verdict for {_e(claim)}" '
                         f'src="{chart}"><figcaption>{_e(claim)}: every verdict, decades inside its '
                         f"tolerance. Red dashed: the bound; dotted: 100× margin. Dot: this run (green as "
                         f"intended, red not; diamond: changed against the baseline; ▶: exactly 0). Blue bar: "
                         f"the baseline band, tick: its median."
                         + (f" {omitted} verdict(s) not placeable (no value, or a tolerance ≤ 0)." if omitted else "")
                         + "</figcaption></figure>")
        rows = [(r, comparison.rows.get((str(r.case), str(r.property))) if has_base else None)
                for r in claim_verdicts.itertuples()]
        notes = any(c is not None and c.note for _, c in rows)
        head = ("<th>case</th><th>property</th><th>measured</th><th>expected</th><th>tolerance</th>"
                "<th>held</th><th>status</th>")
        if has_base:
            head = ("<th>mark</th>" + head + "<th>baseline median (n)</th><th>band</th><th>change</th>"
                    + ("<th>note</th>" if notes else ""))
        parts.append(f"<div class='tablewrap'><table class='verdicts'><tr>{head}<th>tolerance source</th></tr>")
        for r, crow in rows:
            good = bool(r.ok)
            held = ("yes" if _truthy(r.passed) else "no") + (" (negative control)" if _truthy(r.negative) else "")
            cells = (f"<td class='id'>{_e(r.case)}</td><td class='id'>{_e(r.property)}</td>"
                     f"<td class='num'>{_e(_fmt(r.measured))}</td><td class='expected'>{_e(r.expected)}</td>"
                     f"<td class='num'>{_e(_fmt(r.tolerance))}</td><td class='held'>{_e(held)}</td>"
                     f"<td class='status'>{_e(_status_text(good, r.detail))}</td>")
            status_attr = ""
            if crow is not None:
                status_attr = f" data-change='{_e(crow.status)}'"
                mark = crow.mark if crow.mark.strip() else ""
                band = crow.band
                cells = (f"<td class='mark m-{_e(crow.status)}'>{_e(mark)} {_e(crow.status)}</td>" + cells
                         + (f"<td class='num'>{_e(_fmt(crow.baseline_median))} ({crow.baseline_n})</td>"
                            if crow.status != "new" else "<td></td>")
                         + (f"<td class='num band' title='{_e(band.describe())}'>"
                            f"{_e(_fmt(band.lo))} … {_e(_fmt(band.hi))}</td>" if band else "<td></td>")
                         + f"<td class='num change' title='{_e(crow.change)}'>{_e(crow.change.split(' (')[0])}</td>"
                         + (f"<td class='note'>{_e(crow.note)}</td>" if notes else ""))
            parts.append(f"<tr class='{'ok' if good else 'bad'}'{status_attr}>{cells}"
                         f"<td class='src'>{_e(r.source)}</td></tr>")
        parts.append("</table></div>")
        # Plots are folded; a claim with something unexpected or a baseline change opens its own.
        attention = _needs_attention(claim_verdicts, cases_meta, comparison)
        parts.append(f"<details class='plots'{' open' if attention else ''}><summary>plots of "
                     f"{claim_verdicts.case.nunique()} case(s)</summary><div class='cases'>")
        for case_id in claim_verdicts.case.unique():
            figs = case_figures(results, case_id, claim_verdicts[claim_verdicts.case == case_id])
            if figs:
                secs = cases_meta.get(case_id, {}).get("seconds") if isinstance(cases_meta.get(case_id), dict) else None
                parts.append(f"<div class='case'><h3>{_e(case_id)}"
                             + (f" <small>({_e(secs)} s)</small>" if secs else "") + "</h3>")
                parts.extend(figs)
                parts.append("</div>")
        parts.append("</div></details>")
    if trend is not None:
        parts.extend(_trend_section(trend, comparison))
    if comparison is not None and comparison.gone:
        parts.append("<h2>Baseline rows not in this run</h2><p>Not a failure: the run covered fewer cases "
                     "(or a case or property was renamed or removed; then update the baseline).</p>"
                     "<table class='gone'><tr><th>case</th><th>property</th></tr>")
        parts.extend(f"<tr><td class='id'>{_e(c)}</td><td class='id'>{_e(p)}</td></tr>" for c, p in comparison.gone)
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


AUTO = "auto"


def load_comparison(verdicts: pd.DataFrame, meta: dict, path: Path | str) -> "bl.Comparison":
    """Read the baseline at `path` and compare; raises BaselineError with a one-line message."""
    base = bl.read(path)
    return bl.compare(verdicts, base, meta, Path(path))


def write_report(run_dir: Path | str, out: Path | str, baseline: Path | str | None = AUTO,
                 strict: bool = False, history: Path | str | None = None):
    """Write the report; return the baseline Comparison (None without one). With `history` (a
    harness.history directory) the report gains a trend section; an unreadable history raises
    HistoryError (one line).

    baseline: a path, None (no comparison), or AUTO: baselines/<profile>.csv when it exists.
    An unreadable baseline raises BaselineError when it was named or `strict` (the `report`
    command: exit 2); otherwise (AUTO after `run --html`) it becomes a warning in the report, so a
    finished run always gets its report."""
    results, verdicts, meta = RunDir(run_dir).read()
    comparison, error = None, None
    path = bl.resolve(meta, None) if baseline == AUTO else baseline
    if path is not None and not meta.get("smoke"):
        try:
            comparison = load_comparison(verdicts, meta, path)
        except bl.BaselineError as exc:
            if baseline != AUTO or strict:
                raise
            error = str(exc)
    trend = load_trend(history, verdicts, meta) if history is not None else None
    plain = _plain_stack_baseline(meta, verdicts) if baseline == AUTO else None
    atomic_write_text(Path(out), render(results, verdicts, meta, comparison, error, trend, plain))
    return comparison


def _plain_stack_baseline(meta: dict, verdicts: pd.DataFrame) -> pd.DataFrame | None:
    """Under a training stack: the plain-stack baseline of the run's profile (or of its cases' one
    profile, for a run of named cases), shown beside the run, never as its band; None for a plain
    run, or when there is none or it cannot be read."""
    if bl.stack_of(meta) == "plain" or meta.get("smoke"):
        return None
    profiles = {_profile_of(c) for c in verdicts.case.unique()}
    path = bl.default_path(meta.get("profile") or (profiles.pop() if len(profiles) == 1 else None))
    try:
        return bl.read(path) if path is not None and path.exists() else None
    except bl.BaselineError:
        return None


@dataclass
class Trend:
    series: pd.DataFrame  # history rows of the runs comparable with this one, this run included
    shifts: pd.DataFrame  # harness.history.detect_shifts of them
    key: str  # what "comparable" meant


def load_trend(history_dir, verdicts: pd.DataFrame, meta: dict) -> Trend:
    """The history's runs of the same machine class, optimizer, dtype, profile and stack as this run (values
    are only comparable within those), with this run appended when it is not in the history yet."""
    from harness import history as hist
    h = hist.load(history_dir)

    def text(x) -> str:  # SQLite NULL comes back as None or NaN
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)
    machine, optimizer = hist.machine(meta), text(meta.get("optimizer"))
    dtype, profile, stack = text(meta.get("dtype")), text(meta.get("profile")), bl.stack_of(meta)
    keys = pd.DataFrame({c: h[c].map(text) for c in ("machine", "optimizer", "dtype", "profile", "stack")})
    keys["stack"] = keys["stack"].replace("", "plain")
    same = h[(keys.machine == machine) & (keys.optimizer == optimizer) & (keys.dtype == dtype)
             & (keys.profile == profile) & (keys["stack"] == stack)]
    rid = hist.run_id(meta)
    if rid not in set(same.run_id):
        now = verdicts.assign(run_id=rid, created=meta.get("created"), git_commit=meta.get("git_commit"),
                              machine=machine, optimizer=optimizer, dtype=dtype, profile=profile, stack=stack)
        same = pd.concat([same, now[[c for c in now.columns if c in h.columns]]], ignore_index=True)
    key = f"machine {machine}, optimizer {optimizer}, dtype {dtype}, profile {profile}, stack {stack}"
    return Trend(same, hist.detect_shifts(same), key)


def _register_claim_plots() -> None:
    """Claim-specific plot modules add themselves to PLOTTERS on import."""
    from harness import epoch_plots, sphere_plots  # noqa: F401


_register_claim_plots()
