"""The command line (`python -m harness list | run | report`) and what a run leaves on disk:
exit codes, one-line reasons, the tidy CSVs, metadata, interrupt safety, the HTML report.

Runs the CLI in-process (`harness.cli.main`) on the fast float64 CPU cases; one subprocess test
proves the `python -m harness` entry point. Every output goes under tmp_path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import registry, session, store
from harness.checks import VERDICT_COLUMNS
from harness.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, main
from harness.runner import RESULT_COLUMNS, RunEnv
from harness.schedules import Constant

REPO = Path(__file__).resolve().parent.parent
FAST = "wdexp-thm2.1-mlp-bn"
ZEROBUF = "wdexp-zerobuf-mlp-bn"
NEG = "wdexp-neg-decoupled-wd"
GPU_CASE = "wdexp-gpu-resnet18-cifar10"
EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); an argparse exit counts as its exit code."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse rejects values by exiting
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_reason(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "a non-zero exit must say why on stderr"
    return lines[-1]


def read_run(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return store.RunDir(path).read()


def diverging(case_id: str = ZEROBUF, new_id: str = "test-diverge", **kw):
    """A registered case with a 1e30 constant LR in every group of both arms (never registered)."""
    base = registry.get(case_id)
    big = Constant(1e30)
    arms = tuple(dataclasses.replace(a, si=dataclasses.replace(a.si, lr=big),
                                     other=a.other and dataclasses.replace(a.other, lr=big))
                 for a in base.arms)
    return dataclasses.replace(base, id=new_id, arms=arms, **kw)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """One real run of a positive case and a negative control (shared: it is read, never written)."""
    out = tmp_path_factory.mktemp("run") / "good"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["run", FAST, NEG, "--seeds", "0", "--out", str(out)])
    return rc, out, stdout.getvalue(), stderr.getvalue()


# ---- list ---------------------------------------------------------------------------------------

def test_list_one_case_a_line_tab_separated(capsys):
    rc, out, err = run_cli(capsys, "list")
    assert rc == EXIT_OK and err == ""
    lines = out.splitlines()
    cases = registry.all_cases()
    assert len(lines) == len(cases)
    listed = {}
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == 4, line
        listed[fields[0]] = fields
    assert set(listed) == set(cases)
    for case_id, (_, claim, profile, markers) in listed.items():
        case = cases[case_id]
        assert (claim, profile) == (case.claim, case.profile)
        assert markers.split(",") == list(case.markers)
        assert profile in markers.split(",")
        assert ("negative" in markers.split(",")) == case.negative
    assert "negative" in listed[NEG][3].split(",")
    assert "negative" not in listed[FAST][3].split(",")
    assert listed[GPU_CASE][2] == "gpu"


def test_list_profile_gpu_lists_only_gpu_cases(capsys):
    rc, out, _ = run_cli(capsys, "list", "--profile", "gpu")
    assert rc == EXIT_OK
    rows = [line.split("\t") for line in out.splitlines()]
    expected = {c.id for c in registry.all_cases().values() if c.profile == "gpu"}
    assert rows and {r[0] for r in rows} == expected
    assert all(r[2] == "gpu" for r in rows)
    assert GPU_CASE in expected and FAST not in {r[0] for r in rows}


def test_module_entry_point_lists_cases(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "harness", "list", "--profile", "cpu"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert FAST in ids and NEG in ids and GPU_CASE not in ids
    assert all(len(line.split("\t")) == 4 for line in proc.stdout.splitlines())


# ---- run: outputs and exit 0 -----------------------------------------------------------------

def test_run_exit_0_with_negative_control_and_tidy_outputs(good_run):
    rc, out, stdout, stderr = good_run
    assert rc == EXIT_OK, stderr
    assert re.search(rf"^OK\s+{re.escape(FAST)}\b", stdout, re.M)
    assert re.search(rf"^OK \(negative control\)\s+{re.escape(NEG)}\b", stdout, re.M)
    assert "2 cases: 2 ok" in stdout

    results, verdicts, meta = read_run(out)
    assert list(results.columns) == RESULT_COLUMNS == ["case", "arm", "seed", "step", "metric", "value"]
    assert set(results.case) == {FAST, NEG}
    assert set(results.seed) == {0}
    assert set(results.arm) >= {"wd", "exp"}
    assert pd.api.types.is_numeric_dtype(results.value) and results.step.min() >= 1

    for col in ("case", "property", "measured", "expected", "tolerance", "passed", "negative", "ok"):
        assert col in verdicts.columns
    assert list(verdicts.columns) == VERDICT_COLUMNS
    expected_rows = sum(len(registry.get(c).properties) for c in (FAST, NEG))
    assert len(verdicts) == expected_rows
    assert verdicts.ok.astype(bool).all()
    pos, neg = verdicts[verdicts.case == FAST], verdicts[verdicts.case == NEG]
    assert pos.passed.astype(bool).all() and not pos.negative.astype(bool).any()
    # The negative control is as intended because its property FAILS.
    assert not neg.passed.astype(bool).any() and neg.negative.astype(bool).all()
    assert (neg.measured > neg.tolerance).all()


def test_run_metadata_is_complete_and_has_no_hostname(good_run, monkeypatch, tmp_path):
    _, out, _, _ = good_run
    text = (out / "metadata.json").read_text()
    meta = json.loads(text)
    for key in ("git_commit", "versions", "device", "device_name", "dtype", "optimizer", "seeds",
                "command", "status", "cases"):
        assert key in meta, key
    assert meta["versions"]["torch"] == torch.__version__
    assert {"python", "numpy", "pandas"} <= set(meta["versions"])
    assert meta["optimizer"] == "torch.optim:SGD"
    assert meta["seeds"] == {FAST: [0], NEG: [0]}
    assert meta["status"] == "finished"
    assert {c: v["status"] for c, v in meta["cases"].items()} == {FAST: "ok", NEG: "ok"}
    assert isinstance(meta["command"], list) and meta["command"]
    assert meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", meta["git_commit"])

    keys = json.dumps(meta).lower()
    for bad in ('"hostname"', '"host"', '"node"', '"user"'):
        assert bad not in keys
    host = socket.gethostname()
    if len(host) >= 4 and host.lower() not in {"localhost", "ubuntu", "debian", "runner"}:
        assert host not in text
    # Whatever the real host is called: metadata must never ask for it.
    sentinel = "hostname-sentinel-7f3a9c"
    monkeypatch.setattr(socket, "gethostname", lambda: sentinel)
    monkeypatch.setattr(platform, "node", lambda: sentinel)
    meta2 = store.metadata(profile="cpu", device="cpu", dtype=None, optimizer="torch.optim:SGD",
                           seeds={FAST: [0]}, smoke=False, command=["x"])
    assert sentinel not in json.dumps(meta2, default=str)


# ---- run: exit 1 ---------------------------------------------------------------------------------

def test_run_exit_1_when_a_verdict_fails(capsys, tmp_path):
    out = tmp_path / "sgdw"
    # Momentum 0.9 + decoupled WD inside the optimizer breaks the WD == exp-LR equivalence.
    rc, stdout, err = run_cli(capsys, "run", ZEROBUF, "--optimizer", "harness.optim:SGDW", "--seeds", "0",
                              "--out", out)
    assert rc == EXIT_FAIL
    assert one_line_reason(err).startswith(f"1 case(s) with verdicts not as intended ({ZEROBUF}")
    assert re.search(rf"^FAIL\s+{re.escape(ZEROBUF)}\b", stdout, re.M)
    _, verdicts, meta = read_run(out)
    assert len(verdicts) == len(registry.get(ZEROBUF).properties)
    assert not verdicts.ok.astype(bool).all()
    assert (verdicts.ok.astype(bool) == verdicts.passed.astype(bool)).all()  # not a negative control
    assert meta["optimizer"] == "harness.optim:SGDW"
    assert meta["cases"][ZEROBUF]["status"] == "fail" and meta["status"] == "finished"


# ---- exit 2: bad input, one line on stderr --------------------------------------------------------

@pytest.mark.parametrize("argv, pattern", [
    (["run", "wdexp-thm2.1-mlp-bm"], r"^error: unknown case 'wdexp-thm2\.1-mlp-bm'; did you mean .*wdexp-thm2\.1-mlp-bn"),
    (["run", "no-such-thing-at-all"], r"^error: unknown case 'no-such-thing-at-all'.*python -m harness list"),
    (["run", FAST, "--optimizer", "torch.optim.SGD"], r"^error: --optimizer must look like 'pkg\.module:Name'"),
    (["run", FAST, "--optimizer", "no_such_module_xyz:SGD"], r"^error: --optimizer .*cannot import module 'no_such_module_xyz'"),
    (["run", FAST, "--optimizer", "torch.optim:NoSuchSGD"], r"^error: --optimizer .*has no 'NoSuchSGD'"),
    (["run"], r"^error: name cases to run, or pass --profile"),
], ids=["close-match", "no-match", "optimizer-no-colon", "optimizer-no-module", "optimizer-no-attr",
        "nothing-to-run"])
def test_run_bad_input_exit_2(capsys, tmp_path, argv, pattern):
    out = tmp_path / "never"
    rc, stdout, err = run_cli(capsys, *argv, "--out", out)
    assert rc == EXIT_BAD_INPUT
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert re.search(pattern, one_line_reason(err)), err
    assert "Traceback" not in err
    assert not out.exists(), "bad input must be rejected before a run directory is created"


@pytest.mark.parametrize("argv, pattern", [
    (["--seeds", "a,b"], r"--seeds takes comma-separated integers"),
    (["--seeds", "0,,1"], r"--seeds takes comma-separated integers"),
    (["--seeds", "-1"], r"--seeds must be non-negative"),
    (["--device", "gpu"], r"--device 'gpu' is not a torch device"),
    (["--device", "cuda:x"], r"--device 'cuda:x' is not a torch device"),
], ids=["seeds-letters", "seeds-empty-item", "seeds-negative", "device-gpu", "device-bad-index"])
def test_run_bad_value_exit_2(capsys, tmp_path, argv, pattern):
    out = tmp_path / "never"
    rc, stdout, err = run_cli(capsys, "run", FAST, *argv, "--out", out)
    assert rc == EXIT_BAD_INPUT
    reason = one_line_reason(err)
    assert len(err.strip().splitlines()) == 1, err  # usage errors are one line too
    assert reason.startswith("error:"), err
    assert re.search(pattern, reason), err
    assert not out.exists()


def test_report_on_a_folder_that_is_not_a_run_dir_exit_2(capsys, tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "results.csv").write_text("case,arm,seed,step,metric,value\n")
    rc, stdout, err = run_cli(capsys, "report", folder)
    assert rc == EXIT_BAD_INPUT
    reason = one_line_reason(err)
    assert len(err.strip().splitlines()) == 1
    assert "is not a run directory" in reason and "verdicts.csv" in reason and "metadata.json" in reason
    assert not (folder / "report.html").exists()


# ---- divergence -------------------------------------------------------------------------------

def test_diverging_case_is_an_error_naming_arm_and_step():
    case = diverging()
    outcome = session.execute(case, RunEnv(seeds=(0,)))
    assert outcome.status == "error"
    m = re.search(r"arm '(\w+)' diverged at step (\d+)", outcome.message)
    assert m, outcome.message
    assert m.group(1) in {a.name for a in case.arms} and int(m.group(2)) >= 1
    assert case.id in outcome.message and "seed 0" in outcome.message
    assert len(outcome.verdicts) == len(case.properties)
    assert list(outcome.verdicts.columns) == VERDICT_COLUMNS
    assert not outcome.verdicts.ok.astype(bool).any()
    assert not outcome.verdicts.passed.astype(bool).any()
    assert outcome.verdicts.measured.isna().all()
    # Rows up to the divergence are kept, and all are from before the diverging step.
    assert not outcome.results.empty and list(outcome.results.columns) == RESULT_COLUMNS
    assert outcome.results.step.max() < int(m.group(2))


def test_diverging_negative_control_is_not_as_intended():
    """A negative control passes when its property fails -- but never by diverging."""
    case = diverging(NEG, new_id="test-diverge-neg")
    assert case.negative
    outcome = session.execute(case, RunEnv(seeds=(0,)))
    assert outcome.status == "error"
    assert not outcome.verdicts.ok.astype(bool).any()


def test_diverging_case_through_the_cli_exits_1(capsys, tmp_path, monkeypatch):
    case = diverging()
    cases = {**registry.all_cases(), case.id: case}
    monkeypatch.setattr(registry, "all_cases", lambda: cases)
    out = tmp_path / "div"
    rc, stdout, err = run_cli(capsys, "run", case.id, "--seeds", "0", "--out", out)
    assert rc == EXIT_FAIL
    assert re.search(rf"^ERROR\s+{case.id}\b.*diverged at step \d+", stdout, re.M)
    _, verdicts, meta = read_run(out)
    assert meta["cases"][case.id]["status"] == "error"
    assert "diverged" in meta["cases"][case.id]["message"]
    assert len(verdicts) == len(case.properties) and not verdicts.ok.astype(bool).any()
    assert case.id not in registry.collect()  # never registered globally


# ---- interrupt safety ------------------------------------------------------------------------------

def test_interrupt_keeps_finished_cases(capsys, tmp_path, monkeypatch):
    real_execute = session.execute
    calls = []

    def execute(case, env, **kw):
        calls.append(case.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_execute(case, env, **kw)

    # cmd_run does `from harness.session import execute` at call time: patch the module attribute.
    monkeypatch.setattr(session, "execute", execute)
    out = tmp_path / "interrupted"
    rc, stdout, err = run_cli(capsys, "run", ZEROBUF, FAST, NEG, "--seeds", "0", "--out", out)
    assert rc == EXIT_INTERRUPTED
    assert calls == [ZEROBUF, FAST]
    assert "interrupted" in one_line_reason(err) and str(out) in err
    results, verdicts, meta = read_run(out)
    assert set(results.case) == {ZEROBUF} and len(results) > 0
    assert set(verdicts.case) == {ZEROBUF} and len(verdicts) == len(registry.get(ZEROBUF).properties)
    assert meta["status"] == "interrupted"
    assert set(meta["cases"]) == {ZEROBUF} and meta["cases"][ZEROBUF]["status"] == "ok"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_keeps_previous_file_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "metadata.json"
    store.atomic_write_text(target, "old contents\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(store.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        store.atomic_write_text(target, "new contents\n")
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]


def test_atomic_write_keeps_previous_file_when_writing_fails_midway(tmp_path):
    target = tmp_path / "results.csv"
    store.atomic_write_text(target, "case,arm\nA,wd\n")
    with pytest.raises(UnicodeEncodeError):
        store.atomic_write_text(target, "case,arm\n" + "x" * 100_000 + "\ud800")  # unencodable
    assert target.read_text() == "case,arm\nA,wd\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_atomic_write_replaces_and_is_readable_by_others(tmp_path):
    target = tmp_path / "sub" / "verdicts.csv"
    store.atomic_write_text(target, "one\n")
    store.atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["verdicts.csv"]


# ---- report ---------------------------------------------------------------------------------------

def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"<script", page, re.I)
    for src in re.findall(r"""src\s*=\s*["']([^"']*)""", page):
        assert src.startswith("data:"), src


def test_report_html_is_self_contained_with_a_row_per_verdict(good_run, capsys, tmp_path):
    _, run_dir, _, _ = good_run
    html_out = tmp_path / "nested" / "report.html"
    rc, stdout, err = run_cli(capsys, "report", run_dir, "--html", html_out)
    assert rc == EXIT_OK, err
    assert str(html_out) in stdout
    page = html_out.read_text(encoding="utf-8")
    assert_self_contained(page)
    _, verdicts, _ = read_run(run_dir)
    ok_rows, bad_rows = page.count("<tr class='ok'"), page.count("<tr class='bad'")
    assert ok_rows + bad_rows == len(verdicts)
    assert ok_rows == int(verdicts.ok.astype(bool).sum())
    assert page.count('src="data:image/png;base64,') >= 2  # at least one plot per case
    for case_id in (FAST, NEG):
        assert case_id in page
    assert not (run_dir / "report.html").exists()  # --html was honoured


def test_run_with_html_writes_the_report(capsys, tmp_path):
    out, html_out = tmp_path / "run", tmp_path / "r.html"
    rc, stdout, err = run_cli(capsys, "run", ZEROBUF, "--seeds", "0", "--out", out, "--html", html_out)
    assert rc == EXIT_OK, err
    page = html_out.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert page.count("<tr class='ok'") == len(registry.get(ZEROBUF).properties)
    assert "<tr class='bad'" not in page


def test_report_escapes_text_from_metadata_and_cases(capsys, tmp_path):
    run_dir = store.RunDir(tmp_path / "evil")
    evil_case = f"case-{EVIL}"
    results = pd.DataFrame(
        [(evil_case, f"arm{EVIL}", 0, step, "train_gap", 10.0 ** -step) for step in (1, 2, 3)]
        + [("plain-case", "wd", 0, step, "loss", 1.0 / step) for step in (1, 2, 3)],
        columns=RESULT_COLUMNS)
    verdicts = pd.DataFrame([
        dict(case=evil_case, claim=f"claim {EVIL}", property=f"prop {EVIL}", measured=1e-12,
             expected=f"< 1e-9 {EVIL}", tolerance=1e-9, passed=True, negative=False, ok=True,
             source=f"source {EVIL}", detail=EVIL),
        dict(case="plain-case", claim="plain-claim", property="p", measured=float("nan"),
             expected="< 1", tolerance=1.0, passed=False, negative=False, ok=False, source="s", detail=""),
    ], columns=VERDICT_COLUMNS)
    run_dir.write_results(results)
    run_dir.write_verdicts(verdicts)
    run_dir.write_metadata({"optimizer": f"evil.module:{EVIL}", "status": "finished", "profile": EVIL,
                            "command": ["python", EVIL], "versions": {"torch": EVIL},
                            "cases": {evil_case: {"status": "ok", "seconds": 1.5, "message": EVIL}}})
    html_out = tmp_path / "evil.html"
    rc, _, err = run_cli(capsys, "report", run_dir.path, "--html", html_out)
    assert rc == EXIT_OK, err
    page = html_out.read_text(encoding="utf-8")
    assert EVIL not in page
    assert "<script" not in page.lower()
    assert f"evil.module:{EVIL_ESCAPED}" in page
    assert f"case-{EVIL_ESCAPED}" in page and f"source {EVIL_ESCAPED}" in page
    assert f"claim {EVIL_ESCAPED}" in page
    assert page.count("<tr class='ok'") == 1 and page.count("<tr class='bad'") == 1
    assert_self_contained(page)


# ---- smoke, gpu without CUDA ---------------------------------------------------------------------

def test_smoke_run_gives_results_and_no_verdicts(capsys, tmp_path):
    out = tmp_path / "smoke"
    rc, stdout, err = run_cli(capsys, "run", ZEROBUF, "--smoke", "--out", out)
    assert rc == EXIT_OK, err
    assert re.search(rf"^SMOKE\s+{re.escape(ZEROBUF)}\b", stdout, re.M)
    results, verdicts, meta = read_run(out)
    case = registry.get(ZEROBUF)
    assert set(results.arm) == {a.name for a in case.arms}
    assert results.step.max() == case.smoke_steps
    assert results.value.notna().all()
    assert verdicts.empty and list(verdicts.columns) == VERDICT_COLUMNS
    assert meta["smoke"] is True and meta["cases"][ZEROBUF]["status"] == "smoke"
    assert meta["seeds"] == {ZEROBUF: [case.seeds[0]]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_case_without_cuda_is_skipped_not_failed(capsys, tmp_path):
    out = tmp_path / "gpu"
    rc, stdout, err = run_cli(capsys, "run", GPU_CASE, "--out", out)
    assert rc == EXIT_OK, err
    assert re.search(rf"^SKIPPED\s+{re.escape(GPU_CASE)}\b.*requires CUDA", stdout, re.M)
    assert "1 skipped" in stdout
    results, verdicts, meta = read_run(out)
    assert results.empty and verdicts.empty
    assert meta["cases"][GPU_CASE] == {"status": "skipped", "seconds": meta["cases"][GPU_CASE]["seconds"],
                                       "message": "requires CUDA"}
    assert meta["status"] == "finished"


# ---- regressions found in review ------------------------------------------------------------------

def test_case_seconds_from_metadata_are_escaped():
    import pandas as pd
    from harness import report
    verdicts = pd.DataFrame([dict(case="c", claim="k", property="p", measured=1.0, expected="<1",
                                  tolerance=1.0, passed=True, negative=False, ok=True, source="s", detail="")])
    results = pd.DataFrame([dict(case="c", arm="a", seed=0, step=1, metric="loss", value=1.0)])
    page = report.render(results, verdicts, {"cases": {"c": {"seconds": "<script>x</script>"}}})
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_reading_a_missing_run_dir_creates_nothing(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "report", tmp_path / "typo")
    assert rc == EXIT_BAD_INPUT and not (tmp_path / "typo").exists()


def test_metadata_records_the_cli_arguments_and_a_case_profile_mismatch_is_bad_input(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, _ = run_cli(capsys, "run", FAST, FAST, "--seeds", "0", "--out", out)
    meta = json.loads((out / "metadata.json").read_text())
    assert rc == 0 and meta["command"][:4] == ["python", "-m", "harness", "run"]
    assert list(meta["cases"]) == [FAST] and meta["device"] == "cpu"
    rc, _, err = run_cli(capsys, "run", FAST, "--profile", "gpu", "--out", tmp_path / "x")
    assert rc == EXIT_BAD_INPUT and "another profile" in err
