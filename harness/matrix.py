"""The conformance matrix: exact cases × implementation switches × dtype × normalization layer.

A cell is a variant of a case that declares `matrix=True`: its normalization swapped, its dtype set,
and a roundoff *twin* added (the reference arm started a few ulps away), so one property judges every
cell fairly, including chaotic ones: the gap to the reference stays within max(bound, 10 × twin gap),
with the bound per dtype below. Cell ids read `<case>[<norm>,<dtype>,<impl>]` and `python -m harness
run` accepts them, so any slice can be rerun by name.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Iterable

import pandas as pd

from harness.checks import within_roundoff_floor
from harness.models import NORMS
from harness.spec import Case

# Implementation switches of torch.optim.SGD, as optimizer factories the harness injects.
IMPLEMENTATIONS = {"forloop": "harness.optim:sgd_forloop", "foreach": "harness.optim:sgd_foreach",
                   "fused": "harness.optim:sgd_fused"}
PLUGGED = "plugged"
DTYPES = ("float64", "float32")
# Gap bounds per dtype. float64: the exact bound (measured ≤ 1.4e-13 on non-chaotic cells).
# float32: measured ≤ 6.5e-7 over 300 steps (MLP-BN, eps 1e-30, 3 seeds) and, over the full matrix
# on this machine, ≤ 2.3e-6 where the twin stays below it; 1e-5 keeps a 4× margin.
BOUNDS = {"float64": 1e-9, "float32": 1e-5}
# Cells run at most this many updates: 168 cells must fit the CPU profile's budget, and an
# implementation or dtype that breaks an equivalence shows it within a few steps (every negative
# control here misses its bound by step 10). 120 still crosses TEXP's first phase start (update 100).
MAX_CELL_STEPS = 120
TWIN_ULPS = 5.0  # ≈ 1.1e-15 relative in float64, 6e-7 in float32: the size of one step's roundoff
FLOOR_FACTOR = 10.0
FLOOR_SOURCE = ("roundoff floor: gap(exp)/gap(twin) measured ≤ 2.2 on chaotic cells (CNN-IN, 5 seeds); "
                "factor 10; bound per dtype: float64 1e-9 (exact), float32 1e-5 (measured ≤ 2.3e-6)")

# Float32 cells that miss the rule, measured in the one-thread-per-worker CI setting (the
# values depend on the intra-op thread count, which changes reduction order). All are chaotic in
# float32: roundoff differences grow to 1e-3 … 1e-1 within 100 steps, the twin's too, but an arm that
# differs from the reference by fresh roundoff at EVERY step drifts faster than a twin perturbed
# once. They are shown as known divergences, not hidden; float64 conforms in every cell.
KNOWN_FLOAT32_DIVERGENCE = {
    ("texp-step-decay-cnn-bn", "ln"): "float32 LN CNN: exp gap 3.2e-2 vs twin 1.2e-3 at step 100",
    ("wdexp-thm2.9-cnn-bn", "ln"): "float32 LN CNN: exp gap 4.7e-2 vs twin 6.5e-3 by step 120",
    ("texppp-warmup-cosine-cnn-bn", "in"): "float32 IN CNN: exp gap 1e-4 vs twin 1.3e-5 at step 50, both ~9e-2 by 120",
    ("wdexp-thm2.9-cnn-bn", "bn"): "float32 BN CNN, fused SGD: exp gap jumps to 2.2e-5 at step ~115 (twin 6e-7); "
                                   "forloop/foreach stay ≤ 3.5e-7",
}

_CELL = re.compile(r"^(?P<case>[^\[\]]+)\[(?P<norm>\w+),(?P<dtype>\w+),(?P<impl>\w+)\]$")


class NotApplicable(ValueError):
    """This combination does not exist (e.g. instance norm on an MLP)."""


def with_roundoff_twin(case: Case, bound: float, *, source: str = FLOOR_SOURCE) -> Case:
    """Add 'twin' (the reference arm from a TWIN_ULPS-perturbed start) and judge by the floor."""
    ref = next(a for a in case.arms if a.name == case.reference)
    twin = dataclasses.replace(ref, name="twin", init_noise_ulps=TWIN_ULPS)
    return dataclasses.replace(  # judged against a chaotic floor: not an exact case any more
        case, arms=case.arms + (twin,), measurements=("train_gap", "loss"), exact=False,
        properties=(within_roundoff_floor("train_gap", bound, factor=FLOOR_FACTOR, source=source),))


def cell_id(base: str, norm: str, dtype: str, impl: str) -> str:
    return f"{base}[{norm},{dtype},{impl}]"


def make_cell(base: Case, norm: str, dtype: str) -> Case:
    name, kwargs = base.model
    if "norm" not in kwargs:
        raise NotApplicable(f"{base.id}: model {name} has no 'norm' switch")
    if norm == "in" and name != "norm_cnn":
        raise NotApplicable(f"{base.id}: instance norm needs spatial inputs, {name} has none")
    # One seed per cell: an exact equivalence either holds on a trajectory or it does not.
    variant = dataclasses.replace(base, model=(name, {**kwargs, "norm": norm}), dtype=dtype, matrix=False,
                                  seeds=base.seeds[:1], steps=min(base.steps, MAX_CELL_STEPS))
    return with_roundoff_twin(variant, BOUNDS[dtype])


def bases() -> list[Case]:
    from harness import registry
    return [c for c in registry.all_cases().values() if c.matrix]


def cells(*, case_ids: Iterable[str] | None = None, norms: Iterable[str] = NORMS,
          dtypes: Iterable[str] = DTYPES, impls: Iterable[str] = tuple(IMPLEMENTATIONS)) -> list[tuple[str, str, str, str]]:
    """(base id, norm, dtype, impl) for every requested combination; n/a ones included."""
    from harness import registry
    chosen = [registry.get(i) for i in case_ids] if case_ids else bases()
    return [(c.id, n, d, i) for c, n, d, i in itertools.product(chosen, norms, dtypes, impls)]


def parse_cell(text: str) -> tuple[str, str, str, str] | None:
    m = _CELL.match(text)
    return (m["case"], m["norm"], m["dtype"], m["impl"]) if m else None


def resolve(base_id: str, norm: str, dtype: str, impl: str) -> tuple[Case, str | None]:
    """The cell's case and the optimizer spec for its implementation (None: the plugged one)."""
    from harness import registry
    if norm not in NORMS or dtype not in DTYPES or impl not in (*IMPLEMENTATIONS, PLUGGED):
        raise ValueError(f"bad matrix cell {cell_id(base_id, norm, dtype, impl)}: norm in {NORMS}, "
                         f"dtype in {DTYPES}, impl in {(*IMPLEMENTATIONS, PLUGGED)}")
    case = make_cell(registry.get(base_id), norm, dtype)
    return dataclasses.replace(case, id=cell_id(base_id, norm, dtype, impl)), IMPLEMENTATIONS.get(impl)


def summarize(table: pd.DataFrame) -> str:
    """Markdown: one row per (case, norm), one column per (dtype, impl); each entry ✓/✗ and the
    worst gap relative to the allowed bound. Then one line per implementation × dtype."""
    if table.empty:
        return "no matrix cells were run\n"
    t = table.copy()
    marks = {"ok": "✓ ", "fail": "✗ ", "error": "✗ ", "known-fail": "✗ (known) "}
    t["entry"] = ["n/a" if s == "inapplicable" else marks.get(s, "– ") + ("" if pd.isna(m) else f"{m:.2g}")
                  for s, m in zip(t.status, t.measured)]
    grid = t.pivot_table(index=["case", "norm"], columns=["dtype", "impl"], values="entry", aggfunc="first")
    head = "| case | norm | " + " | ".join(f"{d} {i}" for d, i in grid.columns) + " |"
    lines = ["# Conformance matrix", "",
             "Entry: ✓ conforms / ✗ does not / ✗ (known) a documented float32 divergence / – skipped / "
             "n/a no such combination; then the worst gap divided by the allowed "
             f"max(bound/{FLOOR_FACTOR:g}, roundoff-twin gap); conforming means < {FLOOR_FACTOR:g}. "
             f"Bounds: " + ", ".join(f"{d} {b:g}" for d, b in BOUNDS.items()) + ".", "", head,
             "|" + "---|" * (len(grid.columns) + 2)]
    for (case, norm), row in grid.iterrows():
        lines.append(f"| {case} | {norm} | " + " | ".join(str(v) if pd.notna(v) else "" for v in row) + " |")
    lines += ["", "## By implementation and dtype", ""]
    run = t[t.status.isin(["ok", "fail", "error", "known-fail"])]
    for (dtype, impl), grp in run.groupby(["dtype", "impl"]):
        n_ok = int((grp.status == "ok").sum())
        n_known = int((grp.status == "known-fail").sum())
        verdict = ("conforms" if n_ok == len(grp) else
                   f"does NOT conform in {len(grp) - n_ok - n_known} cells" if len(grp) - n_ok > n_known else
                   f"conforms except {n_known} known float32 divergences")
        lines.append(f"- {impl}, {dtype}: {verdict} ({n_ok}/{len(grp)} cells) at gap bound "
                     f"{BOUNDS[dtype]:g} or {FLOOR_FACTOR:g}× the roundoff twin")
    return "\n".join(lines) + "\n"


MATRIX_COLUMNS = ["case", "norm", "dtype", "impl", "optimizer", "property", "measured", "tolerance",
                  "passed", "status", "message", "seconds"]


def run_cell(base_id: str, norm: str, dtype: str, impl: str, env) -> dict:
    """Run one cell under `env` (its optimizer is replaced by the cell's implementation unless the
    cell is 'plugged') and return its tidy row."""
    import time

    from harness.session import execute
    row = dict(case=base_id, norm=norm, dtype=dtype, impl=impl, optimizer=None, property=None,
               measured=float("nan"), tolerance=float("nan"), passed=None, status="inapplicable",
               message="", seconds=0.0)
    try:
        case, spec = resolve(base_id, norm, dtype, impl)
    except NotApplicable as exc:
        row["message"] = str(exc)
        return row
    cell_env = dataclasses.replace(env, optimizer=spec) if spec else env
    t0 = time.perf_counter()
    outcome = execute(case, cell_env)
    row.update(optimizer=cell_env.optimizer, status=outcome.status, message=outcome.message,
               seconds=round(time.perf_counter() - t0, 2))
    if not outcome.verdicts.empty:
        v = outcome.verdicts.iloc[0]
        row.update(property=v.property, measured=float(v.measured), tolerance=float(v.tolerance),
                   passed=bool(v.passed))
    known = known_divergence(base_id, norm, dtype)
    if known and outcome.status == "fail":
        row.update(status="known-fail", message=f"{known}; {outcome.message}")
    return row


def known_divergence(base_id: str, norm: str, dtype: str) -> str | None:
    return KNOWN_FLOAT32_DIVERGENCE.get((base_id, norm)) if dtype == "float32" else None
