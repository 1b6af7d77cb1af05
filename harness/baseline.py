"""Baselines and the regression comparison of a run against one.

A baseline (`baselines/<profile>.csv`) holds one row per (case, property): the median, min, max,
spread (= max − min) and n of the property's measured value over n runs with different seeds, the
tolerance, the verdict (`passed`, `ok`), and where it was measured (torch version, device class,
optimizer, seeds). `python -m harness baseline update RUN_DIR [RUN_DIR ...]` writes it; the CPU
baseline is made from one run of the CPU profile with the cases' own seeds.

Where a run holds several seeds of a case, every property is also re-evaluated on each seed alone
(the case's own check on that seed's rows of results.csv), and those values join the run's value.
So one normal run yields the seed spread, while the verdict (`passed`, `ok`) stays the one of the
full run: a property gated on a median or on every seed can legitimately fail on one seed alone,
which is why single-seed runs (`--seeds 0`, `--seeds 1`, ...) cannot make a baseline for it. Those
still work for the other cases; a single-seed case then gets n = 1 per run.

The band (what "unchanged" means), for a value v against a baseline row (median m, min, max, n):

* Scale. Log10 when v, m and the tolerance t are all > 0 and m is at least 10× away from t
  (gaps and ratios that span orders of magnitude); linear otherwise (values near their bound,
  values that can be 0 or negative).
* Half-width w = K · max(s, floor), K = 2, with s the spread on that scale (log10(max/min) in
  decades, or max − min) and floor = 0.25 decade on the log scale (so w ≥ 0.5 decade, ×3.2) or
  10% of |t − m| on the linear scale. Band = [m − w, m + w] on that scale. A run with the cases'
  own seeds lands inside [min, max] of its seeds judged alone, for the max/min/median aggregations
  the checks use, so it lies inside the band by construction.
* Safe margin. When v and m are both on the intended side of t by at least 100× (2 decades;
  v ≤ t/100 for an upper bound, 0 included), the value is `unchanged` whatever it did: roundoff-level gaps (1e-16…1e-12) jump by orders between BLAS
  builds, thread counts and CPUs, and mean nothing while they stay that far from the bound.
  (The negative controls' own tests already require a 100× miss.)

Marks (asv compare's, plus `n`):
  `!` flipped to NOT as intended   `*` flipped to as intended    (the verdict changed)
  `+` regressed: left the band towards or past the bound
  `-` improved: left the band away from the bound
  ` ` unchanged                    `n` new: no baseline row
The comparison fails (exit 1) on any `!`, `*`, `+` or `-`: a flip or a value outside its band means
the baseline no longer describes the code. Investigate a `!`/`+`; for a `*`/`-` that is intended,
update the baseline in the same change. Baseline rows this run lacks (a subset was run) are listed,
never failed.
"""
from __future__ import annotations

import json
import math
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.store import REPO, RunDir, atomic_write_csv

BASELINE_DIR = REPO / "baselines"
K = 2.0
LOG_FLOOR = 0.25  # decades
LINEAR_FLOOR = 0.1  # × |tolerance − median|
LOG_MIN_MARGIN = 1.0  # decades from the bound below which the linear scale is used
SAFE_DECADES = 2.0  # 100×

COLUMNS = ["profile", "case", "claim", "property", "median", "spread", "min", "max", "n", "tolerance",
           "expected", "passed", "ok", "negative", "torch", "device_class", "optimizer", "stack", "seeds",
           "created", "git_commit"]
REQUIRED = ["case", "property", "median", "min", "max", "n", "tolerance", "passed", "ok", "negative"]

MARKS = {"flipped-bad": "!", "flipped-good": "*", "regressed": "+", "improved": "-",
         "unchanged": " ", "new": "n"}
FAILING = ("flipped-bad", "flipped-good", "regressed", "improved")
LEGEND = [
    ("!", "flipped-bad", "the verdict flipped to NOT as intended"),
    ("*", "flipped-good", "the verdict flipped to as intended (update the baseline if that is meant)"),
    ("+", "regressed", "the value left its band towards (or past) the tolerance"),
    ("-", "improved", "the value left its band away from the tolerance (update the baseline)"),
    (" ", "unchanged", "inside the band, or both values ≥ 100× inside the tolerance"),
    ("n", "new", "no baseline row for this case and property"),
]


class BaselineError(Exception):
    """A baseline that cannot be read or written; the message is one line."""


# ---- reading and writing ------------------------------------------------------------------------

def device_class(meta: dict) -> str:
    """'cpu/x86_64' or 'cuda/<GPU name>': what makes roundoff differ between machines."""
    device = str(meta.get("device") or "")
    name = str(meta.get("device_name") or "")
    if device.startswith("cuda"):
        return "cuda/" + name.split(";")[0].strip()
    m = re.match(r"cpu \(([^,)]+)", name)
    return "cpu/" + (m.group(1) if m else platform.machine())


def stack_of(meta: dict) -> str:
    """The training stack a run was made under (harness.stack label); runs before stacks: plain."""
    return str(meta.get("stack") or "plain")


def default_path(profile) -> Path | None:
    """baselines/<profile>.csv for a plain profile name (never a path built from odd metadata)."""
    if isinstance(profile, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", profile) and not profile.startswith("."):
        return BASELINE_DIR / f"{profile}.csv"
    return None


def _bool(series: pd.Series, name: str, path) -> pd.Series:
    mapped = series.map(lambda x: {"true": True, "false": False, "1": True, "0": False}.get(str(x).strip().lower()))
    if mapped.isna().any():
        bad = series[mapped.isna()].iloc[0]
        raise BaselineError(f"baseline {path}: column {name!r} must be True/False, got {bad!r}")
    return mapped.astype(bool)


def read(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    hint = "(write one with `python -m harness baseline update RUN_DIR [RUN_DIR ...]`)"
    if not path.is_file():
        raise BaselineError(f"baseline {path}: no such file {hint}")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise BaselineError(f"baseline {path}: empty file {hint}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaselineError(f"baseline {path}: not a readable CSV ({first})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise BaselineError(f"baseline {path}: missing column(s) {', '.join(missing)} "
                            f"(expected the columns written by `baseline update`)")
    if df.empty:
        raise BaselineError(f"baseline {path}: no rows {hint}")
    for col in ("median", "min", "max", "tolerance", "n"):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna()
        if bad.any():
            row = df[bad].iloc[0]
            raise BaselineError(f"baseline {path}: column {col!r} is not a number for "
                                f"{row['case']}/{row['property']}: {row[col]!r}")
        df[col] = num
    for col in ("passed", "ok", "negative"):
        df[col] = _bool(df[col], col, path)
    df["case"], df["property"] = df["case"].astype(str), df["property"].astype(str)
    dup = df.duplicated(["case", "property"])
    if dup.any():
        row = df[dup].iloc[0]
        raise BaselineError(f"baseline {path}: {row['case']}/{row['property']} appears twice")
    return df


def aggregate(run_dirs: list[Path]) -> pd.DataFrame:
    """Baseline rows from several run directories (one value per run per case and property)."""
    if not run_dirs:
        raise BaselineError("baseline update needs at least one RUN_DIR")
    frames, metas, per_seed = [], [], []
    for run_dir in run_dirs:
        try:
            results, verdicts, meta = RunDir(run_dir).read()
        except FileNotFoundError as exc:
            raise BaselineError(str(exc)) from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BaselineError(f"{run_dir}: unreadable run directory ({str(exc).splitlines()[0]})") from None
        if meta.get("smoke"):
            raise BaselineError(f"{run_dir}: a --smoke run has no verdicts; a baseline needs full runs")
        if verdicts.empty:
            raise BaselineError(f"{run_dir}: no verdicts to make a baseline from")
        frames.append(verdicts.assign(_run=len(frames)))
        metas.append(meta)
        per_seed.append(_per_seed_values(results, verdicts))
    stacks = {stack_of(m) for m in metas}
    if len(stacks) > 1:
        raise BaselineError(f"the runs differ in training stack ({', '.join(sorted(stacks))}); "
                            f"a baseline describes one stack")
    for key, label in (("profile", "profile"), ("optimizer", "optimizer")):
        values = {m.get(key) for m in metas}
        if len(values) > 1:
            raise BaselineError(f"the runs differ in {label} ({', '.join(sorted(map(str, values)))}); "
                                f"a baseline describes one {label}")
    torch_versions = {m.get("versions", {}).get("torch") for m in metas}
    classes = {device_class(m) for m in metas}
    if len(torch_versions) > 1 or len(classes) > 1:
        raise BaselineError(f"the runs differ in torch version or device class "
                            f"({sorted(map(str, torch_versions))}, {sorted(classes)}); make them on one setup")
    seed_sets = [json.dumps(m.get("seeds"), sort_keys=True) for m in metas]
    if len(run_dirs) > 1 and len(set(seed_sets)) < len(seed_sets):
        print("warning: some runs used the same seeds; their spread is only roundoff, and a seed "
              "counts once per run (one normal run already gives every seed's value)", file=sys.stderr)
    allv = pd.concat(frames, ignore_index=True)
    allv["measured"] = pd.to_numeric(allv["measured"], errors="coerce")
    seed_values = {key: g.measured for key, g in
                   pd.concat(per_seed, ignore_index=True).groupby(["case", "property"], sort=False)}
    rows = []
    meta0 = metas[0]
    for (case, prop), grp in allv.groupby(["case", "property"], sort=False):
        for col in ("ok", "passed"):
            values = grp[col].astype(bool)
            if values.nunique() > 1:
                raise BaselineError(f"{case}/{prop}: {col} is {values.sum()} of {len(values)} runs True; "
                                    f"a baseline needs a verdict that is stable across seeds")
        measured = pd.concat([grp.measured, seed_values.get((case, prop), pd.Series(dtype=float))])
        finite = measured[np.isfinite(measured)]
        seeds = sorted({s for m in metas for s in (m.get("seeds") or {}).get(case, [])})
        last = grp.iloc[-1]
        rows.append(dict(
            profile=meta0.get("profile"), case=case, claim=last["claim"], property=prop,
            median=float(finite.median()) if len(finite) else math.nan,
            spread=float(finite.max() - finite.min()) if len(finite) else math.nan,
            min=float(finite.min()) if len(finite) else math.nan,
            max=float(finite.max()) if len(finite) else math.nan,
            n=int(len(finite)), tolerance=float(last["tolerance"]), expected=last["expected"],
            passed=bool(last["passed"]), ok=bool(last["ok"]), negative=bool(last["negative"]),
            torch=meta0.get("versions", {}).get("torch"), device_class=device_class(meta0),
            optimizer=meta0.get("optimizer"), stack=stack_of(meta0), seeds=";".join(map(str, seeds)),
            created=max(str(m.get("created")) for m in metas), git_commit=meta0.get("git_commit")))
    return pd.DataFrame(rows, columns=COLUMNS)


def _per_seed_values(results: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """(case, property, measured) of every property re-evaluated on each seed of a multi-seed case
    alone. A case contributes nothing (its run value still counts) when it is no longer registered,
    when its properties, their expected text or tolerance differ from the run's verdicts (the check
    changed since the run, so its values would mix two definitions), or when its check cannot judge
    one seed alone (it raises; a one-line warning says so)."""
    from harness import registry
    from harness.checks import evaluate

    cases = registry.all_cases()
    out = []
    for case_id, rows in results.groupby("case", sort=False):
        seeds = rows.seed.unique()
        if len(seeds) < 2 or case_id not in cases:
            continue
        case = cases[case_id]
        try:
            parts = [evaluate(case, rows[rows.seed == s]) for s in seeds]
        except Exception as exc:  # a user's check may raise anything on a lone seed
            print(f"warning: {case_id}: its check cannot judge one seed alone ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); the baseline keeps the run's value only",
                  file=sys.stderr)
            continue
        if not _same_definitions(parts[0], verdicts[verdicts.case == case_id]):
            print(f"warning: {case_id}: its properties changed since the run; the baseline keeps the "
                  f"run's values only (rerun the case to get its seed spread)", file=sys.stderr)
            continue
        out.extend(p[["case", "property", "measured"]] for p in parts)
    if not out:
        return pd.DataFrame({"case": [], "property": [], "measured": []}).astype({"measured": float})
    frame = pd.concat(out, ignore_index=True)
    frame["measured"] = pd.to_numeric(frame["measured"], errors="coerce")
    return frame


def _same_definitions(now: pd.DataFrame, run: pd.DataFrame) -> bool:
    """The same properties, each with the same expected text and tolerance, as in the run."""
    if sorted(now.property) != sorted(run.property):
        return False
    a, b = now.set_index("property"), run.set_index("property").loc[list(now.property)]
    tol_a, tol_b = pd.to_numeric(a.tolerance, errors="coerce"), pd.to_numeric(b.tolerance, errors="coerce")
    same_tol = np.isclose(tol_a, tol_b, rtol=1e-9, atol=0, equal_nan=True).all()
    return bool(same_tol and (a.expected.astype(str) == b.expected.astype(str)).all())


def update(run_dirs: list[Path], out: Path | None = None) -> tuple[Path, pd.DataFrame]:
    df = aggregate(run_dirs)
    if out is None:
        profile = df.profile.iloc[0]
        out = default_path(profile)
        if out is None:
            raise BaselineError(f"the runs have no profile ({profile!r}); run with --profile or pass --out FILE")
    atomic_write_csv(Path(out), df)
    return Path(out), df


# ---- comparison -------------------------------------------------------------------------------

def _better(value: float, tol: float, passed: bool, negative: bool) -> str | None:
    """'lower' or 'higher': the direction away from the bound on the intended side."""
    if not (math.isfinite(value) and math.isfinite(tol)) or value == tol:
        return None
    pass_below = (value < tol) == bool(passed)
    intended_below = pass_below != bool(negative)
    return "lower" if intended_below else "higher"


def _log_ok(*xs: float) -> bool:
    return all(math.isfinite(x) and x > 0 for x in xs)


def margin_decades(value: float, tol: float, better: str | None) -> float:
    """Decades between value and bound, positive on the intended side (nan if not on a log scale)."""
    if better is None or not _log_ok(value, tol):
        return math.nan
    d = math.log10(tol) - math.log10(value)
    return d if better == "lower" else -d


def safe(value: float, tol: float, better: str | None) -> bool:
    """At least 100× inside the tolerance on the intended side (0 counts as inside `< t`)."""
    if not (math.isfinite(value) and math.isfinite(tol)) or tol <= 0 or better is None:
        return False
    factor = 10 ** SAFE_DECADES
    return value * factor <= tol if better == "lower" else value >= tol * factor


@dataclass
class Band:
    scale: str  # 'log10' or 'linear'
    center: float  # the baseline median, in value units
    lo: float
    hi: float
    half_width: float  # on the scale (decades or value units)

    def describe(self) -> str:
        if self.scale == "log10":
            return f"[{self.lo:.3g}, {self.hi:.3g}] (×{10 ** self.half_width:.3g})"
        return f"[{self.lo:.3g}, {self.hi:.3g}] (±{self.half_width:.3g})"


def band_for(base: pd.Series) -> Band | None:
    m, lo, hi, t = (float(base[c]) for c in ("median", "min", "max", "tolerance"))
    if not math.isfinite(m):
        return None
    if _log_ok(m, lo, hi, t) and abs(math.log10(t / m)) >= LOG_MIN_MARGIN:
        s = math.log10(hi / lo)
        w = K * max(s, LOG_FLOOR)
        c = math.log10(m)
        return Band("log10", m, 10 ** (c - w), 10 ** (c + w), w)
    s = hi - lo if math.isfinite(hi - lo) else 0.0
    floor = LINEAR_FLOOR * abs(t - m) if math.isfinite(t) else 0.0
    floor = max(floor, 1e-12 * max(abs(m), 1e-300))
    w = K * max(s, floor)
    return Band("linear", m, m - w, m + w, w)


@dataclass
class Row:
    case: str
    property: str
    status: str
    mark: str
    band: Band | None = None
    baseline_median: float = math.nan
    baseline_n: int = 0
    change: str = ""
    note: str = ""
    better: str | None = None


@dataclass
class Comparison:
    path: Path | None
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    gone: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""  # one line on where the baseline came from

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows.values())

    @property
    def failing(self) -> list[Row]:
        return [r for r in self.rows.values() if r.status in FAILING]

    @property
    def failed(self) -> bool:
        return bool(self.failing)

    def summary(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in MARKS if self.count(s)]
        if self.gone:
            parts.append(f"{len(self.gone)} baseline rows not in this run")
        return ", ".join(parts) or "nothing to compare"

    def failure_line(self) -> str:
        items = [f"{r.case}/{r.property} {r.status}" for r in self.failing]
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return f"regression against baseline {self.path}: " + "; ".join(items[:5]) + more


def _change(value: float, band: Band | None) -> str:
    if band is None or not math.isfinite(value):
        return ""
    if band.scale == "log10" and value > 0:
        ratio = value / band.center
        return f"×{ratio:.3g} ({math.log10(ratio):+.2f} dec)"
    return f"{value - band.center:+.3g}"


def compare_row(cur: pd.Series, base: pd.Series | None) -> Row:
    value, tol = float(cur["measured"]), float(cur["tolerance"])
    ok, passed, negative = bool(cur["ok"]), bool(cur["passed"]), bool(cur["negative"])
    row = Row(str(cur["case"]), str(cur["property"]), "new", MARKS["new"])
    row.better = _better(value, tol, passed, negative)
    if base is None:
        return row
    row.baseline_median, row.baseline_n = float(base["median"]), int(base["n"])
    notes = []
    btol = float(base["tolerance"])
    if math.isfinite(btol) and math.isfinite(tol) and not math.isclose(btol, tol, rel_tol=1e-9):
        notes.append(f"tolerance changed from {btol:.3g}")
    better = _better(float(base["median"]), btol, bool(base["passed"]), bool(base["negative"])) or row.better
    row.better = better
    band = band_for(base)
    row.band, row.change = band, _change(value, band)
    if bool(base["ok"]) != ok or bool(base["passed"]) != passed:
        row.status = "flipped-good" if ok else "flipped-bad"
        notes.append(f"was {'as intended' if base['ok'] else 'NOT as intended'}")
    elif band is None or not math.isfinite(value):
        row.status = "unchanged"
        notes.append("baseline has no finite value" if band is None else "not measured")
    else:
        if band.scale == "log10" and value > 0:
            x, c = math.log10(value), math.log10(band.center)
        else:
            x, c = value, band.center
        delta = x - c
        if abs(delta) <= band.half_width:
            row.status = "unchanged"
        elif safe(value, tol, better) and safe(band.center, btol, better):
            row.status = "unchanged"
            notes.append("outside the band but ≥ 100× inside the tolerance")
        elif better is None:
            row.status = "regressed"
            notes.append("direction unknown")
        else:
            worse = delta > 0 if better == "lower" else delta < 0
            row.status = "regressed" if worse else "improved"
    row.mark = MARKS[row.status]
    row.note = "; ".join(notes)
    return row


def compare(verdicts: pd.DataFrame, baseline: pd.DataFrame, meta: dict, path: Path | None = None) -> Comparison:
    base_stack = str(baseline["stack"].iloc[0]) if "stack" in baseline.columns and pd.notna(
        baseline["stack"].iloc[0]) else "plain"
    if base_stack != stack_of(meta):  # values under another stack are not a band for this one
        raise BaselineError(f"baseline {path} was made under the {base_stack} training stack, this run under "
                            f"{stack_of(meta)}: not comparable (make one from runs under {stack_of(meta)} with "
                            f"`baseline update`)")
    comp = Comparison(path)
    base_idx = {(r["case"], r["property"]): r for _, r in baseline.iterrows()}
    for _, cur in verdicts.iterrows():
        key = (str(cur["case"]), str(cur["property"]))
        comp.rows[key] = compare_row(cur, base_idx.get(key))
    comp.gone = [k for k in base_idx if k not in comp.rows]
    b0 = baseline.iloc[0]
    here = {"torch": (meta.get("versions") or {}).get("torch"), "device_class": device_class(meta),
            "optimizer": meta.get("optimizer")}
    for key, label in (("torch", "torch"), ("device_class", "device class"), ("optimizer", "optimizer")):
        if key in baseline.columns and pd.notna(b0.get(key)) and here[key] and str(b0[key]) != str(here[key]):
            comp.warnings.append(f"baseline {label} {b0[key]}, this run {here[key]}: values may move for that "
                                 f"reason alone")
    n = baseline["n"]
    comp.source = (f"{path}: {len(baseline)} rows, n = {int(n.min())}–{int(n.max())} runs"
                   + (f", seeds {b0['seeds']}" if "seeds" in baseline.columns and pd.notna(b0.get("seeds")) else "")
                   + (f", torch {b0['torch']}" if "torch" in baseline.columns else "")
                   + (f", {b0['device_class']}" if "device_class" in baseline.columns else "")
                   + (f", made {b0['created']}" if "created" in baseline.columns else ""))
    return comp


def resolve(meta: dict, explicit: Path | str | None, use_default: bool = True) -> Path | None:
    """The baseline to compare with: the explicit one, else baselines/<profile>.csv when present."""
    if explicit is not None:
        return Path(explicit)
    if not use_default or meta.get("smoke") or stack_of(meta) != "plain":
        return None  # baselines/<profile>.csv is the plain stack's (a stack's report shows it side by side)
    path = default_path(meta.get("profile"))
    return path if path is not None and path.exists() else None
