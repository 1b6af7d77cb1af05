"""`harness run -j N`: cases in worker processes. The tables are those of a sequential run, byte for
byte; a worker that dies ends only its case; SIGTERM stops the workers and keeps every finished
case, and the run resumes. Real processes and real signals: the epoch case's worker stops itself
after a checkpoint (HARNESS_STOP_AFTER_CHECKPOINT sends it SIGSTOP), so nothing depends on timing."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from cli_process import DATA_ROOT, SMOKE, children, start, stopped_child
from harness.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, EXIT_TERMINATED, main
from harness.parallel import JOBS_ENV, default_jobs

FAST = ["wdexp-zerobuf-mlp-bn", "wdexp-neg-decoupled-wd", "wdexp-zerobuf-cnn-bn[ln,float64,foreach]",
        "toy-bn-wd-never-converges"]
EPOCH_CASE = "batch-cifar-increase-batch"


def test_parallel_tables_are_byte_for_byte_those_of_a_sequential_run(tmp_path, capsys):
    assert main(["run", *FAST, "-j", "1", "--out", str(tmp_path / "seq")]) == EXIT_OK
    assert main(["run", *FAST, "-j", "2", "--out", str(tmp_path / "par")]) == EXIT_OK
    for name in ("results.csv", "verdicts.csv"):
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "par" / name).read_bytes(), name
    seq, par = (json.loads((tmp_path / d / "metadata.json").read_text()) for d in ("seq", "par"))
    assert list(seq["cases"]) == list(par["cases"]) and set(par["cases"]) == set(FAST)
    assert [c["status"] for c in par["cases"].values()] == [c["status"] for c in seq["cases"].values()]


def test_jobs_default_and_bad_values(monkeypatch, capsys):
    monkeypatch.setenv(JOBS_ENV, "3")
    assert default_jobs() == 3
    monkeypatch.delenv(JOBS_ENV)
    assert default_jobs() == len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit) as exc:
        main(["run", FAST[0], "-j", "0"])
    assert exc.value.code == EXIT_BAD_INPUT and "-j takes a positive number" in capsys.readouterr().err


@pytest.fixture
def cifar():
    if DATA_ROOT is None:
        msg = "CIFAR-10 (cifar10-jpeg.tar.gz) not found: set HARNESS_DATA"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


def _wait_for_case(out, case_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = json.loads((out / "metadata.json").read_text()) if (out / "metadata.json").exists() else {}
        if case_id in meta.get("cases", {}):
            return
        time.sleep(0.2)
    raise AssertionError(f"{case_id} did not finish within {timeout} s")


def test_a_worker_that_dies_ends_its_case_only(cifar, tmp_path):
    out = tmp_path / "run"
    proc = start("run", FAST[0], EPOCH_CASE, *SMOKE, "-j", "2", "--out", out, stop_after=1)
    stopped = stopped_child(proc.pid)
    _wait_for_case(out, FAST[0])  # the fast case's worker finishes on its own: the epoch case runs alone
    os.kill(stopped, signal.SIGKILL)  # what the OOM killer does
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_FAIL, err
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta["cases"]) == [FAST[0], EPOCH_CASE]
    assert meta["cases"][EPOCH_CASE]["status"] == "error"
    assert "worker process died" in meta["cases"][EPOCH_CASE]["message"]
    assert meta["cases"][FAST[0]]["status"] == "smoke" and meta["status"] == "finished"
    assert "1 case(s) ended in error" in err


def test_a_worker_that_dies_beside_another_case_is_found_by_running_each_alone(tmp_path, monkeypatch, capsys):
    """The plug-in SIGKILLs the worker of the CNN case while the MLP case's worker waits in its 3rd
    step: the pool breaks with both running. Each runs again alone; only the CNN case, which dies
    again, ends in error."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "plugins"))  # spawned workers get sys.path
    monkeypatch.setenv("BUGGY_KILL_MARKER", str(tmp_path / "a-worker-was-killed"))
    cnn, mlp, out = "wdexp-zerobuf-cnn-bn", "wdexp-thm2.1-mlp-bn", tmp_path / "run"
    rc = main(["run", cnn, mlp, "--seeds", "0", "--optimizer", "buggy_optimizers:KillsItsWorkerOnConvNets",
               "-j", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == EXIT_FAIL, err
    assert "a worker process died while 2 cases ran" in err and "each runs again alone" in err, err
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta["cases"]) == [cnn, mlp] and meta["status"] == "finished"
    assert meta["cases"][cnn]["status"] == "error"
    assert "a worker process died while it ran alone" in meta["cases"][cnn]["message"]
    assert meta["cases"][mlp]["status"] == "ok", meta["cases"][mlp]
    assert set(pd.read_csv(out / "results.csv").case) == {mlp}


def test_sigterm_stops_the_workers_keeps_finished_cases_and_resumes(cifar, tmp_path):
    out = tmp_path / "run"
    proc = start("run", FAST[0], EPOCH_CASE, *SMOKE, "-j", "2", "--out", out, stop_after=1)
    stopped_child(proc.pid)
    _wait_for_case(out, FAST[0])  # the fast case's worker finishes on its own
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, err
    assert "finish the run with `python -m harness run --resume" in err
    assert children(proc.pid) == []  # no worker left behind, stopped or not
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "terminated" and list(meta["cases"]) == [FAST[0]]
    assert set(pd.read_csv(out / "results.csv").case) == {FAST[0]}
    resumed = start("run", "--resume", out)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == EXIT_OK, err
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta["cases"]) == [FAST[0], EPOCH_CASE] and meta["status"] == "finished"


def test_plan_chains_the_cases_that_share_an_arm_and_starts_the_largest_work_first():
    from harness.parallel import plan
    from harness.runner import RunEnv
    ids = ["toy-bn-alone-converges", "wdexp-zerobuf-mlp-bn", "toy-neg-bn-alone-judged-never-converges",
           "ilr-equal-lambda-e-same-equilibrium"]
    chains = plan(ids, RunEnv())
    # the control reuses the positive case's arm: after it, on the same worker, never waiting on its lock
    assert ["toy-bn-alone-converges", "toy-neg-bn-alone-judged-never-converges"] in chains
    assert chains[0] == ["ilr-equal-lambda-e-same-equilibrium"]  # 45,000 arm-steps, the most
    assert sorted(c for chain in chains for c in chain) == sorted(ids)
