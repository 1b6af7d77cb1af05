"""The conformance matrix: every cell of every matrix case as a test (ids are cell ids), plus the
summary, the CLI and a known non-conformer going through the same matrix."""
import dataclasses

import pandas as pd
import pytest

from harness import matrix
from harness.cli import main
from harness.runner import RunEnv


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return
    plugged = metafunc.config.getoption("--optimizer")
    impls = (matrix.PLUGGED,) if plugged else tuple(matrix.IMPLEMENTATIONS)
    params = []
    for spec in matrix.cells(impls=impls, stacks=(metafunc.config.getoption("--stack") or "plain",)):
        try:
            matrix.resolve(*spec)
        except matrix.NotApplicable:
            continue  # e.g. instance norm on an MLP: listed as n/a in the summary, not a test
        # No xfail anywhere: every cell's rule was measured to hold under avx512, avx2 and default
        # kernels (harness.matrix), so a failing cell is a real non-conformance on any CPU.
        params.append(pytest.param(spec, id=matrix.cell_id(*spec), marks=[pytest.mark.cpu]))
    metafunc.parametrize("cell", params)


def test_cell(cell, run_env):
    row = matrix.run_cell(cell, run_env)
    if row["status"] == "skipped":
        pytest.skip(row["message"])
    assert row["status"] == "ok", row


def test_matrix_covers_every_switch():
    specs = matrix.cells()
    assert {s[1] for s in specs} == {"bn", "gn", "ln", "in"}
    assert {s[2] for s in specs} == {"float64", "float32"}
    assert {s[3] for s in specs} == {"forloop", "foreach", "fused"}
    assert len(matrix.bases()) >= 5


def test_decoupled_weight_decay_goes_through_the_same_matrix_and_fails():
    """A plugged-in optimizer gets the same cells; SGDW (decoupled WD) must not conform."""
    env = RunEnv(optimizer="harness.optim:SGDW")
    rows = [matrix.run_cell(("wdexp-zerobuf-cnn-bn", norm, dtype, matrix.PLUGGED), env)
            for norm in ("bn", "in") for dtype in ("float64", "float32")]
    table = pd.DataFrame(rows, columns=matrix.MATRIX_COLUMNS)
    assert (table.status == "fail").all(), table[["norm", "dtype", "status", "measured"]]
    assert "does NOT conform" in matrix.summarize(table)


def test_summary_marks_conforming_failing_and_not_applicable():
    table = pd.DataFrame([
        dict(case="a", norm="bn", dtype="float64", impl="foreach", status="ok", measured=1e-4),
        dict(case="a", norm="in", dtype="float64", impl="foreach", status="inapplicable", measured=float("nan")),
        dict(case="b", norm="bn", dtype="float64", impl="foreach", status="fail", measured=3e6),
    ], columns=matrix.MATRIX_COLUMNS)
    text = matrix.summarize(table)
    assert "| a | bn | ✓ 0.0001 |" in text and "| a | in | n/a |" in text and "| b | bn | ✗ 3e+06 |" in text
    assert "foreach, float64: does NOT conform in 1 cells (1/2 cells)" in text


def test_matrix_command_runs_a_slice_and_writes_table_and_summary(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["matrix", "wdexp-zerobuf-mlp-bn", "--norm", "bn,in", "--dtype", "float64",
               "--impl", "foreach", "--out", str(out)])
    table = pd.read_csv(out / "matrix.csv")
    assert rc == 0
    assert list(table.status) == ["ok", "inapplicable"]
    assert (out / "matrix.md").read_text().startswith("# Conformance matrix")


@pytest.mark.parametrize("argv", [["matrix", "--norm", "bn,xx"], ["matrix", "--impl", "cuda"],
                                  ["run", "wdexp-zerobuf-mlp-bn[in,float64,foreach]"],
                                  ["run", "wdexp-zerobuf-mlp-bn[bn,float16,foreach]"],
                                  ["run", "wdexp-zerobuf-mlp-bn[bn,float64,foreach]", "--optimizer",
                                   "harness.optim:SGDW"]])
def test_bad_matrix_input_exits_2(argv, tmp_path, capsys):
    try:
        rc = main([*argv, "--out", str(tmp_path / "x")])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_run_accepts_cell_ids(tmp_path, capsys):
    rc = main(["run", "wdexp-zerobuf-mlp-bn[ln,float32,fused]", "--out", str(tmp_path / "r")])
    verdicts = pd.read_csv(tmp_path / "r" / "verdicts.csv")
    assert rc == 0 and list(verdicts.case) == ["wdexp-zerobuf-mlp-bn[ln,float32,fused]"]
