"""An append-only history of finished runs, and the detection of sustained steps in it.

Nightly runs each leave a run directory; `add(RUN_DIR)` appends its verdicts to one SQLite file,
`<DIR>/history.sqlite` (default DIR = `<repo>/.history`), `load()` reads every verdict back as one
pandas frame, and `detect_shifts(frame)` finds the properties whose measured value stepped and
stayed there.

Why SQLite: it is embedded and in the standard library (sqlite3; no new dependency, no server);
every `add` is one transaction, so a crash or Ctrl-C never leaves half a run; the UNIQUE primary key
on `runs.run_id` refuses the same run twice; nightly jobs that add at the same moment are
serialized by SQLite's own file locking (the writer takes the lock before it looks for the run);
and pandas reads it directly (`pd.read_sql`).

Tables:
  runs     one row per run: run_id TEXT PRIMARY KEY, created, git_commit, machine, device, torch,
           optimizer, optimizer_kwargs (JSON text), dtype, profile, added (when it was added, UTC).
  verdicts one row per (run, case, property): run_id, case, claim, property, measured REAL,
           tolerance REAL, expected, passed, ok, negative (INTEGER 0/1).
run_id is the first 12 hex digits of the sha256 of metadata.json's created, git_commit, command and
device_name, so the same run directory (or a copy of it) always gets the same id. `machine` is
harness.baseline.device_class (what makes roundoff differ) plus the torch CPU capability when the
metadata records one (e.g. 'cpu/x86_64 AVX512'). Only finished, full runs are added: a --smoke run
has no verdicts, and an interrupted run would hold only some cases.

Step detection (`detect_shifts`), per (case, property) series ordered by created then run_id (in
spirit asv's regression detection: a piecewise-constant fit, judged on steps that persist):

* Scale, as harness.baseline's band chooses it: log10 when every value and the tolerance are > 0
  and every value is at least 10× from the tolerance (LOG_MIN_MARGIN, 1 decade); linear otherwise.
* Safe zone: when every value is at least 100× inside its bound on the intended side
  (harness.baseline.safe, SAFE_DECADES = 2), the series is reported with scale 'safe' and never
  flagged: roundoff-level gaps jump by orders between BLAS builds and CPUs and mean nothing there.
* Fit: the single change point that minimizes the two-segment least-squares error (each segment at
  its mean; the earliest on a tie).
* Flag it when (a) at least `min_before` runs lie before the change and `min_after` after it (a
  sustained shift; a lone outlier in the last run fits best as a one-run segment and is not
  flagged), and (b) the jump between the segment means exceeds max(K_SIGMA = 3 × the pooled
  within-segment standard deviation, a floor): LOG_FLOOR = 0.5 decade (×3.2) on the log scale, or
  LINEAR_FLOOR = 20% of |tolerance − before-mean| on the linear scale.
* Direction: 'towards the bound' when the value moved towards the tolerance (or past it), 'away
  from the bound' otherwise. The expected text gives the bound ('<' upper, '>' lower), which decides
  when the earlier value sits on the tolerance itself; otherwise the side the earlier value was on
  decides (so a negative control, meant to miss, is judged too).

A history mixing machines, optimizers or profiles steps whenever they alternate: filter the frame
first (e.g. `h[(h.machine == m) & (h.optimizer == o)]`).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from harness import baseline
from harness.store import REPO, RunDir, utc_now

DEFAULT_DIR = REPO / ".history"
DB_NAME = "history.sqlite"
SCHEMA_VERSION = 1
LOCK_TIMEOUT_S = 60.0

K_SIGMA = 3.0  # × pooled within-segment standard deviation
LOG_FLOOR = 0.5  # decades
LINEAR_FLOOR = 0.2  # × |tolerance − before-mean|

RUN_COLUMNS = ["run_id", "created", "git_commit", "machine", "device", "torch", "optimizer",
               "optimizer_kwargs", "dtype", "profile", "stack"]
VERDICT_COLUMNS = ["case", "claim", "property", "measured", "tolerance", "expected", "passed", "ok",
                   "negative"]
COLUMNS = RUN_COLUMNS + VERDICT_COLUMNS
SHIFT_COLUMNS = ["case", "property", "claim", "n", "scale", "flagged", "change_at", "before", "after",
                 "direction", "detail"]
_BOOLS = ("passed", "ok", "negative")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    git_commit TEXT,
    machine TEXT,
    device TEXT,
    torch TEXT,
    optimizer TEXT,
    optimizer_kwargs TEXT,
    dtype TEXT,
    profile TEXT,
    added TEXT NOT NULL,
    stack TEXT
);
CREATE TABLE IF NOT EXISTS verdicts (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    "case" TEXT NOT NULL,
    claim TEXT,
    property TEXT NOT NULL,
    measured REAL,
    tolerance REAL,
    expected TEXT,
    passed INTEGER,
    ok INTEGER,
    negative INTEGER
);
CREATE INDEX IF NOT EXISTS verdicts_run ON verdicts(run_id);
CREATE INDEX IF NOT EXISTS verdicts_series ON verdicts("case", property);
"""


class HistoryError(Exception):
    """A run that cannot be added, or a history that cannot be read; the message is one line."""


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def db_path(into: Path | str | None = None) -> Path:
    """The history file: `<into>/history.sqlite` (into defaults to DEFAULT_DIR); a path that ends in
    .sqlite, .sqlite3 or .db names the file itself."""
    path = Path(into) if into is not None else DEFAULT_DIR
    return path if path.suffix in (".sqlite", ".sqlite3", ".db") else path / DB_NAME


# ---- adding a run -------------------------------------------------------------------------------

def run_id(meta: dict) -> str:
    """A short sha256 of created + git_commit + command + device_name (stable for a run directory)."""
    key = json.dumps([meta.get("created"), meta.get("git_commit"), meta.get("command"), meta.get("device_name")],
                     default=str, ensure_ascii=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def machine(meta: dict) -> str:
    """harness.baseline.device_class plus the torch CPU capability when the metadata records one."""
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    cap = next((v for v in (meta.get("cpu_capability"), meta.get("torch_cpu_capability"),
                            versions.get("cpu_capability"), versions.get("torch_cpu_capability")) if v), None)
    cls = baseline.device_class(meta)
    return f"{cls} {cap}" if cap else cls


def _bool_column(series: pd.Series, name: str, where: str) -> list:
    def one(x):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return None
        v = {"true": 1, "false": 0, "1": 1, "0": 0, "1.0": 1, "0.0": 0}.get(str(x).strip().lower())
        if v is None:
            raise HistoryError(f"{where}: verdicts.csv column {name!r} must be True/False, got {x!r}")
        return v
    return [one(x) for x in series]


def _float_or_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _read_run(run_dir: Path) -> tuple[pd.DataFrame, dict]:
    try:
        _, verdicts, meta = RunDir(run_dir).read()
    except FileNotFoundError as exc:
        raise HistoryError(_line(exc)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError, UnicodeDecodeError,
            OSError, ValueError) as exc:
        raise HistoryError(f"{run_dir}: unreadable run directory ({_line(exc)})") from None
    if not isinstance(meta, dict):
        raise HistoryError(f"{run_dir}: metadata.json is not a JSON object")
    if meta.get("smoke"):
        raise HistoryError(f"{run_dir}: a --smoke run has no verdicts; the history keeps full runs only")
    status = meta.get("status")
    if status != "finished":
        hint = f" (finish it with `python -m harness run --resume {run_dir}`)" if status in (
            "interrupted", "terminated", "running") else ""
        raise HistoryError(f"{run_dir}: the run is {status or 'without a status'}, not finished; "
                           f"the history keeps finished runs only{hint}")
    if not meta.get("created"):
        raise HistoryError(f"{run_dir}: metadata.json has no 'created' time")
    missing = [c for c in ("case", "property", "measured") if c not in verdicts.columns]
    if missing:
        raise HistoryError(f"{run_dir}: verdicts.csv lacks column(s) {', '.join(missing)}")
    return verdicts, meta


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=LOCK_TIMEOUT_S)
        return sqlite3.connect(str(path), timeout=LOCK_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise HistoryError(f"history {path}: cannot open ({_line(exc)})") from None


def _check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """False for an empty database (the first add failed and rolled back); raises on a foreign one."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise HistoryError(f"history {path}: schema version {version} is newer than this harness's "
                           f"{SCHEMA_VERSION}; update the harness")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables and version == 0:
        return False
    if not {"runs", "verdicts"} <= tables:
        raise HistoryError(f"history {path}: not a run history (no runs/verdicts tables)")
    return True


def add(run_dir: Path | str, into: Path | str | None = None) -> tuple[str, int]:
    """Append a finished run's verdicts; returns (run_id, verdict rows added). One transaction."""
    run_dir = Path(run_dir)
    verdicts, meta = _read_run(run_dir)
    rid = run_id(meta)
    where = str(run_dir)
    kwargs = meta.get("optimizer_kwargs")
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    run_row = (rid, str(meta["created"]), meta.get("git_commit"), machine(meta), meta.get("device"),
               versions.get("torch"), meta.get("optimizer"),
               json.dumps(kwargs if kwargs is not None else {}, sort_keys=True, default=str),
               meta.get("dtype"), meta.get("profile"), utc_now(), baseline.stack_of(meta))
    run_row = tuple(None if v is None else str(v) for v in run_row)
    n = len(verdicts)

    def col(name: str) -> pd.Series:
        return verdicts[name] if name in verdicts.columns else pd.Series([None] * n, dtype=object)

    def text(name: str) -> list:
        return [None if (x is None or (isinstance(x, float) and math.isnan(x))) else str(x) for x in col(name)]

    measured = pd.to_numeric(col("measured"), errors="coerce")
    tolerance = pd.to_numeric(col("tolerance"), errors="coerce")
    bools = {b: _bool_column(col(b), b, where) for b in _BOOLS}
    cases, props = text("case"), text("property")
    if any(c is None for c in cases) or any(p is None for p in props):
        raise HistoryError(f"{where}: verdicts.csv has a row without a case or property")
    rows = list(zip([rid] * n, cases, text("claim"), props, map(_float_or_none, measured),
                    map(_float_or_none, tolerance), text("expected"), bools["passed"], bools["ok"],
                    bools["negative"]))

    path = db_path(into)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HistoryError(f"history {path}: cannot create its directory ({_line(exc)})") from None
    conn = _connect(path)
    try:
        # IMMEDIATE takes the write lock first: a concurrent add waits (up to LOCK_TIMEOUT_S) and then
        # sees this run, so the duplicate check and the insert are one step.
        conn.execute("BEGIN IMMEDIATE")
        try:  # the DDL statement by statement: executescript would commit first
            for stmt in filter(str.strip, SCHEMA.split(";")):
                conn.execute(stmt)
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if "stack" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
                conn.execute("ALTER TABLE runs ADD COLUMN stack TEXT")  # histories from before stacks: NULL = plain
            _check_schema(conn, path)
            old = conn.execute("SELECT added FROM runs WHERE run_id = ?", (rid,)).fetchone()
            if old is not None:
                raise HistoryError(f"run {rid} is already in the history {path} (added {old[0]})")
            conn.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS[:-1])}, added, stack) "
                         f"VALUES ({', '.join('?' * 12)})", run_row)
            conn.executemany('INSERT INTO verdicts (run_id, "case", claim, property, measured, tolerance, '
                             'expected, passed, ok, negative) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)', rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.IntegrityError:
        raise HistoryError(f"run {rid} is already in the history {path}") from None
    except sqlite3.Error as exc:
        raise HistoryError(f"history {path}: {_line(exc)}") from None
    finally:
        conn.close()
    return rid, n


# ---- reading ------------------------------------------------------------------------------------

def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    return frame.astype({"measured": float, "tolerance": float})


def load(into: Path | str | None = None) -> pd.DataFrame:
    """Every verdict row joined with its run's keys, ordered by created, run_id, then row order."""
    path = db_path(into)
    if not path.is_file():
        return _empty()
    conn = _connect(path, readonly=True)
    try:
        if not _check_schema(conn, path):
            return _empty()
        have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}  # a history from before stacks has none
        cols = ", ".join([f"r.{c}" if c in have else f"NULL AS {c}" for c in RUN_COLUMNS]
                         + [f'v."{c}"' for c in VERDICT_COLUMNS])
        frame = pd.read_sql(f"SELECT {cols} FROM verdicts v JOIN runs r ON r.run_id = v.run_id "
                            f"ORDER BY r.created, r.run_id, v.rowid", conn)
    except sqlite3.Error as exc:
        raise HistoryError(f"history {path}: {_line(exc)}") from None
    except (pd.errors.DatabaseError, ValueError) as exc:
        raise HistoryError(f"history {path}: {_line(exc)}") from None
    finally:
        conn.close()
    if frame.empty:
        return _empty()
    for c in ("measured", "tolerance"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    for c in _BOOLS:
        frame[c] = frame[c].astype(bool) if frame[c].notna().all() else frame[c].astype("boolean")
    return frame[COLUMNS]


# ---- step detection -----------------------------------------------------------------------------

_OPERATOR = re.compile(r"<=|>=|≤|≥|<|>")


def bound_kind(expected) -> str | None:
    """'upper' for '<' (or '<=', '≤'), 'lower' for '>', from the last comparison in the text."""
    ops = _OPERATOR.findall(str(expected)) if expected is not None else []
    if not ops:
        return None
    return "upper" if ops[-1] in ("<", "<=", "≤") else "lower"


def _truth(x) -> bool | None:
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return None
    return {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}.get(str(x).strip().lower())


def _better(bound: str | None, negative, value: float, tol: float, passed) -> str | None:
    """The intended side ('lower'/'higher'): from the bound and the negative flag, else the verdict."""
    neg, held = _truth(negative), _truth(passed)
    if bound is not None:
        intended_below = (bound == "upper") != bool(neg)
        return "lower" if intended_below else "higher"
    if held is None or neg is None:
        return None
    return baseline._better(value, tol, held, neg)


def _best_split(y: np.ndarray) -> tuple[int, float]:
    """(k, SSE): y[:k] | y[k:] with the least two-segment squared error (earliest on a tie)."""
    n = len(y)
    z = y - y.mean()  # centred: the cumulative sums lose nothing to a large common offset
    s1, s2 = np.cumsum(z), np.cumsum(z * z)
    k = np.arange(1, n)
    left = s2[k - 1] - s1[k - 1] ** 2 / k
    r1, r2 = s1[-1] - s1[k - 1], s2[-1] - s2[k - 1]
    right = r2 - r1 ** 2 / (n - k)
    sse = np.maximum(left + right, 0.0)
    i = int(np.argmin(sse))
    return int(k[i]), float(sse[i])


def _direction(before: float, after: float, tol: float, bound: str | None) -> str:
    if not (math.isfinite(before) and math.isfinite(after)) or after == before:
        return ""
    up = after > before
    if math.isfinite(tol) and before != tol:
        below = before < tol
    elif bound is not None:
        below = bound == "upper"
    else:
        return ""
    return "towards the bound" if up == below else "away from the bound"


def _fmt_step(scale: str, jump: float) -> str:
    return f"×{10 ** jump:.3g} ({jump:+.2f} dec)" if scale == "log" else f"{jump:+.3g}"


def _judge(g: pd.DataFrame, min_before: int, min_after: int) -> dict:
    last = g.iloc[-1]
    out = dict(case=str(last["case"]), property=str(last["property"]), claim=last.get("claim"), n=0,
               scale="linear", flagged=False, change_at=None, before=math.nan, after=math.nan,
               direction="", detail="")
    values = g["measured"].to_numpy(dtype=float)
    tols = g["tolerance"].to_numpy(dtype=float)
    finite = np.isfinite(values)
    g, values, tols = g[finite], values[finite], tols[finite]
    n = len(values)
    out["n"] = n
    dropped = int((~finite).sum())
    note = f" ({dropped} run(s) without a finite value left out)" if dropped else ""
    if n == 0:
        out["detail"] = "no finite value" + note
        return out
    tol = float(tols[-1])
    bound = bound_kind(last.get("expected"))
    better = [_better(bound, r.negative, v, t, r.passed) for r, v, t in zip(g.itertuples(), values, tols)]
    log_ok = bool(np.all(values > 0) and np.all(np.isfinite(tols)) and np.all(tols > 0))
    if log_ok:
        log_ok = bool(np.all(np.abs(np.log10(tols / values)) >= baseline.LOG_MIN_MARGIN))
    scale = "log" if log_ok else "linear"
    is_safe = all(baseline.safe(float(v), float(t), b) for v, t, b in zip(values, tols, better))
    out["scale"] = "safe" if is_safe else scale
    if n < 2:
        out["detail"] = (f"1 run: needs ≥ {min_before + min_after} ({min_before} before and {min_after} "
                         f"after a change)" + note)
        return out
    y = np.log10(values) if scale == "log" else values
    k, sse = _best_split(y)
    mb, ma = float(y[:k].mean()), float(y[k:].mean())
    to_units = (lambda m: 10 ** m) if scale == "log" else (lambda m: m)
    before, after = to_units(mb), to_units(ma)
    out["before"], out["after"] = before, after
    jump = ma - mb
    step = _fmt_step(scale, jump)
    if is_safe:
        out["detail"] = (f"every value ≥ {10 ** baseline.SAFE_DECADES:.0f}× inside its bound (roundoff level, "
                         f"bound {tol:.3g}): not judged; largest step {step}" + note)
        return out
    if n < min_before + min_after:
        out["detail"] = (f"{n} runs: needs ≥ {min_before + min_after} ({min_before} before and {min_after} "
                         f"after a change)" + note)
        return out
    sd = math.sqrt(sse / (n - 2)) if n > 2 else 0.0
    if scale == "log":
        floor = LOG_FLOOR
    else:
        floor = LINEAR_FLOOR * abs(tol - before) if math.isfinite(tol) else 0.0
        floor = max(floor, 1e-12 * abs(before))  # never flag float noise on a value sitting at its bound
    threshold = max(K_SIGMA * sd, floor)
    unit = " dec" if scale == "log" else ""
    thr = f"{threshold:.2f}{unit}" if scale == "log" else f"{threshold:.3g}"
    sustained = k >= min_before and n - k >= min_after
    if abs(jump) > threshold and sustained:
        direction = _direction(before, after, tol, bound)
        change_at = g["created"].iloc[k]
        out.update(flagged=True, change_at=None if pd.isna(change_at) else str(change_at), direction=direction)
        out["detail"] = (f"step {step} from {before:.3g} to {after:.3g} at {out['change_at']} "
                         f"({k} runs before, {n - k} after), {direction or 'direction unknown'} "
                         f"{tol:.3g}; threshold {thr}" + note)
    elif abs(jump) > threshold:
        out["detail"] = (f"largest step {step} has {k} run(s) before and {n - k} after: not a sustained "
                         f"shift (needs {min_before} before and {min_after} after)" + note)
    else:
        out["detail"] = f"no step: largest {step} is within the threshold {thr}" + note
    return out


def detect_shifts(history: pd.DataFrame, *, min_after: int = 2, min_before: int = 2) -> pd.DataFrame:
    """One row per (case, property): a sustained step in its measured value (module docstring)."""
    if int(min_after) < 1 or int(min_before) < 1:
        raise HistoryError(f"min_before and min_after must be ≥ 1, got {min_before} and {min_after}")
    min_after, min_before = int(min_after), int(min_before)
    need = ["case", "property", "measured", "tolerance", "created"]
    missing = [c for c in need if c not in history.columns]
    if missing:
        raise HistoryError(f"history frame lacks column(s) {', '.join(missing)} (use harness.history.load())")
    if history.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SHIFT_COLUMNS}).astype(
            {"n": int, "flagged": bool, "before": float, "after": float})
    df = history.copy()
    for c in ("claim", "expected", "passed", "negative", "run_id"):
        if c not in df.columns:
            df[c] = None
    df["measured"] = pd.to_numeric(df["measured"], errors="coerce").astype(float)
    df["tolerance"] = pd.to_numeric(df["tolerance"], errors="coerce").astype(float)
    df["_t"] = pd.to_datetime(df["created"].astype(str), utc=True, errors="coerce", format="ISO8601")
    df["_created"], df["_run"] = df["created"].astype(str), df["run_id"].astype(str)
    df = df.sort_values(["_t", "_created", "_run"], kind="stable", na_position="last")
    rows = [_judge(g, min_before, min_after)
            for _, g in df.groupby([df["case"].astype(str), df["property"].astype(str)], sort=True)]
    frame = pd.DataFrame(rows, columns=SHIFT_COLUMNS)
    return frame.astype({"n": int, "flagged": bool, "before": float, "after": float})
