"""Resumable runs and progress: a run killed mid-case (a real process, a real signal) resumes with
`run --resume RUN_DIR` from the last epoch checkpoint, and its rows are bitwise those of an
uninterrupted run; SIGTERM exits 143 with every finished case on disk. Progress goes to stderr only:
tqdm's live line on a terminal, at most one plain line every 30 s off one.

The epoch-unit case is a real registered one (the increasing-batch CIFAR case) in its smoke form:
3 epochs on 80 images. The process stops itself after its n-th checkpoint (the testing hook
HARNESS_STOP_AFTER_CHECKPOINT sends it SIGSTOP), so the kill lands at a known epoch, not by timing.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cli_process import DATA_ROOT, REPO, start
from harness import progress
from harness.batch_schedules import BatchSize
from harness.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_TERMINATED, main
from harness.runner import RunEnv, run_case
from harness.schedules import Constant
from harness.spec import Arm, Case, Group, validate
from harness.checks import updates_follow_schedule

EPOCH_CASE = "batch-cifar-increase-batch"
FAST = "wdexp-thm2.1-mlp-bn"
RUN = ["--smoke", "--seeds", "0", *(["--data", DATA_ROOT] if DATA_ROOT else [])]


@pytest.fixture(autouse=True)
def _needs_cifar(request):
    if DATA_ROOT is None and "uninterrupted" in request.fixturenames:
        msg = "CIFAR-10 (cifar10-jpeg.tar.gz) not found: set HARNESS_DATA"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


def wait_stopped(proc: subprocess.Popen) -> None:
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the run ended (status {status}) before its checkpoint stop"


def rows(run_dir: Path, case: str) -> pd.DataFrame:
    res = pd.read_csv(run_dir / "results.csv")
    return res[res.case == case].reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = start("run", EPOCH_CASE, *RUN, "--out", out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_OK, err
    return out


def test_killed_mid_case_resumes_from_its_epoch_bitwise(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start("run", FAST, EPOCH_CASE, *RUN, "--out", out, stop_after=1)  # stops after epoch 1 of 3
    wait_stopped(proc)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: what a crash or an OOM kill does
    proc.communicate()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "running" and list(meta["cases"]) == [FAST]  # what the kill left
    assert len(list((out / "checkpoints").glob("*.pt"))) == 1 and not list((out / "checkpoints").glob("*.tmp"))

    resumed = subprocess.run([sys.executable, "-m", "harness", "run", "--resume", str(out)], cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert "1 of 2 cases finished before" in resumed.stderr
    assert f"{EPOCH_CASE}: resuming seed 0 at epoch 1 of 3" in resumed.stderr
    assert FAST not in resumed.stdout.split("2 cases:")[0]  # the finished case did not run again
    got, want = rows(out, EPOCH_CASE), rows(uninterrupted, EPOCH_CASE)
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)  # every row, bitwise
    assert not rows(out, FAST).empty
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "finished" and set(meta["cases"]) == {FAST, EPOCH_CASE} and meta["resumed"]
    assert not (out / "checkpoints").exists()  # removed once the case finished


def test_sigterm_exits_143_keeps_finished_cases_and_resumes(uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = start("run", FAST, EPOCH_CASE, *RUN, "--out", out, stop_after=2)  # after epoch 2 of 3
    wait_stopped(proc)
    proc.send_signal(signal.SIGTERM)  # what a batch scheduler sends; delivered once it runs again
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_TERMINATED
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM): 1 finished cases are in")
    assert f"run --resume {out}" in lines[0]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "terminated" and list(meta["cases"]) == [FAST]
    assert set(pd.read_csv(out / "results.csv").case) == {FAST}
    assert main(["run", "--resume", str(out)]) == EXIT_OK
    pd.testing.assert_frame_equal(rows(out, EPOCH_CASE), rows(uninterrupted, EPOCH_CASE), check_exact=True)


def test_resume_takes_the_run_directory_alone(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "not a run directory" in capsys.readouterr().err
    assert main(["run", FAST, "--resume", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "takes the run directory alone" in capsys.readouterr().err


# ---- in-process: every seed boundary and epoch, stateful observers, activation noise ---------------

def _noisy_epoch_case() -> Case:
    """Two seeds, batch-size schedules, activation noise (its own generator) and the update-norm
    observer (memory between calls): everything a resumed seed must restore."""
    g = Group(Constant(0.05), 1e-4, 0.9)
    noisy = dataclasses.replace(Arm("small", g, g, batch_size=BatchSize((0, 2), (16, 32))), act_noise=Constant(0.3))
    return validate(Case(
        id="resume-epoch-unit", claim="test", profile="cpu", unit="epoch", seeds=(0, 1), steps=4,
        model=("norm_cnn", {"widths": (4,), "classes": 5, "act_noise": True, "eps": 1e-5}),
        data=("gaussian_mixture", {"n": 96, "shape": (3, 4, 4), "batch_size": 16}),
        arms=(noisy, Arm("large", g, g, batch_size=BatchSize((0,), (48,)))),
        measurements=("epoch_loss", "schedule", "update_norm", "si_norm"), reference_arm="small",
        properties=(updates_follow_schedule("large", 96, source="exact"),)))


class _Kill(Exception):
    pass


def _killing_progress(after_units: int):
    """A progress reporter that interrupts the run after `after_units` arm-epochs."""
    class Killer(progress.NullProgress):
        def __init__(self, total, unit, initial):
            self.done = initial

        def advance(self, n=1):
            self.done += n
            if self.done == after_units:
                raise _Kill()
    return Killer


@pytest.mark.parametrize("after_units", [2, 4, 6, 8, 10])  # 8 units a seed: mid seed 0 … mid seed 1
def test_resume_at_any_epoch_end_is_bitwise(after_units, tmp_path):
    case, env = _noisy_epoch_case(), RunEnv()
    want = run_case(case, env)
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(_Kill):
        run_case(case, env, make_progress=_killing_progress(after_units), checkpoint_dir=ckpt)
    seen = []
    got = run_case(case, env, checkpoint_dir=ckpt,
                   make_progress=lambda total, unit, initial: seen.append(initial) or progress.NULL)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    # The kill lands after an arm's epoch; the checkpoint before it is the last whole epoch.
    assert seen == [2 * ((after_units - 1) // 2)]


def test_a_checkpoint_for_other_settings_is_not_resumed_from(tmp_path, capsys):
    case = _noisy_epoch_case()
    with pytest.raises(_Kill):
        run_case(case, RunEnv(), make_progress=_killing_progress(4), checkpoint_dir=tmp_path)
    other = RunEnv(seeds=(0, 1), dtype="float32")  # float32 now: the saved state must not be reused
    got = run_case(case, other, checkpoint_dir=tmp_path)
    assert "written for other settings, case restarted" in capsys.readouterr().err
    pd.testing.assert_frame_equal(got, run_case(case, other), check_exact=True)


# ---- progress ----------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_at_most_every_30_s():
    clock, out = FakeClock(), io.StringIO()
    p = progress.PlainProgress("case-x", 3000, "arm-step", stream=out, clock=clock)
    for _ in range(100):  # 29 s of work: a case that ends sooner prints nothing
        clock.now += 0.29
        p.advance(10)
    assert out.getvalue() == ""
    clock.now = 30.0
    p.advance(200)
    clock.now = 45.0
    p.advance(10)  # 15 s after the last line: silent
    clock.now = 61.0
    p.advance(10)
    lines = out.getvalue().splitlines()
    assert lines == ["progress case-x: 1200/3000 arm-steps (40%), 40/s, ETA 45s",
                     "progress case-x: 1220/3000 arm-steps (41%), 20/s, ETA 1m29s"]


def test_terminal_progress_is_a_tqdm_line_on_stderr():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = progress.for_case("case-y", 40, "arm-epoch", initial=10, stream=tty)
    assert isinstance(p, progress.BarProgress)
    p.advance(20)
    p.close()
    text = tty.getvalue()
    assert "case-y" in text and "10/40" in text and "arm-epoch" in text and "\r" in text
    assert isinstance(progress.for_case("z", 1, "arm-step", stream=io.StringIO()), progress.PlainProgress)


def test_a_run_off_a_terminal_keeps_progress_out_of_stdout_and_tables(tmp_path, capsys):
    assert main(["run", FAST, "--seeds", "0", "--out", str(tmp_path / "r")]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "progress" not in out and "progress" not in err  # a case under 30 s prints no progress line
    assert set(pd.read_csv(tmp_path / "r" / "results.csv").columns) == {"case", "arm", "seed", "step", "metric", "value"}


def test_an_unusable_checkpoint_restarts_the_case(tmp_path, capsys):
    import torch
    case, env = _noisy_epoch_case(), RunEnv()
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(_Kill):
        run_case(case, env, make_progress=_killing_progress(6), checkpoint_dir=ckpt)
    (path,) = ckpt.glob("*.pt")
    saved = torch.load(path, weights_only=True)
    del saved["state"]["arms"]["large"]["model"]  # loads, but cannot be put back into the seed
    torch.save(saved, path)
    got = run_case(case, env, checkpoint_dir=ckpt)
    assert "checkpoint not usable (KeyError" in capsys.readouterr().err
    pd.testing.assert_frame_equal(got, run_case(case, env), check_exact=True)


def test_a_state_that_cannot_be_saved_turns_checkpointing_off_not_the_case(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "plugins"))
    case = _noisy_epoch_case()
    env = RunEnv(optimizer="buggy_optimizers:StateDictRaises")
    got = run_case(case, env, checkpoint_dir=tmp_path / "checkpoints")
    err = capsys.readouterr().err
    assert "checkpointing off for this case" in err and "raised RuntimeError in state_dict()" in err
    pd.testing.assert_frame_equal(got, run_case(case, RunEnv()), check_exact=True)
    assert not (tmp_path / "checkpoints").exists()


def test_a_fresh_run_ignores_checkpoints_left_in_its_directory(tmp_path, capsys):
    stale = tmp_path / "r" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "old.pt").write_bytes(b"not a checkpoint")
    assert main(["run", FAST, "--seeds", "0", "--out", str(tmp_path / "r")]) == EXIT_OK
    assert not stale.exists()
