"""pytest front: every registered Case becomes `tests/test_cases.py::test_case[<case id>]`, marked
with its profile (`cpu`/`gpu`), `slow` and `negative`. Options inject what cases never set: the
device, the optimizer under test, seeds, and the smoke budget.

`--run-dir DIR` makes the session leave a run directory, as `python -m harness run` does: every case
test hands its Outcome to the `record_outcome` fixture, which writes it as part files (one set per
case, each file atomic, a JSON marker last) under DIR/.parts-<session>/. Under pytest-xdist each
worker writes its own parts; the controller merges them in pytest_sessionfinish, so no row is lost
and nothing is shared between processes while tests run. `--report [HTML]` then writes the HTML
report with the baseline comparison, and fails the session (exit 1) when the comparison does.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import pytest

PARTS_KEY = pytest.StashKey[Path]()
DEFAULT_PYTEST_RUN_DIR = "runs/pytest-latest"
CASE_NODE = re.compile(r"::test_case\[(.+)\]$")
SESSION_ARM_STORE = "LRC_SESSION_ARM_STORE"
SLOW_CASES_KEY = pytest.StashKey[list]()
PREFILLED_KEY = pytest.StashKey[bool]()


def pytest_addoption(parser):
    group = parser.getgroup("lr-conformance")
    group.addoption("--device", default=None,
                    help="torch device for the cases (default: cpu for cpu cases, cuda for gpu cases)")
    group.addoption("--optimizer", default=None, metavar="pkg.module:Name",
                    help="optimizer under test, torch.optim.SGD's signature (default torch.optim:SGD)")
    group.addoption("--optimizer-kwargs", default=None, metavar="JSON",
                    help="extra constructor keywords for --optimizer, a JSON object, e.g. '{\"foreach\": true}'")
    group.addoption("--smoke", action="store_true",
                    help="run each selected case for a few steps on tiny data: results, no verdicts")
    group.addoption("--seeds", default=None, help="comma-separated seeds overriding the cases' own")
    group.addoption("--stack", default=None, metavar="S",
                    help="training-stack switches for every case, as `harness run --stack` "
                         "(compile, compile_step, bf16, fp16, channels_last, accumulate=K; docs/stack.md)")
    group.addoption("--stacked-seeds", default="auto", choices=("auto", "off", "force"),
                    help="as `harness run --stacked-seeds`: an arm's seeds as one stacked model where allowed")
    group.addoption("--run-dir", default=None, metavar="DIR",
                    help="write the case tests' results.csv, verdicts.csv and metadata.json here "
                         f"(default: off; {DEFAULT_PYTEST_RUN_DIR} when --report is given)")
    group.addoption("--report", nargs="?", const="", default=None, metavar="HTML",
                    help="at the end, write the HTML report (default RUN_DIR/report.html) with the baseline "
                         "comparison; a regression against the baseline fails the session")
    group.addoption("--baseline", default=None, metavar="FILE",
                    help="baseline for --report (default: baselines/<profile>.csv when it exists; "
                         "'none' for no comparison)")


def pytest_configure(config):
    # `harness run` called by the tests (in this process or a child) runs its cases in-process
    # unless a test asks for -j: monkeypatches and test hooks must reach the code that runs.
    os.environ.setdefault("HARNESS_JOBS", "1")
    if getattr(config, "workerinput", None) is None and not os.environ.get(SESSION_ARM_STORE):
        # One arm store per session (harness.trajectories) for the registered cases' tests, shared
        # by the xdist workers, which inherit this environment: an arm two cases declare alike
        # trains once per session. Only test_case uses it (fixture shared_arms): a test that
        # monkeypatches the training must never write rows a real case would reuse.
        import tempfile
        os.environ[SESSION_ARM_STORE] = tempfile.mkdtemp(prefix="lrc-arms-")
        config.add_cleanup(lambda path=os.environ[SESSION_ARM_STORE]: shutil.rmtree(path, ignore_errors=True))
    for marker in ("cpu", "gpu", "slow", "negative", "exact"):
        config.addinivalue_line("markers", f"{marker}: see pyproject.toml")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One GPU per worker ("gw3" -> GPU 3 mod the count), set before anything starts CUDA; the
        # controller counted the GPUs (pytest_configure_node below). A user's CUDA_VISIBLE_DEVICES wins.
        from harness.device import pin_worker_gpu
        pin_worker_gpu(os.environ["PYTEST_XDIST_WORKER"],
                       int(getattr(config, "workerinput", {}).get("lrc_n_gpus", 0)))
        # Two workers with two threads each slow each other down several-fold on 2 cores.
        import torch
        torch.set_num_threads(1)
    from hypothesis import settings
    settings.register_profile("ci", deadline=None, derandomize=True, max_examples=20)
    settings.register_profile("dev", deadline=None, max_examples=20)
    settings.register_profile("thorough", deadline=None, max_examples=300)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
    _check_optimizer(config)
    _check_stack(config)
    _configure_run_dir(config)


def _check_stack(config) -> None:
    from harness.stack import StackError, parse
    try:
        parse(config.getoption("--stack"))
    except StackError as exc:
        raise pytest.UsageError(str(exc)) from None


def _check_optimizer(config) -> None:
    """`--optimizer` that cannot be imported or constructed with SGD's keywords: one usage error for
    the session (as the CLI's exit 2), not one failure per case."""
    spec, text = config.getoption("--optimizer"), config.getoption("--optimizer-kwargs")
    if not (spec or text) or getattr(config, "workerinput", None) is not None:
        return
    from harness.optim import DEFAULT_OPTIMIZER, OptimizerSpecError, check_constructible, load_factory, parse_kwargs
    spec = spec or DEFAULT_OPTIMIZER
    try:
        check_constructible(load_factory(spec), spec, parse_kwargs(text))
    except OptimizerSpecError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: tell each worker how many GPUs there are (counted here, where no test runs)."""
    from harness.device import gpu_count
    node.workerinput["lrc_n_gpus"] = gpu_count()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` for the GPU profile on CUDA: one worker per GPU; otherwise (no GPU, the CPU profile,
    --device cpu, or PYTEST_XDIST_AUTO_NUM_WORKERS set) xdist's own default."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from harness.device import auto_workers, gpu_count
    return auto_workers(gpu_count(), config.getoption("markexpr"), config.getoption("--device"))


def _case_of(item):
    """The Case a `test_case[...]` item runs (None for any other test)."""
    return getattr(getattr(item, "callspec", None), "params", {}).get("conformance_case")


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the tests that will run
def pytest_collection_modifyitems(config, items):
    """The case tests first, in `harness run -j`'s plan (harness.parallel.plan): cases that share
    an arm form a chain, chains ordered by their work, largest first. Under pytest-xdist a chain is
    one xdist_group, so it runs on one worker and its second case reuses the first's rows instead
    of waiting on their lock with a worker idle (scripts/run-tests passes `--dist loadgroup
    --no-loadscope-reorder`, which hands out tests in this order as workers free up)."""
    from harness.parallel import plan

    cases = {_case_of(i).id: i for i in items if _case_of(i) is not None}
    chains = plan(list(cases), _env_from(config)) if cases else []
    rank = {cid: n for n, cid in enumerate(c for chain in chains for c in chain)}
    if config.pluginmanager.hasplugin("xdist"):
        for chain in (c for c in chains if len(c) > 1):
            for cid in chain:
                cases[cid].add_marker(pytest.mark.xdist_group(f"chain:{chain[0]}"))
        for item in items:  # one worker per module: its module-scoped fixtures (a CLI run, a dry
            if _case_of(item) is None:  # run of gpu-quick) are built once, not once per worker
                item.add_marker(pytest.mark.xdist_group(f"module:{item.path.name}"))
    items.sort(key=lambda i: rank[_case_of(i).id] if _case_of(i) is not None else len(rank))  # stable
    _slow_cases(config)[:] = [_case_of(i) for i in items if _case_of(i) is not None and _case_of(i).slow]


def pytest_generate_tests(metafunc):
    if "conformance_case" not in metafunc.fixturenames:
        return
    from harness import registry
    params = []
    for case in registry.all_cases().values():
        marks = [getattr(pytest.mark, m) for m in case.markers]
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("conformance_case", params)


@pytest.fixture(scope="session")
def run_env(pytestconfig):
    return _env_from(pytestconfig)


def _env_from(pytestconfig):
    from harness.optim import DEFAULT_OPTIMIZER
    from harness.runner import RunEnv
    from harness.stack import parse
    seeds = pytestconfig.getoption("--seeds")
    return RunEnv(stack=parse(pytestconfig.getoption("--stack")), device=pytestconfig.getoption("--device"),
                  optimizer=pytestconfig.getoption("--optimizer") or DEFAULT_OPTIMIZER,
                  optimizer_kwargs=pytestconfig.getoption("--optimizer-kwargs") or "",
                  smoke=pytestconfig.getoption("--smoke"),
                  stacked_seeds=pytestconfig.getoption("--stacked-seeds"),
                  seeds=tuple(int(s) for s in seeds.split(",")) if seeds else None)


# ---- the session's run directory (--run-dir / --report) -------------------------------------------

def _configure_run_dir(config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller said where the parts go
        if workerinput.get("lrc_parts"):
            config.stash[PARTS_KEY] = Path(workerinput["lrc_parts"])
        return
    run_dir, report = config.getoption("--run-dir"), config.getoption("--report")
    baseline = config.getoption("--baseline")
    if report and not report.lower().endswith((".html", ".htm")):
        raise pytest.UsageError(f"--report takes an .html path, got {report!r} "
                                f"(write --report=FILE.html, or put --report last)")
    if baseline and baseline != "none":
        from harness import baseline as bl
        try:
            bl.read(baseline)
        except bl.BaselineError as exc:
            raise pytest.UsageError(str(exc)) from None
    if run_dir is None and report is None:
        return
    here = Path(config.invocation_params.dir)
    path = here / run_dir if run_dir else Path(config.rootpath) / DEFAULT_PYTEST_RUN_DIR
    html = None
    if report is not None:
        html = here / report if report else path / "report.html"
    plugin = RunDirPlugin(path, html, baseline)
    config.stash[PARTS_KEY] = plugin.parts
    config.pluginmanager.register(plugin, "lr-conformance-run-dir")


@pytest.fixture
def shared_arms(monkeypatch, request, run_env):
    """The session's arm store for this test (harness.trajectories): identical arms train once.
    Before its first slow case, each worker joins in training the arm-seeds of every selected slow
    case (harness.trajectories.prefill): the workers split them as they free up, so one long case
    (order-patched-cifar: 9 arm-seeds, 26 min on one core) no longer sets the session's wall time."""
    if not os.environ.get(SESSION_ARM_STORE):
        return
    monkeypatch.setenv("HARNESS_ARM_STORE", os.environ[SESSION_ARM_STORE])
    case = _case_of(request.node)
    if case is not None and case.slow and not request.config.stash.get(PREFILLED_KEY, False):
        request.config.stash[PREFILLED_KEY] = True
        from harness.trajectories import prefill
        prefill(_slow_cases(request.config), run_env)


def _slow_cases(config) -> list:
    """The session's selected slow cases (set at collection)."""
    if SLOW_CASES_KEY not in config.stash:
        config.stash[SLOW_CASES_KEY] = []
    return config.stash[SLOW_CASES_KEY]


@pytest.fixture
def record_outcome(request):
    """Hand a case's Outcome to the session's run directory (a no-op without --run-dir/--report)."""
    t0 = time.perf_counter()
    parts = request.config.stash.get(PARTS_KEY, None)

    def record(outcome, env) -> None:
        if parts is None:
            return
        from harness.store import atomic_write_csv, atomic_write_text, device_name
        case = outcome.case
        stem = parts / (re.sub(r"[^A-Za-z0-9_.-]", "_", case.id)[:60] + "-"
                        + hashlib.sha1(case.id.encode()).hexdigest()[:10])
        atomic_write_csv(Path(f"{stem}.results.csv"), outcome.results)
        atomic_write_csv(Path(f"{stem}.verdicts.csv"), outcome.verdicts)
        # Written last: a part counts only once its marker exists.
        atomic_write_text(Path(f"{stem}.json"), json.dumps({
            "case": case.id, "profile": case.profile, "status": outcome.status, "message": outcome.message,
            "seconds": round(time.perf_counter() - t0, 2), "device": env.device_for(case),
            "device_name": device_name(env.device_for(case)),  # the worker's torch threads, not the controller's
            "seeds": list(env.seeds_for(case)), "optimizer": env.optimizer, "smoke": env.smoke,
            "optimizer_kwargs": env.kwargs(), "stack": env.stack.label, "timings": outcome.timings,
            "dtype": env.dtype, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}))
    return record


class RunDirPlugin:
    """Registered on the controller (or the only process) of a --run-dir session."""

    def __init__(self, run_dir: Path, html: Path | None, baseline: str | None):
        self.run_dir, self.html, self.baseline = run_dir, html, baseline
        # Unique per session: two sessions writing the same run dir never mix their parts.
        self.parts = run_dir / f".parts-{os.getpid()}-{secrets.token_hex(4)}"
        self.parts.mkdir(parents=True)
        self.pytest_outcomes: dict[str, str] = {}
        self.comparison = None
        self.error: str | None = None

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        """xdist: tell each worker where its part files go."""
        node.workerinput["lrc_parts"] = str(self.parts)

    def pytest_runtest_logreport(self, report):
        """Every case test's pytest outcome (xdist forwards the workers' reports here)."""
        m = CASE_NODE.search(report.nodeid)
        if not m:
            return
        if report.when == "call":
            self.pytest_outcomes[m.group(1)] = report.outcome
        elif report.outcome != "passed":
            self.pytest_outcomes.setdefault(
                m.group(1), "skipped" if report.skipped else f"{report.outcome} in {report.when}")

    def merge(self, config, exitstatus) -> None:
        import pandas as pd

        from harness import registry, store
        from harness.checks import VERDICT_COLUMNS
        from harness.runner import RESULT_COLUMNS

        markers = sorted(self.parts.glob("*.json"))
        infos = [(json.loads(p.read_text()), str(p)[: -len(".json")]) for p in markers]
        order = {cid: i for i, cid in enumerate(registry.all_cases())}
        infos.sort(key=lambda item: order.get(item[0]["case"], len(order)))
        results, verdicts, cases = [], [], {}
        for info, stem in infos:
            results.append(pd.read_csv(f"{stem}.results.csv"))
            verdicts.append(pd.read_csv(f"{stem}.verdicts.csv"))
            cases[info["case"]] = {"status": info["status"], "seconds": info["seconds"],
                                   "message": info["message"], "pytest": self.pytest_outcomes.get(info["case"])}
        for case_id, outcome in self.pytest_outcomes.items():  # skipped before running, or crashed
            if case_id not in cases:
                cases[case_id] = {"status": "skipped" if outcome == "skipped" else "error", "seconds": None,
                                  "message": f"pytest: {outcome}", "pytest": outcome}
        results = [f for f in results if not f.empty]
        verdicts = [f for f in verdicts if not f.empty]
        run = store.RunDir(self.run_dir)
        run.write_results(pd.concat(results, ignore_index=True)[RESULT_COLUMNS] if results
                          else pd.DataFrame(columns=RESULT_COLUMNS))
        run.write_verdicts(pd.concat(verdicts, ignore_index=True)[VERDICT_COLUMNS] if verdicts
                           else pd.DataFrame(columns=VERDICT_COLUMNS))
        first = infos[0][0] if infos else {}
        profiles = {i["profile"] for i, _ in infos}
        meta = store.metadata(
            profile=profiles.pop() if len(profiles) == 1 else None,
            device=",".join(sorted({i["device"] for i, _ in infos})) or "none", dtype=first.get("dtype"),
            optimizer=first.get("optimizer") or config.getoption("--optimizer") or "torch.optim:SGD",
            seeds={i["case"]: i["seeds"] for i, _ in infos},
            smoke=bool(first.get("smoke", config.getoption("--smoke"))),
            command=["python", "-m", "pytest", *map(str, config.invocation_params.args)])
        names = {i.get("device_name") for i, _ in infos}
        if len(names) == 1 and None not in names:
            meta["device_name"] = names.pop()
        meta["stack"] = first.get("stack", "plain")
        meta.update(status="finished" if int(exitstatus) in (0, 1) else f"pytest exit {int(exitstatus)}",
                    cases=cases, workers=sorted({i["worker"] for i, _ in infos}))
        run.write_metadata(meta)
        shutil.rmtree(self.parts, ignore_errors=True)

    def pytest_sessionfinish(self, session, exitstatus):
        try:
            self.merge(session.config, exitstatus)
        except Exception as exc:  # never hide the tests' outcome behind a traceback
            self.error = f"could not write the run directory {self.run_dir}: {type(exc).__name__}: {exc}"
            session.exitstatus = max(int(session.exitstatus), 1)
            return
        if self.html is None:
            return
        from harness import report
        chosen = None if self.baseline == "none" else (Path(self.baseline) if self.baseline else report.AUTO)
        try:
            self.comparison = report.write_report(self.run_dir, self.html, chosen)
        except Exception as exc:
            self.error = f"could not write the report {self.html}: {type(exc).__name__}: {exc}"
            session.exitstatus = max(int(session.exitstatus), 1)
            return
        if self.comparison is not None and self.comparison.failed and int(session.exitstatus) == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if self.error:
            tr.write_line(f"lr-conformance: {self.error}", red=True)
            return
        tr.write_line(f"lr-conformance: run directory {self.run_dir}"
                      + (f", report {self.html}" if self.html else ""))
        if self.comparison is not None:
            tr.write_line(f"lr-conformance: baseline {self.comparison.path}: {self.comparison.summary()}",
                          red=self.comparison.failed, green=not self.comparison.failed)
            if self.comparison.failed:
                tr.write_line(self.comparison.failure_line(), red=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a busy 2-core machine two OpenMP threads spin
    against each other (small float64 convs measured up to 50× slower), and each DDP rank uses one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
