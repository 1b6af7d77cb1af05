"""scripts/gpu-quick (harness.gpu_quick): the CPU dry run CI does, and each verdict path shown to work:
a rerun that differs in one last bit fails the determinism check, a failing check exits 1 with one
line, a budget that is spent skips the checks, the GPU-only paths answer for GPUs that are not here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness import gpu_quick as gq

REPO = Path(__file__).resolve().parent.parent
CHECK_NAMES = [name for name, _ in gq.CHECKS]


def _strict_json(path: Path) -> dict:
    def no_nan(token):
        raise ValueError(f"{path} holds {token}")
    return json.loads(path.read_text(), parse_constant=no_nan)


def _quick(tmp_path: Path, *, device: str = "cpu", budget_s: float = 60.0) -> gq.Quick:
    return gq.Quick(out=tmp_path, device=device, smoke=True, budget=gq.Budget(budget_s, time.perf_counter()),
                    command=["test"])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`python -m harness.gpu_quick OUT --device cpu --smoke` once, as CI runs it (about 17 s alone)."""
    out = tmp_path_factory.mktemp("gpu-quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.gpu_quick", str(out), "--device", "cpu", "--smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return out, proc, time.perf_counter() - t0


def test_the_cpu_dry_run_passes_every_check(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = _strict_json(out / gq.JSON_NAME)
    assert next(iter(doc)) == "machine" and doc["machine"]["torch"] == torch.__version__
    assert doc["status"] == "finished" and doc["smoke"] is True and doc["device"] == "cpu"
    assert [r["check"] for r in doc["checks"]] == CHECK_NAMES
    for row in doc["checks"]:
        assert row["status"] in gq.ROW_STATUSES and isinstance(row["seconds"], float) and row["message"], row
    rows = {r["check"]: r for r in doc["checks"]}
    # Everything runs on the CPU; only the DDP smoke run may skip, when CIFAR-10 is not at HARNESS_DATA.
    assert all(rows[c]["status"] == "ok" for c in ("exact", "determinism", "resnet18", "xdist")), rows
    assert rows["ddp"]["status"] in ("ok", "skipped"), rows["ddp"]
    if rows["ddp"]["status"] == "ok":
        assert rows["ddp"]["backend"] == "gloo" and rows["ddp"]["world_size"] == 2
    exact = rows["exact"]
    assert exact["cases"] == len(gq.exact_cases()) == exact["ok"] > 0 and exact["fail"] == exact["error"] == 0
    assert rows["determinism"]["differing"] == 0 and rows["determinism"]["max_abs_diff"] == 0.0
    assert rows["resnet18"]["conformance_images_per_s"] > 0 and rows["resnet18"]["throughput_images_per_s"] > 0
    assert [line.split()[1] for line in proc.stdout.splitlines() if not line.startswith(("  ", "gpu-quick"))] \
        == CHECK_NAMES  # one summary line per check


def test_the_dry_run_leaves_a_run_directory_and_the_html_report(dry_run):
    out, _, seconds = dry_run
    html = (out / gq.REPORT_NAME).read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    results = pd.read_csv(out / "exact" / "results.csv")
    meta = json.loads((out / "exact" / "metadata.json").read_text())
    assert set(results.case) == {c.id for c in gq.exact_cases()} == set(meta["cases"])
    assert meta["status"] == "finished" and meta["smoke"] is True
    assert seconds < 120, f"the CPU dry run took {seconds:.0f} s"


def _table(values) -> pd.DataFrame:
    return pd.DataFrame({"case": "c", "arm": "a", "seed": 0, "step": range(len(values)), "metric": "loss",
                         "value": values})


def test_compare_tables_is_bitwise():
    a = _table([1.0, 0.1, float("nan"), 0.0])
    assert gq.compare_tables(a, a.copy())["equal"]  # a NaN in the same place is the same value
    last_bit = a.copy()
    last_bit.loc[1, "value"] = np.nextafter(0.1, 1.0)
    diff = gq.compare_tables(a, last_bit)
    assert not diff["equal"] and diff["differing"] == 1 and 0 < diff["max_abs_diff"] < 1e-16
    signed_zero = a.copy()
    signed_zero.loc[3, "value"] = -0.0
    assert not gq.compare_tables(a, signed_zero)["equal"]
    assert not gq.compare_tables(a, a.iloc[::-1])["equal"]  # the same values in another order
    assert not gq.compare_tables(a, a.iloc[:3])["equal"]


def test_a_rerun_off_by_one_bit_fails_the_determinism_check(tmp_path, monkeypatch):
    runs = []
    real = gq.run_once

    def perturbed_second_run(case, env):
        table = real(case, env)
        if runs:
            table.loc[len(table) - 1, "value"] = np.nextafter(table.value.iloc[-1], np.inf)
        runs.append(case.id)
        return table

    assert gq.check_determinism(_quick(tmp_path))["status"] == "ok"
    monkeypatch.setattr(gq, "run_once", perturbed_second_run)
    row = gq.run_check("determinism", gq.check_determinism, _quick(tmp_path))
    assert row["status"] == "fail" and row["differing"] == 1, row
    assert row["max_abs_diff"] > 0 and "1 of" in row["message"]


def test_a_failing_check_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    def planted(q):
        raise RuntimeError("planted failure\nsecond line")
    monkeypatch.setattr(gq, "CHECKS", (("xdist", gq.check_xdist), ("planted", planted)))
    assert gq.main([str(tmp_path), "--device", "cpu", "--smoke"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "planted: raised RuntimeError: planted failure" in err
    doc = _strict_json(tmp_path / gq.JSON_NAME)
    assert [(r["check"], r["status"]) for r in doc["checks"]] == [("xdist", "ok"), ("planted", "fail")]


def test_a_spent_budget_skips_every_check(tmp_path):
    assert gq.main([str(tmp_path), "--device", "cpu", "--smoke", "--budget-s", "0"]) == 0
    doc = _strict_json(tmp_path / gq.JSON_NAME)
    assert [r["check"] for r in doc["checks"]] == CHECK_NAMES
    assert all(r["status"] == "skipped" and r["message"].startswith("over budget") for r in doc["checks"])


def test_the_json_holds_no_nan(tmp_path):
    gq.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), np.float64(2.5)]})
    assert _strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 2.5]}


@pytest.mark.parametrize("n_gpus", [1, 2, 3, 8])
def test_xdist_pinning_with_gpus(n_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(gq, "gpu_count", lambda: n_gpus)
    row = gq.check_xdist(_quick(tmp_path))
    assert row["status"] == "ok", row
    assert row["workers"] == {f"gw{i}": str(i) for i in range(n_gpus)}


def test_ddp_needs_two_gpus_on_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(gq, "gpu_count", lambda: 1)
    row = gq.check_ddp(_quick(tmp_path, device="cuda"))
    assert row == {"status": "skipped", "message": "needs 2+ GPUs (1 here)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_device_cuda_without_cuda_is_bad_input(tmp_path, capsys):
    assert gq.main([str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / gq.JSON_NAME).exists()
