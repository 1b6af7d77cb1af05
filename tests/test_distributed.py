"""harness.distributed: two CPU processes (gloo) under DDP reproduce the single-process run.

Design: the reference is the single-process run of the same case on the same global batches
(harness.runner.run_case, and harness.distributed.run without a process group, which equals it
bitwise). Two ranks each take half of every global batch. Exactness needs (1) equal shards and a
mean loss, so DDP's average of the shard gradients is the global gradient, and (2) batch statistics
over the global batch: the BN case uses GlobalBatchNorm (an all-reduce of the per-channel sums with
autograd, as SyncBatchNorm, which torch allows on CUDA only), and GhostBatchNorm2d is exact without
communication when each shard holds whole ghost batches. Then everything agrees to float64 roundoff
(measured ≤ 2e-15), and the bound is 1e-12 relative. The negative control keeps per-rank BN
statistics (`--bn local`): a different function, off by ~10% in the loss and ~50% in the weights.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness import distributed as D
from harness import registry
from harness.runner import RunEnv, run_case

REPO = Path(__file__).resolve().parent.parent
CASE = "wdexp-zerobuf-cnn-bn"  # NormCNN with BatchNorm (affine trained), batch 16 -> 8 per rank
STEPS = 20
TOL = 1e-12
KEYS = ["case", "arm", "seed", "step", "metric"]


def _case(steps=STEPS):
    return dataclasses.replace(registry.all_cases()[CASE], steps=steps, smoke_steps=2)


def _ghost_case():
    """PreResNet-8 with ghost batches of 4: each rank's 8 examples are 2 whole ghost batches."""
    return dataclasses.replace(_case(10), id="ddp-ghost-preresnet8", model=(
        "preresnet_cifar", {"depth": 8, "classes": 5, "eps": 1e-30, "ghost_batch": 4, "norm_affine": True}))


def _epoch_case():
    """Epoch unit: two arms walk the same epoch order in batches of their own size (16, then 32 from
    epoch 1; 8 throughout), with activation noise on one (ξ is one map shared by the batch, so every
    rank draws the single process's ξ; rank 0's train-mode measurement, train_gap, must not advance
    its noise generator) and ghost batches of 4 (each shard holds whole ones)."""
    from harness.batch_schedules import BatchSize
    from harness.checks import updates_follow_schedule
    from harness.schedules import Constant
    from harness.spec import Arm, Case, Group, validate
    g = Group(Constant(0.05), 5e-4, 0.9)
    arms = (Arm("grow", g, g, batch_size=BatchSize((0, 1), (16, 32)), act_noise=Constant(0.3)),
            Arm("fixed", g, g, batch_size=BatchSize((0,), (8,))))
    return validate(Case(
        id="ddp-epoch-unit", claim="test", profile="cpu", unit="epoch", steps=3, smoke_steps=1, seeds=(0,),
        model=("norm_cnn", {"in_ch": 3, "widths": (8, 16), "classes": 5, "eps": 1e-5, "ghost_batch": 4,
                            "act_noise": True}),
        data=("gaussian_mixture", {"n": 96, "shape": (3, 8, 8), "classes": 5, "batch_size": 16}),
        arms=arms, measurements=("epoch_loss", "schedule", "si_norm", "batch_gap", ("train_gap", {"every": 1})),
        reference_arm="fixed",
        properties=(updates_follow_schedule("grow", 96, source="exact"),)))


ENV = RunEnv(seeds=(0,))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def single(one_torch_thread):
    """The single-process reference runs."""
    return {"bn": D.run(_case(), env=ENV), "ghost": D.run(_ghost_case(), env=ENV),
            "epoch": D.run(_epoch_case(), env=ENV)}


def _compare_rows(ref: pd.DataFrame, got: pd.DataFrame) -> dict[str, float]:
    """Worst disagreement per metric: relative, except the function gaps (train_gap, batch_gap),
    themselves roundoff-level quantities (~1e-15) in both runs, which are compared absolutely."""
    merged = ref.merge(got, on=KEYS, suffixes=("_ref", "_got"), validate="one_to_one")
    assert len(merged) == len(ref) == len(got)
    diff = (merged.value_ref - merged.value_got).abs()
    scale = merged.value_ref.abs().where(~merged.metric.isin(["train_gap", "batch_gap"]), 1.0).clip(lower=1e-300)
    return (diff / scale).groupby(merged.metric).max().to_dict()


def _compare_weights(out: Path, states: dict) -> float:
    """Worst relative difference over every parameter and float buffer (running statistics too)."""
    worst = 0.0
    for (arm, seed), state in states.items():
        saved = np.load(out / f"weights-{arm}-seed{seed}.npz", allow_pickle=False)
        assert set(saved.files) == set(state)
        for key, ref in state.items():
            if ref.is_floating_point():
                ref = ref.numpy()
                worst = max(worst, float(np.linalg.norm(saved[key] - ref) / max(np.linalg.norm(ref), 1e-300)))
    return worst


def test_single_process_run_is_the_runner_bitwise(single):
    rows, _ = single["bn"]
    assert rows.equals(run_case(_case(), ENV))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_equal_single_process(single, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "harness.distributed", "--case", CASE, "--steps", str(STEPS), "--seeds", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ref_rows, ref_states = single["bn"]
    worst = _compare_rows(ref_rows, pd.read_csv(out / "results.csv"))
    assert set(worst) == {"loss", "si_norm", "predicted_scale", "train_gap", "batch_gap"}
    assert max(worst.values()) < TOL, worst
    assert _compare_weights(out, ref_states) < TOL
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "bn": "global", "steps": STEPS, "backend": "gloo"}
    assert meta["cases"][CASE]["status"] == "partial"  # fewer steps than the case: no verdicts
    assert pd.read_csv(out / "verdicts.csv").empty


# ---- two ranks by torch.multiprocessing (file:// rendezvous): ghost BN, and the negative control ----

def _scenarios():
    return {"ghost": (_ghost_case(), "global"), "local-bn": (_case(), "local"), "epoch": (_epoch_case(), "global")}


def _spawned_rank(rank: int, tmp: str, world: int) -> None:
    torch.set_num_threads(1)
    D.init_process_group("cpu", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        for name, (case, bn) in _scenarios().items():
            D.run(case, env=ENV, bn=bn, out=Path(tmp) / name)
    finally:
        D.shutdown()


def test_spawned_ranks_ghost_bn_exact_and_local_bn_differs(single, tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_spawned_rank, args=(str(tmp_path), 2), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two spawned ranks did not finish in 240 s")
    # GhostBatchNorm2d: exact, running statistics (gathered across ranks) included.
    rows, states = single["ghost"]
    worst = _compare_rows(rows, pd.read_csv(tmp_path / "ghost" / "results.csv"))
    assert max(worst.values()) < TOL, worst
    assert _compare_weights(tmp_path / "ghost", states) < TOL
    # Epoch unit: per-arm batch-size schedules, activation noise; every update counted once.
    rows, states = single["epoch"]
    got = pd.read_csv(tmp_path / "epoch" / "results.csv")
    worst = _compare_rows(rows, got)
    assert max(worst.values()) < TOL, worst
    assert _compare_weights(tmp_path / "epoch", states) < TOL
    sizes = got[got.metric == "batch_size"].pivot_table(index="step", columns="arm", values="value")
    assert sizes["grow"].tolist() == [16, 32, 32] and sizes["fixed"].tolist() == [8, 8, 8]  # global, not per rank
    assert pd.read_csv(tmp_path / "epoch" / "verdicts.csv").ok.all()  # 6 + 3 + 3 updates, exactly
    # Negative control: per-rank BN statistics over 8 examples instead of 16 is another function.
    rows, states = single["bn"]
    worst = _compare_rows(rows, pd.read_csv(tmp_path / "local-bn" / "results.csv"))
    assert worst["loss"] > 1e-3, worst
    assert _compare_weights(tmp_path / "local-bn", states) > 1e-2


# ---- the pieces --------------------------------------------------------------------------------------

def test_shards_are_contiguous_and_equal():
    x = torch.arange(12)
    assert [D.shard(x, r, 3).tolist() for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="equal shards"):
        D.shard(x, 0, 5)


def test_ghost_shards_must_be_whole_ghost_batches():
    from harness.models import build_model
    model = build_model("preresnet_cifar", {"depth": 8, "ghost_batch": 4}, generator_seed=0,
                        dtype=torch.float64, device=torch.device("cpu"))
    D.check_ghost_shards(model, 8)
    with pytest.raises(ValueError, match="not a multiple of ghost_batch 4"):
        D.check_ghost_shards(model, 6)


def test_global_batch_norm_without_a_group_is_batch_norm():
    bn = torch.nn.BatchNorm2d(3).double()
    model = torch.nn.Sequential(bn)
    assert D.use_global_batch_stats(model) == 1
    assert isinstance(model[0], D.GlobalBatchNorm)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(model(x), torch.nn.BatchNorm2d(3).double()(x))


def test_cli_rejects_unknown_case(capsys, tmp_path):
    assert D.main(["--case", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown case 'nope'" in capsys.readouterr().err
