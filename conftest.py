"""pytest front: every registered Case becomes `tests/test_cases.py::test_case[<case id>]`, marked
with its profile (`cpu`/`gpu`), `slow` and `negative`. Options inject what cases never set: the
device, the optimizer under test, seeds, and the smoke budget."""
from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("lr-conformance")
    group.addoption("--device", default=None,
                    help="torch device for the cases (default: cpu for cpu cases, cuda for gpu cases)")
    group.addoption("--optimizer", default=None, metavar="pkg.module:Name",
                    help="optimizer under test, torch.optim.SGD's signature (default torch.optim:SGD)")
    group.addoption("--smoke", action="store_true",
                    help="run each selected case for a few steps on tiny data: results, no verdicts")
    group.addoption("--seeds", default=None, help="comma-separated seeds overriding the cases' own")


def pytest_configure(config):
    for marker in ("cpu", "gpu", "slow", "negative"):
        config.addinivalue_line("markers", f"{marker}: see pyproject.toml")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers with two threads each slow each other down several-fold on 2 cores.
        import torch
        torch.set_num_threads(1)
    from hypothesis import settings
    settings.register_profile("ci", deadline=None, derandomize=True, max_examples=20)
    settings.register_profile("dev", deadline=None, max_examples=20)
    settings.register_profile("thorough", deadline=None, max_examples=300)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_generate_tests(metafunc):
    if "conformance_case" not in metafunc.fixturenames:
        return
    from harness import registry
    params = []
    for case in registry.all_cases().values():
        marks = [getattr(pytest.mark, m) for m in case.markers]
        if case.xfail:
            marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("conformance_case", params)


@pytest.fixture(scope="session")
def run_env(pytestconfig):
    from harness.optim import DEFAULT_OPTIMIZER
    from harness.runner import RunEnv
    seeds = pytestconfig.getoption("--seeds")
    return RunEnv(device=pytestconfig.getoption("--device"),
                  optimizer=pytestconfig.getoption("--optimizer") or DEFAULT_OPTIMIZER,
                  smoke=pytestconfig.getoption("--smoke"),
                  seeds=tuple(int(s) for s in seeds.split(",")) if seeds else None)
