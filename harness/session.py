"""One case, start to verdict: run it under the injected environment, catch what a user must be
told about (missing capability, missing CUDA, divergence, an optimizer that raised), and evaluate
its properties. Whatever a case raises ends that case only, as an `error` outcome with a one-line
message; the full traceback rides along in `Outcome.traceback` (the CLI keeps it in RUN_DIR/errors/)."""
from __future__ import annotations

import math
import traceback as tb
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.checks import VERDICT_COLUMNS, evaluate
from harness.cifar import DataNotFound
from harness.optim import OptimizerFailed, first_line
from harness.runner import RESULT_COLUMNS, Diverged, RunEnv, Unsupported, run_case
from harness.schedules import SettingError
from harness.spec import Case, CaseError

STATUSES = ("ok", "fail", "error", "skipped", "smoke", "xfail", "xpass")


@dataclass
class Outcome:
    case: Case
    results: pd.DataFrame
    verdicts: pd.DataFrame
    status: str  # one of STATUSES
    message: str = ""
    traceback: str = ""  # for an `error` raised inside the case: the whole Python traceback
    timings: dict | None = None  # median step time and compile time apart (harness.runner.step_timings)


def _unjudged(case: Case, expected: str, detail: str) -> pd.DataFrame:
    """One verdict row per property for a case that could not be judged (measured NaN, not ok)."""
    return pd.DataFrame([dict(case=case.id, claim=case.claim, property=p.name, measured=math.nan,
                              expected=expected, tolerance=math.nan, passed=False, negative=case.negative,
                              ok=False, source=p.source, detail=detail)
                         for p in case.properties], columns=VERDICT_COLUMNS)


def cuda_missing(case: Case, env: RunEnv) -> bool:
    import torch
    return env.device_for(case).startswith("cuda") and not torch.cuda.is_available()


def execute(case: Case, env: RunEnv, *, make_progress=None, checkpoint_dir=None) -> Outcome:
    """`make_progress` and `checkpoint_dir`: see harness.runner.run_case."""
    empty_results = pd.DataFrame(columns=RESULT_COLUMNS)
    empty_verdicts = pd.DataFrame(columns=VERDICT_COLUMNS)
    if cuda_missing(case, env):
        return Outcome(case, empty_results, empty_verdicts, "skipped", "requires CUDA")
    try:
        results = run_case(case, env, make_progress=make_progress, checkpoint_dir=checkpoint_dir)
    except Unsupported as exc:
        return Outcome(case, empty_results, empty_verdicts, "skipped", str(exc))
    except (SettingError, DataNotFound, CaseError):
        raise  # bad hyperparameters, no data, a malformed case: bad input for the caller (the CLI exits 2)
    except ValueError as exc:  # the case cannot run as declared here (data too small, batch > set, ...)
        return Outcome(case, empty_results, empty_verdicts, "error", f"{case.id} cannot run: {exc}")
    except Diverged as exc:
        return Outcome(case, pd.DataFrame(exc.rows, columns=RESULT_COLUMNS),
                       _unjudged(case, "(run diverged)", str(exc)), "error", str(exc))
    except OptimizerFailed as exc:  # the system under test raised: this case ends, the run goes on
        return Outcome(case, empty_results, _unjudged(case, "(optimizer raised)", str(exc)), "error",
                       str(exc), traceback=tb.format_exc())
    except Exception as exc:  # anything else raised inside the case: still this case's error only
        first = first_line(exc)
        message = f"{case.id} raised {type(exc).__name__}" + (f": {first}" if first else "")
        return Outcome(case, empty_results, _unjudged(case, "(case raised)", message), "error", message,
                       traceback=tb.format_exc())
    if env.smoke:
        # Smoke proves the path runs: rows for every arm, all finite. It never gives a verdict.
        arms = {a.name for a in case.arms}
        if results.empty or set(results.arm) != arms or not np.isfinite(results.value.astype(float)).all():
            return Outcome(case, results, empty_verdicts, "error",
                           f"smoke run of {case.id} produced {len(results)} rows for arms "
                           f"{sorted(set(results.arm))} (expected finite rows for {sorted(arms)})")
        return Outcome(case, results, empty_verdicts, "smoke", f"{len(results)} rows",
                       timings=results.attrs.get("timings"))
    verdicts = evaluate(case, results)
    if not env.stack.plain:  # each verdict says which stack it was made under
        verdicts["detail"] = verdicts["detail"].astype(str) + f" [stack {env.stack.label}]"
    timings = results.attrs.get("timings")
    outcome = _judge(case, results, verdicts)
    outcome.timings = timings
    return outcome


def _judge(case: Case, results: pd.DataFrame, verdicts: pd.DataFrame) -> Outcome:
    documented = {p.name: p.xfail for p in case.properties if p.xfail}  # per-property non-reproductions
    failed = verdicts[~verdicts.ok.astype(bool)]
    unexpected = failed[~failed.property.isin(documented)]
    xpassed = verdicts[verdicts.ok.astype(bool) & verdicts.property.isin(documented)]
    msgs = [f"{r.property}: measured {r.measured:.3g}, expected {r.expected}"
            + (" to FAIL (negative control)" if case.negative else "") for r in unexpected.itertuples()]
    if unexpected.empty:
        if case.xfail:  # the claim now reproduces: the xfail must be removed, loudly
            return Outcome(case, results, verdicts, "xpass", f"expected to fail ({case.xfail}) but passed")
        if not xpassed.empty:
            return Outcome(case, results, verdicts, "xpass", "; ".join(
                f"{r.property} expected to fail ({documented[r.property]}) but passed" for r in xpassed.itertuples()))
        if not failed.empty:
            return Outcome(case, results, verdicts, "xfail", "; ".join(
                f"{r.property}: measured {r.measured:.3g} ({documented[r.property]})" for r in failed.itertuples()))
        return Outcome(case, results, verdicts, "ok")
    if case.xfail:  # a documented non-reproduction, failing as measured
        return Outcome(case, results, verdicts, "xfail", f"{case.xfail}; " + "; ".join(msgs))
    return Outcome(case, results, verdicts, "fail", "; ".join(msgs))
