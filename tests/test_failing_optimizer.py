"""A failing system under test gives a report, not a traceback: the optimizer's exception ends its
case as an `error` (type and first line on the console and in verdicts.csv, the traceback in
RUN_DIR/errors/), the run goes on and exits 1; a plug-in that cannot be constructed with SGD's
keywords is one line and exit 2 before anything runs. The optimizers are tests/plugins/."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import EXIT_BAD_INPUT, EXIT_FAIL, main

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
FAST = "wdexp-thm2.1-mlp-bn"
ZEROBUF = "wdexp-zerobuf-mlp-bn"


def harness_cli(*argv, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line in its own process, with the test plug-ins importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "harness", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_optimizer_raising_in_step_errors_its_cases_and_the_run_goes_on(tmp_path):
    out = tmp_path / "crash"
    proc = harness_cli("run", FAST, ZEROBUF, "--seeds", "0", "--optimizer", "buggy_optimizers:CrashesInStep",
                       "--out", out)
    assert proc.returncode == EXIT_FAIL, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # Each case: one console line with the exception's type and first line, never its second line.
    for case in (FAST, ZEROBUF):
        assert re.search(rf"^ERROR\s+{re.escape(case)}\s.*raised ZeroDivisionError in step\(\): planted bug in step\(\)$",
                         proc.stdout, re.M), proc.stdout
    assert "second line" not in proc.stdout + proc.stderr
    assert "2 cases: 0 ok, 0 fail, 2 error, 0 skipped, 0 xfail;" in proc.stdout
    stderr = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(stderr) == 1 and "2 case(s) ended in error" in stderr[0] and "nothing judged" in stderr[0]
    assert "verdicts" not in stderr[0]  # nothing was judged: never "verdicts failed"
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert set(verdicts.case) == {FAST, ZEROBUF}
    assert (verdicts.expected == "(optimizer raised)").all() and not verdicts.ok.any()
    assert verdicts.detail.str.contains("ZeroDivisionError in step").all()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "finished"
    for case in (FAST, ZEROBUF):
        assert meta["cases"][case]["status"] == "error"
        trace = (out / meta["cases"][case]["traceback"]).read_text()  # one file per case, whole
        assert "Traceback (most recent call last)" in trace and "second line, never shown" in trace
        assert "buggy_optimizers.py" in trace
    assert len(list((out / "errors").iterdir())) == 2


def test_wrong_signature_is_one_line_exit_2_before_any_case(tmp_path):
    out = tmp_path / "never"
    proc = harness_cli("run", FAST, ZEROBUF, "--seeds", "0", "--optimizer", "buggy_optimizers:WrongSignature",
                       "--out", out)
    assert proc.returncode == EXIT_BAD_INPUT
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: optimizer buggy_optimizers:WrongSignature must accept (params, lr=, momentum=")
    assert proc.stdout == "" and not out.exists()  # detected once, before any case or file


def test_optimizer_writing_nan_is_a_divergence_error(tmp_path):
    out = tmp_path / "nan"
    proc = harness_cli("run", FAST, "--seeds", "0", "--optimizer", "buggy_optimizers:ReturnsNaN", "--out", out)
    assert proc.returncode == EXIT_FAIL
    assert re.search(rf"^ERROR\s+{FAST}\s.*arm '\w+' diverged at step 4 \(seed 0, loss nan\)", proc.stdout, re.M), proc.stdout
    assert "1 cases: 0 ok, 0 fail, 1 error, 0 skipped, 0 xfail;" in proc.stdout
    assert "Traceback" not in proc.stderr and "1 case(s) ended in error" in proc.stderr
    results = pd.read_csv(out / "results.csv")
    assert not results.empty and results.step.max() < 4  # the rows before the divergence are kept


@pytest.mark.parametrize("plugin, where", [
    ("CrashesInZeroGrad", "in zero_grad(): planted bug in zero_grad()"),
    ("CrashesInConstructorForSomeGroups", "NotImplementedError in the constructor: only one parameter group"),
])
def test_every_call_into_the_optimizer_is_guarded(plugin, where, plugins_importable, tmp_path, capsys):
    rc = main(["run", FAST, "--seeds", "0", "--optimizer", f"buggy_optimizers:{plugin}", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == EXIT_FAIL
    assert re.search(rf"^ERROR\s+{FAST}\s.*{re.escape(where)}", out, re.M), out
    assert "1 error" in out and "Traceback" not in err


def test_a_judged_failure_is_counted_as_fail_not_error(tmp_path, capsys):
    """A decoupled-WD optimizer runs cleanly and fails the exact case (judged), while the negative
    control still fails its property as intended (ok)."""
    rc = main(["run", ZEROBUF, "wdexp-neg-decoupled-wd", "--seeds", "0", "--optimizer", "harness.optim:SGDW",
               "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == EXIT_FAIL
    assert "2 cases: 1 ok, 1 fail, 0 error, 0 skipped, 0 xfail;" in out, out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"1 case(s) with verdicts not as intended ({ZEROBUF};")
