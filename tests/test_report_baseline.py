"""Baselines (`python -m harness baseline update`), the band and the marks of the regression
comparison, `report --baseline` exit codes, and the pytest front's `--run-dir/--report` (xdist
workers' parts merged by the controller).

The band rules are tested on synthetic rows (harness.baseline's docstring states them); the planted
regressions run real cases. Every output goes under tmp_path.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import baseline as bl
from harness import registry, report, store
from harness.checks import VERDICT_COLUMNS
from harness.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, main
from harness.runner import RESULT_COLUMNS

REPO = Path(__file__).resolve().parent.parent
LN = "wdexp-zerobuf-mlp-ln"  # exact: gap ~1e-14 against 1e-9, far inside the safe margin
EVIL = "<script>alert(1)</script>"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def base_row(median, lo, hi, tol, *, passed=True, negative=False, n=3, case="c", prop="p") -> pd.Series:
    return pd.Series(dict(case=case, property=prop, median=median, min=lo, max=hi, n=n, tolerance=tol,
                          passed=passed, ok=passed != negative, negative=negative))


def cur_row(measured, tol, *, passed=None, negative=False, below=True, case="c", prop="p") -> pd.Series:
    if passed is None:
        passed = (measured < tol) if below else (measured > tol)
        passed = bool(passed) and not math.isnan(measured)
    return pd.Series(dict(case=case, property=prop, measured=measured, tolerance=tol, passed=passed,
                          negative=negative, ok=(passed != negative) and not math.isnan(measured)))


# ---- the band and the marks ---------------------------------------------------------------------

ROUNDOFF = base_row(1e-13, 6e-14, 1.5e-13, 1e-9)
F32 = base_row(8e-7, 5e-7, 9e-7, 1e-5)
NEG = base_row(2e-3, 1.5e-3, 2.5e-3, 1e-5, passed=False, negative=True)
ZERO = base_row(0.0, 0.0, 0.0, 1e-12)
NEAR = base_row(0.93, 0.929, 0.931, 0.9)  # a "stays above 0.9" property, 3% from its bound: linear


@pytest.mark.parametrize("base, measured, below, negative, status", [
    # Roundoff-level gaps move by orders between BLAS builds: unchanged while ≥ 100× inside.
    (ROUNDOFF, 1e-15, True, False, "unchanged"),
    (ROUNDOFF, 3e-12, True, False, "unchanged"),
    (ROUNDOFF, 1.2e-13, True, False, "unchanged"),
    # ... but entering the last two decades before the bound is a regression, and crossing a flip.
    (ROUNDOFF, 5e-11, True, False, "regressed"),
    (ROUNDOFF, 2e-9, True, False, "flipped-bad"),
    # float32 roundoff at 12× from its bound: the band (≥ ×3.2 either way) decides.
    (F32, 1.5e-6, True, False, "unchanged"),
    (F32, 6e-6, True, False, "regressed"),
    (F32, 1e-8, True, False, "improved"),
    # A negative control: towards the bound is the bad direction; far away is fine.
    (NEG, 1e-4, True, True, "regressed"),
    (NEG, 1e-6, True, True, "flipped-bad"),
    (NEG, 1.0, True, True, "unchanged"),
    (NEG, 3e-3, True, True, "unchanged"),
    # Near its bound, a property is compared linearly (floor 10% of the distance to the bound).
    (NEAR, 0.933, False, False, "unchanged"),
    (NEAR, 0.92, False, False, "regressed"),
    (NEAR, 0.945, False, False, "improved"),
    (NEAR, 0.89, False, False, "flipped-bad"),
    # Exactly 0 (e.g. no motion at all): compared linearly, with the same 100× rule.
    (ZERO, 5e-15, True, False, "unchanged"),
    (ZERO, 3e-13, True, False, "regressed"),
    # Not measured any more: the verdict flips (a NaN never passes).
    (ROUNDOFF, math.nan, True, False, "flipped-bad"),
])
def test_band_and_marks(base, measured, below, negative, status):
    row = bl.compare_row(cur_row(measured, float(base.tolerance), below=below, negative=negative), base)
    assert row.status == status, (row, measured)
    assert row.mark == bl.MARKS[status]


def test_flipped_to_as_intended_and_new():
    was_failing = base_row(5e-6, 4e-6, 6e-6, 1e-9, passed=False)
    row = bl.compare_row(cur_row(1e-13, 1e-9), was_failing)
    assert (row.status, row.mark) == ("flipped-good", "*") and "was NOT as intended" in row.note
    row = bl.compare_row(cur_row(1e-13, 1e-9), None)
    assert (row.status, row.mark) == ("new", "n")


def test_band_definition_numbers():
    band = bl.band_for(F32)  # log10: spread log10(9/5) = 0.255 decades > floor 0.25
    assert band.scale == "log10"
    assert band.half_width == pytest.approx(2 * math.log10(9 / 5))
    assert band.lo == pytest.approx(8e-7 / (9 / 5) ** 2) and band.hi == pytest.approx(8e-7 * (9 / 5) ** 2)
    tight = bl.band_for(base_row(1e-3, 1e-3, 1e-3, 1.0))  # n runs all equal: the floor
    assert tight.half_width == pytest.approx(2 * bl.LOG_FLOOR)
    near = bl.band_for(NEAR)
    assert near.scale == "linear" and near.half_width == pytest.approx(2 * 0.1 * 0.03)
    nonpos = bl.band_for(base_row(0.0, -0.01, 0.01, 0.03))
    assert nonpos.scale == "linear" and nonpos.half_width == pytest.approx(2 * 0.02)


def test_a_tolerance_change_is_noted():
    row = bl.compare_row(cur_row(1e-13, 1e-8), ROUNDOFF)
    assert row.status == "unchanged" and "tolerance changed from 1e-09" in row.note


# ---- reading baselines: one-line errors ------------------------------------------------------------

GOOD_CSV = ("case,property,median,min,max,n,tolerance,passed,ok,negative\n"
            "c,p,1e-13,1e-13,1e-13,3,1e-09,True,True,False\n")


@pytest.mark.parametrize("content, pattern", [
    (None, r"no such file .*baseline update"),
    ("", r"empty file"),
    ("case,property,median,min,max,n,tolerance,passed,ok,negative\n", r"no rows"),
    ("case,property\nc,p\n", r"missing column\(s\) median, min, max, n, tolerance, passed, ok, negative"),
    (GOOD_CSV.replace("1e-13,1e-13,1e-13", "abc,1e-13,1e-13"), r"column 'median' is not a number for c/p"),
    (GOOD_CSV.replace("True,True,False", "maybe,True,False"), r"column 'passed' must be True/False"),
    (GOOD_CSV + GOOD_CSV.splitlines()[1] + "\n", r"c/p appears twice"),
    ('case,property,median\n"c,p,1\n', r"not a readable CSV|missing column"),
    (b"\xff\xfe\x00garbage\x00\xff", r"not a readable CSV|missing column"),
], ids=["missing", "empty", "header-only", "missing-columns", "not-a-number", "bad-bool", "duplicate",
        "broken-quote", "binary"])
def test_unreadable_baseline_is_one_line_exit_2(capsys, tmp_path, synthetic_run, content, pattern):
    path = tmp_path / "base.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(bl.BaselineError, match=pattern):
        bl.read(path)
    rc, _, err = run_cli(capsys, "report", synthetic_run, "--baseline", path, "--html", tmp_path / "r.html")
    assert rc == EXIT_BAD_INPUT
    line = one_line(err)
    assert line.startswith("error: baseline ") and str(path) in line and re.search(pattern, line)


# ---- baseline update ----------------------------------------------------------------------------

def write_run(path: Path, measured: dict[tuple[str, str], float], *, profile="cpu", seeds=(0,), smoke=False,
              ok=None, torch_version="2.14.1") -> Path:
    rows = []
    for (case, prop), value in measured.items():
        tol = 1e-9 if prop != "acc" else 0.9
        passed = value < tol if prop != "acc" else value > tol
        okv = passed if ok is None else ok.get((case, prop), passed)
        rows.append(dict(case=case, claim="claim", property=prop, measured=value, expected=f"max gap < {tol}",
                         tolerance=tol, passed=passed if ok is None else okv, negative=False, ok=okv, source="s",
                         detail=""))
    run = store.RunDir(path)
    run.write_verdicts(pd.DataFrame(rows, columns=VERDICT_COLUMNS))
    run.write_results(pd.DataFrame([(c, "exp", s, 1, "train_gap", v) for (c, _), v in measured.items() for s in seeds],
                                   columns=RESULT_COLUMNS))
    run.write_metadata({"created": "2026-01-01T00:00:00+00:00", "git_commit": "abc", "profile": profile,
                        "device": "cpu", "device_name": "cpu (x86_64, 2 cores, 2 torch threads)",
                        "optimizer": "torch.optim:SGD", "smoke": smoke, "status": "finished",
                        "versions": {"torch": torch_version},
                        "seeds": {c: list(seeds) for c, _ in measured}})
    return path


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    return write_run(tmp_path / "synthetic", {("a", "gap"): 1e-13, ("b", "acc"): 0.95})


def test_baseline_update_median_spread_n(capsys, tmp_path, monkeypatch):
    runs = [write_run(tmp_path / f"s{s}", {("a", "gap"): v, ("b", "acc"): acc}, seeds=(s,))
            for s, v, acc in ((0, 1e-13, 0.95), (1, 4e-13, 0.96), (2, 2e-13, 0.97))]
    monkeypatch.setattr(bl, "BASELINE_DIR", tmp_path / "baselines")
    rc, out, err = run_cli(capsys, "baseline", "update", *runs)
    assert rc == EXIT_OK, err
    path = tmp_path / "baselines" / "cpu.csv"
    assert str(path) in out and "n = 3–3" in out
    base = bl.read(path)
    a = base.set_index("case").loc["a"]
    assert (a["median"], a["min"], a["max"], a["n"]) == (2e-13, 1e-13, 4e-13, 3)
    assert a["spread"] == pytest.approx(3e-13)
    assert a["torch"] == "2.14.1" and a["device_class"] == "cpu/x86_64" and a["seeds"] == "0;1;2"
    assert bool(a["ok"]) and bool(a["passed"]) and a["tolerance"] == 1e-9
    assert list(pd.read_csv(path).columns) == bl.COLUMNS
    # A run of the same code compares clean against it: exit 0, everything unchanged.
    rc, out, err = run_cli(capsys, "report", runs[1], "--html", tmp_path / "r.html")
    assert rc == EXIT_OK, err
    assert "2 unchanged" in out


@pytest.mark.parametrize("setup, pattern", [
    ("smoke", r"--smoke run has no verdicts"),
    ("profiles", r"differ in profile"),
    ("unstable", r"a/gap: ok is 1 of 2 runs True; a baseline needs a verdict that is stable"),
    ("torch", r"differ in torch version"),
    ("not-a-run", r"is not a run directory"),
    ("no-profile", r"no profile .*--out FILE"),
], ids=["smoke", "profiles", "unstable", "torch", "not-a-run", "no-profile"])
def test_baseline_update_refuses_bad_runs(capsys, tmp_path, monkeypatch, setup, pattern):
    monkeypatch.setattr(bl, "BASELINE_DIR", tmp_path / "baselines")
    one = write_run(tmp_path / "one", {("a", "gap"): 1e-13}, seeds=(0,))
    other = {
        "smoke": lambda p: write_run(p, {("a", "gap"): 1e-13}, seeds=(1,), smoke=True),
        "profiles": lambda p: write_run(p, {("a", "gap"): 1e-13}, seeds=(1,), profile="gpu"),
        "unstable": lambda p: write_run(p, {("a", "gap"): 1e-13}, seeds=(1,), ok={("a", "gap"): False}),
        "torch": lambda p: write_run(p, {("a", "gap"): 1e-13}, seeds=(1,), torch_version="2.0.0"),
        "not-a-run": lambda p: p,
        "no-profile": None,
    }[setup]
    if setup == "no-profile":
        runs = [write_run(tmp_path / "np", {("a", "gap"): 1e-13}, profile=None)]
    else:
        runs = [one, other(tmp_path / "other")]
    rc, _, err = run_cli(capsys, "baseline", "update", *runs)
    assert rc == EXIT_BAD_INPUT
    assert re.search(pattern, one_line(err)), err
    assert not (tmp_path / "baselines").exists()


def test_baseline_update_warns_when_runs_share_seeds(capsys, tmp_path):
    runs = [write_run(tmp_path / f"r{i}", {("a", "gap"): 1e-13}) for i in range(2)]
    rc, _, err = run_cli(capsys, "baseline", "update", *runs, "--out", tmp_path / "b.csv")
    assert rc == EXIT_OK and "same seeds" in err


# ---- default baseline, escaping, plot registry ------------------------------------------------------

def test_default_baseline_is_the_profiles_and_run_html_survives_a_broken_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bl, "BASELINE_DIR", tmp_path / "baselines")
    run = write_run(tmp_path / "run", {("a", "gap"): 1e-13})
    rc, out, _ = run_cli(capsys, "report", run, "--html", tmp_path / "none.html")
    assert rc == EXIT_OK and "unchanged" not in out  # no baselines/cpu.csv: no comparison
    assert "No baseline comparison" in (tmp_path / "none.html").read_text()
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "cpu.csv").write_text(GOOD_CSV.replace("c,p,", "a,gap,"))
    rc, out, _ = run_cli(capsys, "report", run, "--html", tmp_path / "r.html")
    assert rc == EXIT_OK and "cpu.csv: 1 unchanged" in out
    rc, out, _ = run_cli(capsys, "report", run, "--no-baseline", "--html", tmp_path / "r.html")
    assert rc == EXIT_OK and "unchanged" not in out
    (tmp_path / "baselines" / "cpu.csv").write_text("garbage\n")
    rc, _, err = run_cli(capsys, "report", run, "--html", tmp_path / "r.html")
    assert rc == EXIT_BAD_INPUT and "missing column" in one_line(err)
    # After `run --html` the default baseline is optional: the report says why it has no comparison.
    assert report.write_report(run, tmp_path / "after-run.html") is None
    page = (tmp_path / "after-run.html").read_text()
    assert "No baseline comparison: baseline " in page and "missing column" in page


def test_baseline_text_is_escaped(capsys, tmp_path):
    run = write_run(tmp_path / "run", {("a", "gap"): 1e-13}, profile=EVIL)
    base = tmp_path / "evil.csv"
    pd.DataFrame([dict(case=EVIL, property=EVIL, median=1.0, min=1.0, max=1.0, n=1, tolerance=2.0, passed=True,
                       ok=True, negative=False, torch=EVIL, device_class=EVIL, seeds=EVIL, created=EVIL)]).to_csv(
        base, index=False)
    rc, _, _ = run_cli(capsys, "report", run, "--baseline", base, "--html", tmp_path / "r.html")
    assert rc == EXIT_OK  # a baseline row this run lacks is listed, never failed
    page = (tmp_path / "r.html").read_text()
    assert EVIL not in page and "&lt;script&gt;" in page and "<script" not in page.lower()
    assert "Baseline rows not in this run" in page


def test_plot_registry_is_extensible(tmp_path):
    run = write_run(tmp_path / "run", {("a", "gap"): 1e-13})

    @report.register_plot("angular update vs theory")
    def angular(results, ctx):
        fig = report.line_plot(results, ylabel="angle")
        return [(fig, f"{ctx.case_id}: angular update vs theory")]
    try:
        report.write_report(run, tmp_path / "r.html", None)
    finally:
        del report.PLOTTERS["angular update vs theory"]
    page = (tmp_path / "r.html").read_text()
    assert "a: angular update vs theory" in page


# ---- planted regressions on real runs ------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """LN (exact) on seed 0, and a baseline made from that run. No chaotic case here: a value that
    roundoff makes chaotic moves with the CPU's SIMD kernels (the IN roundoff ratio measured 0.056
    under avx512, 0.075 default, 0.118 avx2), and no test may depend on one."""
    root = tmp_path_factory.mktemp("real")
    assert main(["run", LN, "--profile", "cpu", "--seeds", "0", "--out", str(root / "run")]) == EXIT_OK
    assert main(["baseline", "update", str(root / "run"), "--out", str(root / "base.csv")]) == EXIT_OK
    return root


def test_a_run_against_its_own_baseline_is_unchanged(capsys, real_run, tmp_path):
    rc, out, err = run_cli(capsys, "report", real_run / "run", "--baseline", real_run / "base.csv",
                           "--html", tmp_path / "r.html")
    assert rc == EXIT_OK, err
    verdicts = store.RunDir(real_run / "run").read()[1]
    assert f"{len(verdicts)} unchanged" in out
    page = (tmp_path / "r.html").read_text()
    assert page.count("<tr class='ok' data-change='unchanged'") == len(verdicts)


def test_planted_regression_band_exits_1(capsys, real_run, tmp_path):
    # Planted on a value no kernel can move: the exact gap (1e-16…1e-12 whatever roundoff does) is
    # replaced by 1/20 of its bound, out of the 100× safe margin and decades above the baseline's
    # band on every CPU, while the verdict itself still passes: only the band can catch it.
    run = tmp_path / "run"
    shutil.copytree(real_run / "run", run)
    verdicts = pd.read_csv(run / "verdicts.csv")
    row = (verdicts.case == LN) & (verdicts.property == "function_gap")
    measured, tol = float(verdicts.loc[row, "measured"].iloc[0]), float(verdicts.loc[row, "tolerance"].iloc[0])
    assert measured < tol / 1000, "the exact gap must sit far inside its bound before the plant"
    verdicts.loc[row, "measured"] = tol / 20
    verdicts.to_csv(run / "verdicts.csv", index=False)
    rc, out, err = run_cli(capsys, "report", run, "--baseline", real_run / "base.csv", "--html", tmp_path / "r.html")
    assert rc == EXIT_FAIL
    line = one_line(err)
    assert line.startswith(f"regression against baseline {real_run / 'base.csv'}") and f"{LN}/" in line
    assert "regressed" in line and "1 regressed" in out
    page = (tmp_path / "r.html").read_text()
    assert "data-change='regressed'" in page and "+ regressed" in page
    assert "Against the baseline: " in page and "class='banner fail'" in page


def test_planted_flip_exits_1(capsys, real_run, tmp_path):
    # A real flip: the decoupled-WD optimizer breaks the exact case the baseline has passing.
    out_dir = tmp_path / "sgdw"
    rc, _, _ = run_cli(capsys, "run", LN, "--profile", "cpu", "--seeds", "0", "--optimizer", "harness.optim:SGDW",
                       "--out", out_dir)
    assert rc == EXIT_FAIL
    rc, out, err = run_cli(capsys, "report", out_dir, "--baseline", real_run / "base.csv",
                           "--html", tmp_path / "r.html")
    assert rc == EXIT_FAIL
    assert "flipped-bad" in one_line(err) and LN in err
    page = (tmp_path / "r.html").read_text()
    assert "data-change='flipped-bad'" in page and "baseline optimizer torch.optim:SGD" in page
    # The other way round: a verdict that now holds where the baseline had it failing.
    base = pd.read_csv(real_run / "base.csv")
    base.loc[base.case == LN, ["passed", "ok"]] = False
    planted = tmp_path / "planted.csv"
    base.to_csv(planted, index=False)
    rc, out, err = run_cli(capsys, "report", real_run / "run", "--baseline", planted, "--html", tmp_path / "r2.html")
    assert rc == EXIT_FAIL and "flipped-good" in one_line(err)


# ---- the pytest front: --run-dir / --report ----------------------------------------------------------

def inner_pytest(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process: 2-thread torch crawls when the cores are busy
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


FAST_IDS = ["wdexp-zerobuf-mlp-ln", "wdexp-zerobuf-mlp-gn", "wdexp-neg-eval-running-stats"]


def test_pytest_xdist_workers_merge_into_one_run_dir(tmp_path):
    run_dir, html = tmp_path / "run", tmp_path / "r.html"
    proc = inner_pytest("tests/test_cases.py", "-n", "2", "-k", " or ".join(FAST_IDS), "--seeds", "0",
                        "--run-dir", run_dir, f"--report={html}", "--baseline", "none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run directory {run_dir}" in proc.stdout
    results, verdicts, meta = store.RunDir(run_dir).read()
    assert list(verdicts.case.unique()) == [c for c in registry.all_cases() if c in FAST_IDS]  # registry order
    assert len(verdicts) == sum(len(registry.get(c).properties) for c in FAST_IDS)
    assert set(results.case) == set(FAST_IDS) and set(results.seed) == {0}
    for c in FAST_IDS:  # every row of every case, nothing duplicated
        assert not results[results.case == c].duplicated().any()
    assert meta["profile"] == "cpu" and set(meta["cases"]) == set(FAST_IDS)
    assert all(v["status"] == "ok" and v["pytest"] == "passed" for v in meta["cases"].values())
    assert set(meta["workers"]) <= {"gw0", "gw1"} and meta["workers"]
    assert meta["command"][:3] == ["python", "-m", "pytest"]
    assert not list(run_dir.glob(".parts-*")), "the parts are removed after the merge"
    page = html.read_text()
    assert page.count("<tr class='ok'") == len(verdicts)


def test_pytest_report_fails_the_session_on_a_regression(tmp_path):
    run_dir = tmp_path / "run"
    base = tmp_path / "base.csv"
    rows = [dict(case=LN, property=p.name, median=1e-13, min=1e-13, max=1e-13, n=3, tolerance=1e-9,
                 passed=False, ok=False, negative=False) for p in registry.get(LN).properties]
    pd.DataFrame(rows).to_csv(base, index=False)  # the baseline had LN failing: today it flips
    proc = inner_pytest("tests/test_cases.py", "-k", LN, "--seeds", "0", "--run-dir", run_dir,
                        "--baseline", base, "--report")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "1 passed" in proc.stdout and "flipped-good" in proc.stdout
    assert (run_dir / "report.html").exists()
    assert store.RunDir(run_dir).read()[2]["cases"][LN]["status"] == "ok"


def test_pytest_report_option_rejects_a_non_html_path():
    proc = inner_pytest("--co", "--report", "tests/test_cases.py", timeout=120)
    assert proc.returncode == 4 and "--report takes an .html path" in proc.stderr


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "run"
    assert main(["run", "toy-bn-wd-never-converges", "--out", str(run)]) == EXIT_OK
    return run


def test_baseline_from_one_multi_seed_run_takes_the_spread_from_each_seed(capsys, tmp_path, toy_run):
    """One normal run gives the seed spread: each seed re-judged alone joins the run's value, and the
    verdict stays the full run's. The case gates every seed (max update norm > 1e-3), so its run value
    is the smallest seed's."""
    case, run = "toy-bn-wd-never-converges", toy_run
    results, verdicts, _ = store.RunDir(run).read()
    spec = registry.all_cases()[case]
    per_seed = pd.Series([spec.properties[0].check(results[results.seed == s], spec).measured for s in (0, 1, 2)])
    assert per_seed.nunique() == 3
    rc, out, err = run_cli(capsys, "baseline", "update", run, "--out", tmp_path / "b.csv")
    assert rc == EXIT_OK, err
    row = bl.read(tmp_path / "b.csv").set_index("case").loc[case]
    assert row["n"] == 4  # the run's value and its three seeds
    assert row["min"] == pytest.approx(per_seed.min()) and row["max"] == pytest.approx(per_seed.max())
    assert float(verdicts.measured.iloc[0]) == pytest.approx(per_seed.min())
    assert bool(row["passed"]) and bool(row["ok"]) and row["seeds"] == "0;1;2"
    rc, out, err = run_cli(capsys, "report", run, "--baseline", tmp_path / "b.csv", "--html", tmp_path / "r.html")
    assert rc == EXIT_OK and "1 unchanged" in out, out + err


def _with_check(case_id: str, monkeypatch, **prop_over):
    import dataclasses
    cases = dict(registry.all_cases())
    case = cases[case_id]
    cases[case_id] = dataclasses.replace(case, properties=(dataclasses.replace(case.properties[0], **prop_over),))
    monkeypatch.setattr(registry, "all_cases", lambda: cases)
    return case.properties[0]


@pytest.mark.parametrize("change, warning", [
    ("tolerance", "its properties changed since the run"),
    ("raises", "its check cannot judge one seed alone (TypeError: planted)"),
])
def test_baseline_keeps_only_the_run_value_when_the_check_changed_or_raises(change, warning, toy_run, tmp_path,
                                                                           capsys, monkeypatch):
    """Per-seed values must come from the check the run used; otherwise the row falls back to n = 1."""
    from harness.checks import max_below
    if change == "tolerance":  # the same property name, judged against another bound since the run
        new = max_below("update_norm", 1e-2, source="s")
        _with_check("toy-bn-wd-never-converges", monkeypatch, check=new.check)
    else:
        def broken(results, case):
            raise TypeError("planted")
        _with_check("toy-bn-wd-never-converges", monkeypatch, check=broken)
    rc, _, err = run_cli(capsys, "baseline", "update", toy_run, "--out", tmp_path / "b.csv")
    assert rc == EXIT_OK and warning in one_line(err), err
    assert bl.read(tmp_path / "b.csv").set_index("case").loc["toy-bn-wd-never-converges", "n"] == 1


# ---- the top banner: green, amber (documented non-reproductions only), red ------------------------

def _verdicts(rows):
    return pd.DataFrame([dict(case=c, claim="x", property="p", measured=1.0, expected="< 2", tolerance=2.0,
                              passed=ok, negative=False, ok=ok, source="s", detail="") for c, ok in rows],
                        columns=VERDICT_COLUMNS)


@pytest.mark.parametrize("rows, statuses, state", [
    ([("a", True), ("b", True)], {"a": "ok", "b": "ok"}, "green"),
    ([("a", True), ("b", False)], {"a": "ok", "b": "xfail"}, "amber"),
    ([("a", False), ("b", False)], {"a": "fail", "b": "xfail"}, "red"),
    ([("a", False)], {"a": "error"}, "red"),
])
def test_top_banner_state(rows, statuses, state):
    meta = {"cases": {c: {"status": s} for c, s in statuses.items()}}
    page = report.render(pd.DataFrame(columns=RESULT_COLUMNS), _verdicts(rows), meta)
    banner = re.search(r"<div class='banner (\w+)' data-state='(\w+)'>(.*?)</div>", page)
    assert banner.group(2) == state
    assert banner.group(1) == {"green": "pass", "amber": "warn", "red": "fail"}[state]
    if state == "amber":
        assert "b" in banner.group(3) and "documented non-reproduction" in banner.group(3)


def test_top_banner_is_red_on_a_baseline_regression_even_when_every_verdict_holds():
    verdicts = _verdicts([("c", True)]).assign(measured=5e-11, tolerance=1e-9, expected="< 1e-09")
    comparison = bl.compare(verdicts, pd.DataFrame([ROUNDOFF]), {"profile": "cpu"})
    assert comparison.failed  # 5e-11 against a 1e-13 baseline: regressed, though the verdict holds
    page = report.render(pd.DataFrame(columns=RESULT_COLUMNS), verdicts, {"cases": {"c": {"status": "ok"}}},
                         comparison)
    assert "data-state='red'" in page and "regression against the baseline" in page


# ---- log-scale plots with exact zeros ----------------------------------------------------------------

def test_log_plot_draws_zeros_at_a_stated_floor_and_keeps_the_axis_on_the_data():
    rows = [("exp", 0, k, v) for k, v in enumerate([0.0, 0.0, 3e-14, 1e-13, 5e-324, 2e-13])]
    rows += [("twin", 0, k, v) for k, v in enumerate([0.0, 4e-15, 8e-15, 0.0, 1e-14, 3e-14])]
    sel = pd.DataFrame([dict(case="c", arm=a, seed=s, step=k, metric="batch_gap", value=v) for a, s, k, v in rows])
    fig = report.line_plot(sel, log=True, bounds=[1e-9])
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo >= float(np.finfo(np.float32).tiny) and 1e-16 < lo < 4e-16  # floor 4e-16, a decade below 4e-15
    assert 1e-9 < hi < 1e-8  # the bound is shown
    labels = ax.get_legend_handles_labels()[1]
    assert sum(lbl.startswith("0: bitwise equal (at 4e-16)") for lbl in labels) == 1  # one legend entry
    # every zero and the denormal drawn as a marker at the floor
    markers = [ln for ln in ax.lines if ln.get_marker() == "v"]
    assert sum(len(ln.get_ydata()) for ln in markers) == 5
    assert all(np.allclose(ln.get_ydata(), 4e-16) for ln in markers)


def test_log_plot_of_only_zeros_has_a_finite_readable_axis():
    sel = pd.DataFrame([dict(case="c", arm="exp", seed=0, step=k, metric="batch_gap", value=0.0) for k in range(4)])
    lo, hi = report.line_plot(sel, log=True).axes[0].get_ylim()
    assert lo >= float(np.finfo(np.float32).tiny) and hi <= 1e-13


def test_scoreboard_has_one_row_per_claim_and_folds_plots_unless_attention(good_report):
    page = good_report
    rows = re.findall(r"<tr class='score' data-claim='([^']+)'>", page)
    verdict_claims = set(re.findall(r"<h2 id='claim-\d+'>([^<]+)</h2>", page))
    assert rows and len(rows) == len(set(rows)) and set(rows) == verdict_claims
    assert page.index("class='scoreboard'") < page.index("<table class='meta'>")  # first screen
    assert "<details class='plots'><summary>" in page  # healthy claims: plots folded


@pytest.fixture(scope="module")
def good_report(real_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "r.html"
    report.write_report(real_run / "run", out, real_run / "base.csv")
    return out.read_text()


def test_a_regression_opens_its_claims_plots(real_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(real_run / "run", run)
    verdicts = pd.read_csv(run / "verdicts.csv")
    verdicts.loc[(verdicts.case == LN) & (verdicts.property == "function_gap"), "measured"] = 5e-11
    verdicts.to_csv(run / "verdicts.csv", index=False)
    run_cli(capsys, "report", run, "--baseline", real_run / "base.csv", "--html", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<details class='plots' open>" in page and "1 changed (regressed)" in page
