"""Shared trajectories (harness.trajectories): an arm two cases declare alike trains once per run, its
rows reused bitwise, and any change to what determines it trains it again."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from harness import registry, session, trajectories
from harness.cli import EXIT_OK, main
from harness.runner import RunEnv
from harness.schedules import Constant
from harness.stack import parse

# The BN + WD toy's BN-alone case and its negative control declare the same 'gd' arm (3 seeds ×
# 3,000 full-batch updates, about 4 s): the control is judged on the positive case's trajectory.
TRAINS, REUSES = "toy-bn-alone-converges", "toy-neg-bn-alone-judged-never-converges"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(trajectories.STORE_ENV, str(tmp_path / "arms"))
    return tmp_path / "arms"


def test_a_reused_arm_gives_bitwise_the_rows_of_training_it_alone(store, monkeypatch):
    first = session.execute(registry.get(TRAINS), RunEnv())
    reused = session.execute(registry.get(REUSES), RunEnv())
    assert first.status == reused.status == "ok"
    assert first.timings["updates"] == 9000 and "updates" not in reused.timings  # nothing trained the second time
    monkeypatch.delenv(trajectories.STORE_ENV)
    alone = session.execute(registry.get(REUSES), RunEnv())
    assert alone.timings["updates"] == 9000
    pd.testing.assert_frame_equal(reused.results, alone.results, check_exact=True)
    pd.testing.assert_frame_equal(reused.verdicts, alone.verdicts, check_exact=True)


def test_changing_what_determines_the_arm_trains_it_again(store):
    assert session.execute(registry.get(TRAINS), RunEnv()).timings["updates"] == 9000
    other_seed = session.execute(registry.get(REUSES), RunEnv(seeds=(7,)))
    assert other_seed.timings["updates"] == 3000  # seed 7 is not in the store: trained
    again = session.execute(registry.get(REUSES), RunEnv(seeds=(7,)))
    assert "updates" not in again.timings  # and now it is


def test_every_input_of_the_key_changes_it():
    case = registry.get(TRAINS)
    arm, env = case.arms[0], RunEnv()
    key = trajectories.arm_key(case, arm, 0, env, 1)
    assert key is not None and key == trajectories.arm_key(case, arm, 0, RunEnv(), 1)
    variants = {
        "seed": (case, arm, 1, env, 1),
        "draws": (case, arm, 0, env, 2),
        "steps (smoke)": (case, arm, 0, dataclasses.replace(env, smoke=True), 1),
        "dtype": (case, arm, 0, dataclasses.replace(env, dtype="float32"), 1),
        "device": (case, arm, 0, dataclasses.replace(env, device="meta"), 1),
        "optimizer": (case, arm, 0, dataclasses.replace(env, optimizer="harness.optim:sgd_foreach"), 1),
        "optimizer kwargs": (case, arm, 0, dataclasses.replace(env, optimizer_kwargs='{"foreach": true}'), 1),
        "stack": (case, arm, 0, dataclasses.replace(env, stack=parse("accumulate=2")), 1),
        "arm": (case, dataclasses.replace(arm, si=dataclasses.replace(arm.si, lr=Constant(0.25))), 0, env, 1),
        "model": (dataclasses.replace(case, model=(case.model[0], {**case.model[1], "scale": 4.0})), arm, 0, env, 1),
        "data": (dataclasses.replace(case, data=(case.data[0], {**case.data[1], "n": 63})), arm, 0, env, 1),
        "measurements": (dataclasses.replace(case, measurements=("loss",)), arm, 0, env, 1),
        "unit": (dataclasses.replace(case, unit="epoch"), arm, 0, env, 1),
    }
    keys = {name: trajectories.arm_key(*args) for name, args in variants.items()}
    assert all(k is not None and k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)


def test_a_case_that_compares_arms_never_shares_nor_does_an_arm_without_a_value_repr():
    exact = registry.get("wdexp-zerobuf-mlp-bn")  # function gaps to the reference arm
    assert not trajectories.shareable(exact) and trajectories.arm_key(exact, exact.arms[0], 0, RunEnv(), 1) is None
    case = registry.get(TRAINS)
    anonymous = dataclasses.replace(case.arms[0], si=dataclasses.replace(case.arms[0].si, lr=lambda k: 0.5))
    assert trajectories.arm_key(case, anonymous, 0, RunEnv(), 1) is None


def test_parallel_workers_share_the_store_and_write_what_a_sequential_run_writes(tmp_path, capsys):
    cases = [TRAINS, REUSES]
    assert main(["run", *cases, "-j", "1", "--out", str(tmp_path / "seq")]) == EXIT_OK
    assert main(["run", *cases, "-j", "2", "--out", str(tmp_path / "par")]) == EXIT_OK
    for name in ("results.csv", "verdicts.csv"):
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "par" / name).read_bytes(), name
    assert not (tmp_path / "par" / "arms").exists()  # a finished run keeps its rows in results.csv only


# Prefill: the arm-seeds of slow cases as units of work that processes split (conftest's shared_arms).
PREFILLED = "batch-cifar-neg-never-anneal"  # two arms (decay_lr, never_anneal); smoke: 3 epochs on 80 images, seed 0


def test_prefill_trains_every_arm_seed_once_and_the_case_then_gives_the_rows_of_running_alone(store, monkeypatch):
    case, env = registry.get(PREFILLED), RunEnv(smoke=True)
    assert trajectories.prefill([case], env) == 2  # 2 arms x 1 seed
    assert trajectories.prefill([case], env) == 0  # all stored: nothing left
    prefilled = session.execute(case, env)
    assert prefilled.status == "smoke" and "updates" not in prefilled.timings  # it trained nothing itself
    monkeypatch.delenv(trajectories.STORE_ENV)
    alone = session.execute(case, env)
    assert alone.timings["updates"] > 0
    pd.testing.assert_frame_equal(prefilled.results, alone.results, check_exact=True)


def test_prefill_leaves_an_arm_seed_whose_lock_another_process_holds(store):
    from filelock import FileLock
    case, env = registry.get(PREFILLED), RunEnv(smoke=True)
    units = trajectories.units([case], env)
    assert [(u[1].name, u[2]) for u in units] == [("decay_lr", 0), ("never_anneal", 0)]
    held = units[0][3]
    store.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store / f"{held}.lock")):  # a lock on another file descriptor: as another worker's
        assert trajectories.prefill([case], env) == 1
    stored = trajectories.current()
    assert not stored.has(held) and all(stored.has(u[3]) for u in units[1:])


def test_prefill_skips_cases_that_stack_their_seeds(store):
    # Their rows are addressed with the stacked seeds (harness.stacked_seeds): a seed-by-seed unit
    # would never be reused.
    case = dataclasses.replace(registry.get("smd-sgd-equilibrium"), steps=1)
    assert trajectories.units([case], RunEnv()) == []
    assert len(trajectories.units([case], RunEnv(stacked_seeds="off"))) == 3
