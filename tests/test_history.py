"""The run history (harness.history): adding finished runs to the SQLite file, reading them back, and
the detection of sustained steps (the rules are in the module docstring).

Four real runs are made in-process by the CLI (module fixture), each with one seed of
toy-bn-wd-never-converges (a statistical value, never_converges ≈ 0.06 against a lower bound 1e-3)
and of wdexp-thm2.1-mlp-bn (exact: roundoff gaps ≈ 1e-15 against 1e-9, the safe zone). Seeds 0, 2,
3, 4: seed 1 of the toy cycles with loss spikes (0.57, one decade above the others; cases/bn_wd_toy.py),
which would itself be a step. Copies of the runs become four nights (created a day apart), and a
shift is planted by scaling one property's measured value in verdicts.csv. Everything is written
under tmp_path; the default history (<repo>/.history) is never touched.
"""
from __future__ import annotations

import json
import math
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import history
from harness.baseline import device_class
from harness.cli import EXIT_OK, main
from harness.history import HistoryError, add, detect_shifts, load
from harness.store import RunDir, atomic_write_csv

TOY, EXACT = "toy-bn-wd-never-converges", "wdexp-thm2.1-mlp-bn"
PROP = (TOY, "never_converges")
SEEDS = (0, 2, 3, 4)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("history-runs")
    runs = []
    for seed in SEEDS:
        out = root / f"seed{seed}"
        assert main(["run", TOY, EXACT, "--seeds", str(seed), "--out", str(out)]) == EXIT_OK
        runs.append(out)
    return runs


def created(i: int) -> str:
    return f"2026-01-{i + 1:02d}T03:00:00+00:00"


def nights(real_runs, dest: Path, plant: dict | None = None) -> list[Path]:
    """Copies of the real runs as nights 0..3 (oldest first). plant: {(case, property): factors per
    night}, multiplied into that night's measured value in verdicts.csv."""
    out = []
    for i, src in enumerate(real_runs):
        night = dest / f"night{i}"
        shutil.copytree(src, night)
        meta = json.loads((night / "metadata.json").read_text())
        meta["created"] = created(i)
        (night / "metadata.json").write_text(json.dumps(meta, indent=2))
        for (case, prop), factors in (plant or {}).items():
            ver = pd.read_csv(night / "verdicts.csv")
            rows = (ver.case == case) & (ver.property == prop)
            assert rows.sum() == 1
            ver.loc[rows, "measured"] *= factors[i]
            atomic_write_csv(night / "verdicts.csv", ver)
        out.append(night)
    return out


def history_of(runs: list[Path], into: Path) -> pd.DataFrame:
    for run in runs:
        add(run, into)
    return load(into)


def row(shifts: pd.DataFrame, case: str, prop: str) -> pd.Series:
    hit = shifts[(shifts.case == case) & (shifts.property == prop)]
    assert len(hit) == 1
    return hit.iloc[0]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


# ---- step detection on real runs ----------------------------------------------------------------

@pytest.mark.parametrize("factor, direction", [(5.0, "away from the bound"), (0.25, "towards the bound")])
def test_a_planted_step_in_the_last_two_runs_is_flagged_with_its_direction(real_runs, tmp_path, factor, direction):
    runs = nights(real_runs, tmp_path, {PROP: [1, 1, factor, factor]})
    shifts = detect_shifts(history_of(runs, tmp_path / "h"))
    assert len(shifts) == 3 and list(shifts.columns) == history.SHIFT_COLUMNS
    assert shifts[shifts.flagged][["case", "property"]].values.tolist() == [list(PROP)]
    hit = row(shifts, *PROP)
    assert hit.scale == "log" and hit.n == 4 and hit.direction == direction
    assert hit.change_at == created(2)
    assert hit.claim == "li-arora-2020/bn-plus-wd-toy-does-not-converge"
    values = [pd.read_csv(r / "verdicts.csv").query("case == @TOY").measured.iloc[0] for r in runs]
    assert hit.before == pytest.approx(math.sqrt(values[0] * values[1]))  # geometric mean on the log scale
    assert hit.after == pytest.approx(math.sqrt(values[2] * values[3]))
    assert f"at {created(2)}" in hit.detail and direction in hit.detail


def test_the_same_history_without_the_plant_flags_nothing(real_runs, tmp_path):
    shifts = detect_shifts(history_of(nights(real_runs, tmp_path), tmp_path / "h"))
    assert not shifts.flagged.any(), shifts.detail.tolist()
    assert row(shifts, *PROP).scale == "log"
    assert set(shifts[shifts.case == EXACT].scale) == {"safe"}
    assert shifts.change_at.isna().all() and (shifts.direction == "").all()


def test_a_single_outlier_in_the_last_run_is_not_flagged(real_runs, tmp_path):
    frame = history_of(nights(real_runs, tmp_path, {PROP: [1, 1, 1, 10]}), tmp_path / "h")
    hit = row(detect_shifts(frame), *PROP)
    assert not hit.flagged and "not a sustained shift" in hit.detail
    # The same jump is large enough to be flagged when one run after the change is enough.
    one = row(detect_shifts(frame, min_after=1), *PROP)
    assert one.flagged and one.change_at == created(3) and one.direction == "away from the bound"


def test_the_safe_zone_is_never_flagged_even_when_its_roundoff_jumps_100x(real_runs, tmp_path):
    plant = {(EXACT, "function_gap"): [1, 1, 100, 100], (EXACT, "si_norm_ratio"): [1, 1, 100, 100]}
    frame = history_of(nights(real_runs, tmp_path, plant), tmp_path / "h")
    exact = frame[frame.case == EXACT]
    assert (exact.measured * 100 <= exact.tolerance).all()  # still ≥ 100× inside 1e-9
    shifts = detect_shifts(frame)
    assert not shifts.flagged.any()
    for prop in ("function_gap", "si_norm_ratio"):
        hit = row(shifts, EXACT, prop)
        assert hit.scale == "safe" and hit.n == 4 and "not judged" in hit.detail
        assert hit.after / hit.before == pytest.approx(100, rel=0.5)


# ---- adding and loading -------------------------------------------------------------------------

def test_adding_the_same_run_twice_is_refused_in_one_line(real_runs, tmp_path):
    into = tmp_path / "h"
    rid, n = add(real_runs[0], into)
    assert n == 3 and len(rid) == 12 and rid == history.run_id(RunDir(real_runs[0]).read()[2])
    with pytest.raises(HistoryError) as exc:
        add(real_runs[0], into)
    msg = one_line(exc)
    assert msg.startswith(f"run {rid} is already in the history {into / 'history.sqlite'} (added 20")
    copy = shutil.copytree(real_runs[0], tmp_path / "copy")  # a copy of the same run is the same run
    with pytest.raises(HistoryError, match=f"run {rid} is already"):
        add(copy, into)
    assert len(load(into)) == 3


def test_smoke_unfinished_and_non_run_directories_are_refused(real_runs, tmp_path):
    into = tmp_path / "h"
    smoke = tmp_path / "smoke"
    assert main(["run", EXACT, "--smoke", "--out", str(smoke)]) == EXIT_OK
    unfinished = shutil.copytree(real_runs[0], tmp_path / "unfinished")
    meta = json.loads((unfinished / "metadata.json").read_text())
    (unfinished / "metadata.json").write_text(json.dumps(dict(meta, status="interrupted")))
    (tmp_path / "plain").mkdir()
    for path, pattern in [(smoke, "--smoke run"), (unfinished, "the run is interrupted, not finished"),
                          (tmp_path / "plain", "is not a run directory"),
                          (tmp_path / "absent", "is not a run directory")]:
        with pytest.raises(HistoryError) as exc:
            add(path, into)
        assert pattern in one_line(exc) and str(path) in one_line(exc)
    assert load(into).empty


def test_load_round_trips_rows_and_keys(real_runs, tmp_path):
    into = tmp_path / "deep" / "h"
    empty = load(into)
    assert empty.empty and list(empty.columns) == history.COLUMNS and not into.exists()
    runs = nights(real_runs, tmp_path)
    ids = [add(r, into)[0] for r in reversed(runs)]  # added newest first: load still orders by created
    frame = load(into)
    assert list(frame.columns) == history.COLUMNS
    assert frame.drop_duplicates("run_id").run_id.tolist() == ids[::-1]
    for run, (rid, got) in zip(runs, frame.groupby("run_id", sort=False)):
        _, ver, meta = RunDir(run).read()
        assert rid == history.run_id(meta)
        keys = got.iloc[0]
        assert keys.created == meta["created"] and keys.git_commit == meta["git_commit"]
        cap = meta["versions"]["cpu_capability"]  # the SIMD kernels torch picked: part of the machine class
        assert keys.machine == f"{device_class(meta)} {cap}" == "cpu/" + meta["device_name"].split("(")[1].split(",")[0] + f" {cap}"
        assert (keys["device"], keys["torch"], keys["optimizer"], keys["dtype"]) == (
            meta["device"], meta["versions"]["torch"], meta["optimizer"], meta["dtype"])
        assert json.loads(keys.optimizer_kwargs) == meta["optimizer_kwargs"]
        assert keys.profile is None or pd.isna(keys.profile)
        mine = got[history.VERDICT_COLUMNS].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, ver[history.VERDICT_COLUMNS], check_dtype=False)
        assert mine.measured.tolist() == ver.measured.tolist()  # bit for bit
    with sqlite3.connect(into / "history.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 12


def test_concurrent_adds_are_serialized_and_a_failed_add_leaves_nothing(real_runs, tmp_path, monkeypatch):
    into = tmp_path / "h"
    jobs = [*real_runs, real_runs[0], real_runs[0]]  # four runs, one of them three times at once

    def one(run):
        try:
            return add(run, into)[0]
        except HistoryError as exc:
            return str(exc)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    refused = [a for a in answers if "already in the history" in a]
    assert len(refused) == 2 and len(set(answers) - set(refused)) == 4
    assert load(into).run_id.nunique() == 4 and len(load(into)) == 12
    # A failure between the run row and its verdicts rolls the whole add back.
    night = nights(real_runs[:1], tmp_path / "n")[0]
    monkeypatch.setattr(history, "_bool_column", lambda col, name, where: [{"unbindable": 1}] * len(col))
    with pytest.raises(HistoryError) as exc:  # the verdict rows fail to insert after the run row went in
        add(night, into)
    assert str(into / "history.sqlite") in one_line(exc)
    with pytest.raises(HistoryError):  # the first add into a new history: its tables roll back too
        add(night, tmp_path / "fresh")
    assert load(tmp_path / "fresh").empty
    monkeypatch.undo()
    assert load(into).run_id.nunique() == 4
    assert add(night, into)[1] == 3


def test_machine_adds_the_cpu_capability_when_recorded():
    meta = {"device": "cpu", "device_name": "cpu (x86_64, 2 cores, 1 torch threads)"}
    assert history.machine(meta) == "cpu/x86_64"
    assert history.machine(dict(meta, versions={"cpu_capability": "AVX512"})) == "cpu/x86_64 AVX512"
    assert history.machine({"device": "cuda", "device_name": "NVIDIA H200"}) == "cuda/NVIDIA H200"


def test_an_unreadable_history_is_one_line(tmp_path):
    bad = tmp_path / "h"
    bad.mkdir()
    (bad / "history.sqlite").write_text("not a database\n" * 100)
    with pytest.raises(HistoryError) as exc:
        load(bad)
    assert str(bad / "history.sqlite") in one_line(exc)


# ---- step detection on synthetic series ---------------------------------------------------------

def synthetic(values, tol, expected, *, case="c", prop="p", negative=False) -> pd.DataFrame:
    return pd.DataFrame(dict(
        run_id=[f"r{i}" for i in range(len(values))], created=[created(i) for i in range(len(values))],
        case=case, claim="claim", property=prop, measured=values, tolerance=tol, expected=expected,
        passed=True, ok=True, negative=negative))


def test_linear_scale_near_the_bound():
    shifts = detect_shifts(synthetic([0.050, 0.052, 0.049, 0.080, 0.082], 0.1, "|r − 1| < 0.1"))
    hit = shifts.iloc[0]
    assert hit.scale == "linear" and hit.flagged and hit.direction == "towards the bound"
    assert hit.change_at == created(3) and hit.before == pytest.approx(0.0503333) and hit.after == pytest.approx(0.081)
    # Below the floor (20% of |0.1 − 0.05| = 0.01): not flagged.
    assert not detect_shifts(synthetic([0.050, 0.052, 0.049, 0.058, 0.057], 0.1, "|r − 1| < 0.1")).flagged.any()


def test_safe_zone_boundary_and_short_series():
    leaves = detect_shifts(synthetic([1e-12, 1.1e-12, 5e-11, 6e-11], 1e-9, "max gap < 1e-09")).iloc[0]
    # 5e-11 is 20× inside 1e-9: on the log scale, but no longer 100× inside
    assert leaves.scale == "log" and leaves.flagged and leaves.direction == "towards the bound"
    stays = detect_shifts(synthetic([1e-13, 1.1e-13, 1e-11, 9e-12], 1e-9, "max gap < 1e-09")).iloc[0]
    assert stays.scale == "safe" and not stays.flagged
    short = detect_shifts(synthetic([1e-3, 1e-3, 1e-1], 1.0, "x < 1")).iloc[0]
    assert short.n == 3 and not short.flagged and "needs ≥ 4" in short.detail
    lower = detect_shifts(synthetic([5.0, 5.1, 1.5, 1.4], 1.0, "x > 1")).iloc[0]  # lower bound, linear
    assert lower.scale == "linear" and lower.flagged and lower.direction == "towards the bound"
    empty = detect_shifts(load(Path("/nonexistent/history")))
    assert empty.empty and list(empty.columns) == history.SHIFT_COLUMNS


def test_detection_is_deterministic():
    rng = np.random.default_rng(0)
    frames = []
    for s in range(200):  # 200 series × 25 runs = 5,000 rows; series 0, 7, 14, ... step ×10 at run 20
        values = 10 ** (-2 + 0.05 * rng.standard_normal(25))
        if s % 7 == 0:
            values[20:] *= 10
        frames.append(synthetic(values, 1e-4, "x > 0.0001", case=f"c{s:03d}"))
    frame = pd.concat(frames, ignore_index=True)
    shifts = detect_shifts(frame)  # speed is a figure (about 0.4 s for these 5,000 rows), not a test
    assert shifts.case[shifts.flagged].tolist() == [f"c{s:03d}" for s in range(0, 200, 7)]
    assert set(shifts.change_at[shifts.flagged]) == {created(20)}
    shuffled = detect_shifts(frame.sample(frac=1, random_state=1))
    pd.testing.assert_frame_equal(shifts, shuffled)


# ---- through the command line: history add, report --history -----------------------------------------

def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, *capsys.readouterr()


@pytest.mark.parametrize("planted", [True, False])
def test_report_with_history_flags_the_planted_shift_in_amber_and_nothing_without_it(
        planted, real_runs, tmp_path, capsys):
    runs = nights(real_runs, tmp_path, {PROP: (1, 1, 5, 5)} if planted else None)
    into = tmp_path / "hist"
    for run in runs:
        rc, out, _ = _cli(capsys, "history", "add", run, "--into", into)
        assert rc == EXIT_OK and "added" in out
    rc, _, err = _cli(capsys, "history", "add", runs[0], "--into", into)
    assert rc == 2 and "already in the history" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, "report", runs[-1], "--history", into, "--no-baseline", "--html", tmp_path / "r.html")
    assert rc == EXIT_OK, err  # a shift is amber, never a failure
    page = (tmp_path / "r.html").read_text()
    assert "<h2 id='trend'>Trend over 4 run(s)</h2>" in page
    if planted:
        assert "data-trend='1'" in page and "data-state='amber'" in page
        assert f"{TOY}/never_converges" in page.split("data-state='amber'")[1].split("</div>")[0]
    else:
        assert "data-trend='0'" in page and "data-state='green'" in page


def test_the_nightly_script_runs_end_to_end_twice(tmp_path):
    """scripts/nightly on a subset (the CPU profile takes minutes): run, history add, report with the
    baseline and the trend, exit with the report's code; the second night sees two runs."""
    import os
    import subprocess
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NIGHTLY_DIR=str(tmp_path), HARNESS_HISTORY=str(tmp_path / "hist"), NIGHTLY_NO_ASV="1",
               NIGHTLY_CASES=f"{EXACT}", OMP_NUM_THREADS="1")
    for night in (1, 2):
        proc = subprocess.run([str(repo / "scripts" / "nightly"), "cpu"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "added (2 verdicts)" in proc.stdout and "(exit 0)" in proc.stdout
    page = (tmp_path / "reports" / "nightly-cpu.html").read_text()
    assert "<h2 id='trend'>Trend over 2 run(s)</h2>" in page and "Against the baseline: 2 unchanged" in page
    assert len(load(tmp_path / "hist").run_id.unique()) == 2
