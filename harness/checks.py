"""Properties: functions from a case's tidy results to a Verdict. Constructors here return
`Property` objects for case tables; `evaluate` turns a case's results into verdict rows.

A NaN measurement never passes (a property that cannot be measured has not been shown).
"""
from __future__ import annotations

import math

import pandas as pd

from harness.spec import Case, Property, Verdict

XFAIL_MARK = "[expected to fail here: "  # in a verdict's detail: the property's documented non-reproduction
VERDICT_COLUMNS = ["case", "claim", "property", "measured", "expected", "tolerance", "passed",
                   "negative", "ok", "source", "detail"]


def _select(results: pd.DataFrame, metric: str | tuple[str, ...], arms: tuple[str, ...] | None,
            steps: tuple[int, int | None]) -> pd.DataFrame:
    sel = results[results.metric.isin(_metrics(metric))]
    if arms is not None:
        sel = sel[sel.arm.isin(arms)]
    lo, hi = steps
    sel = sel[sel.step >= lo]
    if hi is not None:
        sel = sel[sel.step <= hi]
    return sel


def _metrics(metric: str | tuple[str, ...]) -> tuple[str, ...]:
    return (metric,) if isinstance(metric, str) else tuple(metric)


def _label(metric: str | tuple[str, ...]) -> str:
    return "|".join(_metrics(metric))


def _worst(values: pd.Series, highest: bool) -> float:
    if values.empty:
        return math.nan
    if values.isna().any():
        return math.nan
    return float(values.max() if highest else values.min())


def max_below(metric: str | tuple[str, ...], below: float, *, source: str, arms: tuple[str, ...] | None = None,
              steps: tuple[int, int | None] = (1, None), name: str | None = None,
              inclusive: bool = False) -> Property:
    """The largest value of `metric` (over arms, seeds and steps in range) stays below `below`
    (`inclusive`: at most `below`, e.g. exactly 0 for bitwise equality). A tuple of metrics is read
    as one pool (e.g. the function gap on the batch and on the probe)."""
    rel = "<=" if inclusive else "<"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        sel = _select(results, metric, arms, steps)
        measured = _worst(sel.value, highest=True)
        held = measured <= below if inclusive else measured < below
        return Verdict(measured, f"max {_label(metric)} {rel} {below:.3g}", below, bool(held),
                       detail=f"{len(sel)} values, steps {steps[0]}..{steps[1] or 'end'}")
    return Property(name or f"max_{_label(metric)}", check, source)


def max_above(metric: str, above: float, *, source: str, arms: tuple[str, ...] | None = None,
              steps: tuple[int, int | None] = (1, None), name: str | None = None) -> Property:
    """Somewhere in range (per seed: the smallest of the seeds' maxima) `metric` exceeds `above`:
    e.g. updates that never die out, i.e. no convergence."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        sel = _select(results, metric, arms, steps)
        per_seed = sel.groupby("seed").value.max()
        measured = _worst(per_seed, highest=False)
        return Verdict(measured, f"max {metric} > {above:.3g} (every seed)", above, bool(measured > above),
                       detail=f"{len(sel)} values, steps {steps[0]}..{steps[1] or 'end'}")
    return Property(name or f"max_{metric}_above", check, source)


def norm_ratio_follows_scale(arm: str, rtol: float, *, source: str) -> Property:
    """‖θ̃_t‖/‖θ_t‖ (arm vs the reference arm, SI weights) equals the schedule's c_t to `rtol`."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        norms = results[results.metric == "si_norm"].pivot_table(
            index=["seed", "step"], columns="arm", values="value")
        pred = results[(results.metric == "predicted_scale") & (results.arm == arm)].set_index(
            ["seed", "step"]).value
        if norms.empty or pred.empty or arm not in norms or case.reference not in norms:
            return Verdict(math.nan, f"|ratio/c_t − 1| < {rtol:.3g}", rtol, False,
                           detail="needs the si_norm measurement and a schedule with weight_scale")
        err = (norms[arm] / norms[case.reference] / pred - 1).abs()
        measured = _worst(err.dropna(), highest=True)
        return Verdict(measured, f"max |‖θ̃‖/‖θ‖ / c_t − 1| < {rtol:.3g}", rtol, bool(measured < rtol),
                       detail=f"{len(err)} steps")
    return Property("si_norm_ratio", check, source)


def within_roundoff_floor(metric: str, bound: float, *, source: str, twin: str = "twin",
                          factor: float = 10.0) -> Property:
    """For dynamics where roundoff itself grows exponentially (chaos): every arm's gap to the
    reference stays within max(bound, factor × the gap of a `twin` of the reference started a few
    ulps away), at every step and seed. Measured: the worst gap / max(bound/factor, twin gap)."""
    floor = bound / factor
    expected = f"{metric} <= max({bound:.0e}, {factor:g} × {metric}[{twin}])"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        gaps = results[results.metric == metric].pivot_table(index=["seed", "step"], columns="arm",
                                                             values="value")
        arms = [a for a in gaps.columns if a not in (twin, case.reference)]
        if gaps.empty or twin not in gaps or not arms:
            return Verdict(math.nan, expected, factor, False,
                           detail=f"needs {metric} rows for the twin {twin!r} and another arm")
        allowed = gaps[twin].clip(lower=floor)
        ratio = pd.concat([gaps[a] / allowed for a in arms])
        measured = _worst(ratio, highest=True)
        return Verdict(measured, f"max {metric} / max({floor:.0e}, {metric}[{twin}]) < {factor:g}",
                       factor, bool(measured < factor),
                       detail=f"{len(ratio)} values; worst gap {gaps[arms].max().max():.3g}, "
                              f"worst {twin} gap {gaps[twin].max():.3g}")
    return Property(f"{metric}_within_roundoff_floor", check, source)


def _tail_means(results: pd.DataFrame, metric: str, arms: list[str], last: int) -> pd.DataFrame:
    """Per seed (rows) and arm (columns): the mean of the last `last` values of `metric`."""
    sel = results[(results.metric == metric) & results.arm.isin(arms)]
    if sel.empty:
        return pd.DataFrame()
    return sel.sort_values("step").groupby(["seed", "arm"]).value.apply(lambda v: v.tail(last).mean()).unstack()


def final_difference_below(metric: str, arm: str, tol: float, *, source: str, last: int = 3,
                           name: str | None = None) -> Property:
    """|mean of the last `last` measurements of `metric`, arm − reference| (median over seeds) < tol:
    for statistical agreement where trajectories decorrelate (float32, eps > 0)."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        tails = _tail_means(results, metric, [arm, case.reference], last)
        diffs = ((tails[arm] - tails[case.reference]).abs().dropna()
                 if arm in tails and case.reference in tails else pd.Series(dtype=float))
        measured = float(diffs.median()) if len(diffs) else math.nan
        return Verdict(measured, f"|{metric}[{arm}] − {metric}[{case.reference}]| (last {last}) < {tol:g}",
                       tol, bool(measured < tol), detail=f"{len(diffs)} seeds")
    return Property(name or f"final_{metric}_difference", check, source)


def max_difference_below(metric: str, arm: str, tol: float, *, source: str,
                         steps: tuple[int, int | None] = (1, None), name: str | None = None) -> Property:
    """max over evaluations in `steps` of |metric[arm] − metric[reference]| at the same step (median
    over seeds) < tol: curves that track each other, e.g. test accuracy per epoch."""
    expected = f"max |{metric}[{arm}] − {metric}[{{ref}}]| < {tol:g}"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        table = _select(results, metric, None, steps).pivot_table(index=["seed", "step"], columns="arm",
                                                                  values="value")
        if table.empty or arm not in table or case.reference not in table:
            return Verdict(math.nan, expected.format(ref=case.reference), tol, False,
                           detail=f"needs {metric} rows for {arm!r} and {case.reference!r}")
        per_seed = (table[arm] - table[case.reference]).abs().groupby("seed").max()
        measured = float(per_seed.median())
        return Verdict(measured, expected.format(ref=case.reference), tol, bool(measured < tol),
                       detail=f"{len(table)} evaluations, steps {steps[0]}..{steps[1] or 'end'}, "
                              f"per seed {', '.join(f'{v:.3g}' for v in per_seed)}")
    return Property(name or f"max_{metric}_difference", check, source)


def updates_follow_schedule(arm: str, n_train: int, *, source: str, name: str | None = None) -> Property:
    """An epoch-unit arm made exactly Σ_e ⌊N/B(e)⌋ parameter updates (its batch-size schedule over
    the epochs run, N training examples), every seed: fewer updates is the batch-size claim's payoff,
    and a count that differs means the batch schedule was not what ran."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        from harness.batch_schedules import count_updates

        spec = {a.name: a for a in case.arms}[arm]
        sel = results[(results.metric == "updates") & (results.arm.isin([arm, case.reference]))]
        final = sel.sort_values("step").groupby(["seed", "arm"]).last()
        if final.empty or spec.batch_size is None:
            return Verdict(math.nan, "updates = Σ_e ⌊N/B(e)⌋", 0.0, False,
                           detail="needs the 'schedule' measurement and an arm with a batch_size schedule")
        epochs = int(final.step.max())
        predicted = count_updates(spec.batch_size, epochs, n_train)
        ours = final.xs(arm, level="arm").value
        measured = float((ours - predicted).abs().max())
        ratio = ""
        if case.reference in final.index.get_level_values("arm"):
            ref = final.xs(case.reference, level="arm").value
            ratio = f"; {float((ours / ref).median()):.3f} of {case.reference}'s updates"
        return Verdict(measured, f"|updates − {predicted}| = 0", 0.0, bool(measured == 0),
                       detail=f"{int(ours.median())} updates in {epochs} epochs{ratio}")
    return Property(name or "updates_follow_schedule", check, source)


def _per_seed_max(results: pd.DataFrame, metric: str, arm: str, steps: tuple[int, int | None]) -> pd.Series:
    return _select(results, metric, (arm,), steps).groupby("seed").value.max()


def _per_seed_text(per_seed: pd.Series) -> str:
    return ", ".join(f"seed {s}: {v:.3g}" for s, v in per_seed.items())


def seed_median_max(metric: str, arm: str, *, source: str, above: float | None = None,
                    below: float | None = None, steps: tuple[int, int | None] = (1, None),
                    name: str | None = None) -> Property:
    """The seed median of the arm's largest `metric` over `steps` is above `above` (it got there at
    some point) or below `below` (it never did): e.g. patch-only accuracy before annealing."""
    if (above is None) == (below is None):
        raise ValueError("seed_median_max: give exactly one of above= or below=")
    bound = above if above is not None else below
    rel = ">" if above is not None else "<"
    expected = f"median over seeds of max {metric}[{arm}] (steps {steps[0]}..{steps[1] or 'end'}) {rel} {bound:g}"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        per_seed = _per_seed_max(results, metric, arm, steps)
        measured = float(per_seed.median()) if len(per_seed) else math.nan
        held = measured > bound if above is not None else measured < bound
        return Verdict(measured, expected, bound, bool(held), detail=_per_seed_text(per_seed))
    return Property(name or f"{metric}_{arm}_max", check, source)


def seed_median_rise(metric: str, arm: str, *, split: int, above: float, source: str,
                     name: str | None = None) -> Property:
    """The seed median of (max `metric` after step `split` − max up to it) exceeds `above`: the arm
    learns something only after the schedule changes (e.g. the patch after annealing)."""
    expected = f"median over seeds of max {metric}[{arm}] after step {split} − max up to it > {above:g}"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        rise = (_per_seed_max(results, metric, arm, (split + 1, None))
                - _per_seed_max(results, metric, arm, (1, split))).dropna()
        measured = float(rise.median()) if len(rise) else math.nan
        return Verdict(measured, expected, above, bool(measured > above), detail=_per_seed_text(rise))
    return Property(name or f"{metric}_{arm}_rise", check, source)


def final_advantage(metric: str, arm: str, *, over: str, above: float, source: str, last: int = 3,
                    name: str | None = None) -> Property:
    """The seed median of (mean of the last `last` values of metric[arm] − the same for `over`)
    exceeds `above`: a signed gap, e.g. large→anneal ends with better clean accuracy."""
    expected = f"median over seeds of {metric}[{arm}] − {metric}[{over}] (last {last}) > {above:g}"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        tails = _tail_means(results, metric, [arm, over], last)
        if tails.empty or arm not in tails or over not in tails:
            return Verdict(math.nan, expected, above, False, detail=f"needs {metric} rows for {arm!r} and {over!r}")
        gap = (tails[arm] - tails[over]).dropna()
        measured = float(gap.median())
        return Verdict(measured, expected, above, bool(measured > above), detail=_per_seed_text(gap))
    return Property(name or f"final_{metric}_advantage", check, source)


def _per_seed_value(results: pd.DataFrame, arm: str | None, metric: str, step: int | None) -> pd.Series:
    sel = _select(results, metric, None if arm is None else (arm,), (1, None) if step is None else (step, step))
    return sel.sort_values("step").groupby("seed").value.last()


def difference_above(a: tuple[str, str, int | None], b: tuple[str, str, int | None], above: float, *,
                     source: str, name: str, aggregate: str = "median") -> Property:
    """Per seed, value a − value b, where each is (arm, metric, step) (arm None: any arm, for
    arm-independent rows such as linear_baseline's; step None: the last value); aggregated over seeds by
    `aggregate` ('median' or 'min', the worst seed) and compared: > above."""
    if aggregate not in ("median", "min"):
        raise ValueError(f"aggregate must be 'median' or 'min', got {aggregate!r}")

    def label(spec):
        arm, metric, step = spec
        return metric + (f"[{arm}]" if arm else "") + (f"@{step}" if step is not None else "")

    expected = f"{aggregate} over seeds of {label(a)} − {label(b)} > {above:g}"

    def check(results: pd.DataFrame, case: Case) -> Verdict:
        diff = _per_seed_value(results, *a) - _per_seed_value(results, *b)  # NaN where a seed lacks either value
        if diff.empty or diff.isna().any():
            return Verdict(math.nan, expected, above, False,
                           detail=f"missing or NaN rows for {label(a)} or {label(b)} (seeds {list(diff.index)})")
        measured = float(diff.median() if aggregate == "median" else diff.min())
        return Verdict(measured, expected, above, bool(measured > above), detail=_per_seed_text(diff))
    return Property(name, check, source)


def evaluate(case: Case, results: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for prop in case.properties:
        v = prop.check(results, case)
        # A negative control is ok when its property fails as intended.
        ok = (not v.passed) if case.negative else v.passed
        if case.negative and math.isnan(v.measured):
            ok = False  # an unmeasured property does not count as the intended failure
        detail = v.detail + (f" {XFAIL_MARK}{prop.xfail}]" if prop.xfail else "")
        rows.append(dict(case=case.id, claim=case.claim, property=prop.name, measured=v.measured,
                         expected=v.expected, tolerance=v.tolerance, passed=v.passed,
                         negative=case.negative, ok=ok, source=prop.source, detail=detail))
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)
