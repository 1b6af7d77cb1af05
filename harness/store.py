"""Run directories: tidy CSV tables and a metadata JSON, each written atomically (temp file in the
same directory, then rename), so a crash or Ctrl-C leaves every earlier file whole and readable.
No pickle for our data (CSV and JSON here; epoch checkpoints are torch tensor files read back with
weights_only=True, harness.checkpoint).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False, float_format="%.17g"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: str) -> str:
    """A readable name per device of a comma-separated list (e.g. 'cpu,cuda')."""
    import torch

    def one(d: str) -> str:
        if d.startswith("cuda"):
            return torch.cuda.get_device_name(torch.device(d)) if torch.cuda.is_available() else f"{d} (not available)"
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return "; ".join(one(d) for d in device.split(","))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def metadata(*, profile: str | None, device: str, dtype: str | None, optimizer: str,
             seeds: dict[str, list[int]], smoke: bool, command: list[str]) -> dict:
    import numpy
    import torch
    return {
        "created": utc_now(),
        "git_commit": git_commit(),
        "profile": profile,
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype or "case default (cpu float64, gpu float32)",
        "optimizer": optimizer,
        "seeds": seeds,
        "smoke": smoke,
        "command": command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "numpy": numpy.__version__, "pandas": pd.__version__,
                     # the SIMD kernels torch picked (ATEN_CPU_CAPABILITY): part of the machine class
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }


class RunDir:
    """results.csv (tidy: case, arm, seed, step, metric, value), verdicts.csv, metadata.json."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # Writers create the directory (atomic_write_text makes parents); reading never does.
    def write_metadata(self, meta: dict) -> None:
        atomic_write_text(self.path / "metadata.json", json.dumps(meta, indent=2, default=str) + "\n")

    def write_results(self, df: pd.DataFrame) -> None:
        atomic_write_csv(self.path / "results.csv", df)

    def write_verdicts(self, df: pd.DataFrame) -> None:
        atomic_write_csv(self.path / "verdicts.csv", df)

    def read(self) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
        missing = [f for f in ("results.csv", "verdicts.csv", "metadata.json") if not (self.path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{self.path} is not a run directory: missing {', '.join(missing)} "
                                    f"(create one with `python -m harness run ... --out {self.path}`)")
        return (pd.read_csv(self.path / "results.csv"), pd.read_csv(self.path / "verdicts.csv"),
                json.loads((self.path / "metadata.json").read_text()))


def default_run_dir(profile: str | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return REPO / "runs" / f"{stamp}-{profile or 'selected'}"
