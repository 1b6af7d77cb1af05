"""One case, start to verdict: run it under the injected environment, catch what a user must be
told about (missing capability, missing CUDA, divergence), and evaluate its properties."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.checks import VERDICT_COLUMNS, evaluate
from harness.runner import RESULT_COLUMNS, Diverged, RunEnv, Unsupported, run_case
from harness.schedules import SettingError
from harness.spec import Case

STATUSES = ("ok", "fail", "error", "skipped", "smoke", "xfail", "xpass")


@dataclass
class Outcome:
    case: Case
    results: pd.DataFrame
    verdicts: pd.DataFrame
    status: str  # one of STATUSES
    message: str = ""


def cuda_missing(case: Case, env: RunEnv) -> bool:
    import torch
    return env.device_for(case).startswith("cuda") and not torch.cuda.is_available()


def execute(case: Case, env: RunEnv) -> Outcome:
    empty_results = pd.DataFrame(columns=RESULT_COLUMNS)
    empty_verdicts = pd.DataFrame(columns=VERDICT_COLUMNS)
    if cuda_missing(case, env):
        return Outcome(case, empty_results, empty_verdicts, "skipped", "requires CUDA")
    try:
        results = run_case(case, env)
    except Unsupported as exc:
        return Outcome(case, empty_results, empty_verdicts, "skipped", str(exc))
    except SettingError:
        raise  # bad hyperparameters: bad input for the caller (the CLI exits 2)
    except ValueError as exc:  # the case cannot run as declared here (data too small, batch > set, ...)
        return Outcome(case, empty_results, empty_verdicts, "error", f"{case.id} cannot run: {exc}")
    except Diverged as exc:
        verdicts = pd.DataFrame([dict(case=case.id, claim=case.claim, property=p.name, measured=math.nan,
                                      expected="(run diverged)", tolerance=math.nan, passed=False,
                                      negative=case.negative, ok=False, source=p.source, detail=str(exc))
                                 for p in case.properties], columns=VERDICT_COLUMNS)
        return Outcome(case, pd.DataFrame(exc.rows, columns=RESULT_COLUMNS), verdicts, "error", str(exc))
    if env.smoke:
        # Smoke proves the path runs: rows for every arm, all finite. It never gives a verdict.
        arms = {a.name for a in case.arms}
        if results.empty or set(results.arm) != arms or not np.isfinite(results.value.astype(float)).all():
            return Outcome(case, results, empty_verdicts, "error",
                           f"smoke run of {case.id} produced {len(results)} rows for arms "
                           f"{sorted(set(results.arm))} (expected finite rows for {sorted(arms)})")
        return Outcome(case, results, empty_verdicts, "smoke", f"{len(results)} rows")
    verdicts = evaluate(case, results)
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
