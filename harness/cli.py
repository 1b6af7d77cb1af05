"""`python -m harness list | run | matrix | conform | report | history | baseline`. Exit codes: 0 every verdict as intended, 1 a verdict
failed or a case ended in error (a run diverged, the optimizer under test raised), 2 bad input
(unknown case, bad value, an optimizer that cannot be constructed), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); each non-zero exit says why in one line on stderr. An interrupted run keeps
every finished case and resumes with `run --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
SUMMARY_STATUSES = ("ok", "fail", "error", "skipped", "xfail")  # always counted; xpass/smoke when present


class BadInput(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (batch schedulers, `kill`): handled like Ctrl-C, exit 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be non-negative, got {text!r}")
    return seeds


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"-j takes a positive number of worker processes, got {text!r}")
    return n


def _concat(frames: list, columns: list) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _device(text: str) -> str:
    import torch
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    return text


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes exit 2 with a single line, like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def _choices(*allowed: str):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v for v in text.split(",") if v)
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated subset of {','.join(allowed)}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="python -m harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    ls = sub.add_parser("list", help="one case a line: id, claim, profile, markers")
    ls.add_argument("--profile", choices=("cpu", "gpu"))

    run = sub.add_parser("run", help="run cases and write results.csv, verdicts.csv, metadata.json")
    run.add_argument("cases", nargs="*", metavar="CASE", help="case ids (default: every case of --profile)")
    run.add_argument("--profile", choices=("cpu", "gpu"), help="run every case of this profile")
    run.add_argument("--optimizer", default=None, metavar="pkg.module:Name",
                     help="the system under test: a class or factory with torch.optim.SGD's signature "
                          "(default torch.optim:SGD)")
    run.add_argument("--optimizer-kwargs", metavar="JSON", default=None,
                     help="extra constructor keywords for the optimizer, a JSON object, e.g. '{\"foreach\": true}' "
                          "(on top of the cases' lr, momentum, weight_decay)")
    run.add_argument("--device", type=_device, help="default: cpu for the cpu profile, cuda for gpu")
    run.add_argument("--dtype", choices=("float64", "float32"), help="override the cases' dtype")
    run.add_argument("--seeds", type=_seeds, help="override the cases' seeds, e.g. 0,1,2")
    run.add_argument("--stack", metavar="S", default=None,
                     help="training-stack switches applied to every arm, comma-separated: compile, compile_step, bf16, " 
                          "fp16 (CUDA), channels_last, accumulate=K (docs/stack.md); default plain")
    run.add_argument("--stacked-seeds", choices=("auto", "off", "force"), default="auto",
                     help="train an arm's seeds as one stacked model where the case allows it (auto: float64 "
                          "statistical step cases on the BN MLP; off: seed by seed; force: exact cases too). "
                          "metadata.json says per case how its seeds ran (docs/running.md)")
    run.add_argument("--smoke", action="store_true", help="a few steps on tiny data; results, no verdicts")
    run.add_argument("--include-slow", action="store_true", help="with --profile: include slow cases")
    run.add_argument("--data", metavar="DIR", help="CIFAR-10 data root (default: $HARNESS_DATA)")
    run.add_argument("--download", action="store_true",
                     help="let torchvision download CIFAR-10 into the data root when no source is found there")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<UTC time>-<profile>)")
    run.add_argument("--html", type=Path, help="also write the HTML report here")
    run.add_argument("-j", "--jobs", type=_jobs, default=None, metavar="N",
                     help="run cases in N worker processes, one torch thread each (default: the number of cores; "
                          "1: in this process). The tables are written in case order, as a sequential run writes them")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="finish an interrupted run: the same command, only the cases not finished "
                          "(epoch-unit cases continue from their last epoch); takes no other argument")

    mat = sub.add_parser("matrix", help="the conformance matrix: exact cases × implementation × dtype × norm")
    mat.add_argument("cases", nargs="*", metavar="CASE", help="base cases (default: every case with matrix=True)")
    mat.add_argument("--norm", type=_choices("bn", "gn", "ln", "in"), default="bn,gn,ln,in")
    mat.add_argument("--dtype", type=_choices("float64", "float32"), default="float64,float32")
    mat.add_argument("--impl", type=_choices("forloop", "foreach", "fused"), default="forloop,foreach,fused")
    mat.add_argument("--optimizer", metavar="pkg.module:Name",
                     help="put a plugged-in optimizer through the matrix (replaces --impl)")
    mat.add_argument("--optimizer-kwargs", metavar="JSON", default=None,
                     help="extra constructor keywords for --optimizer, a JSON object")
    mat.add_argument("--stack", metavar="S", action="append", default=None,
                     help="a training stack to cross the cells with (repeatable; 'plain' is the default axis), "
                          "e.g. --stack plain --stack compile --stack accumulate=4; switches as for `run --stack`")
    mat.add_argument("--out", type=Path, help="default: runs/<UTC time>-matrix")

    con = sub.add_parser("conform", help="one optimizer's certificate: its update rule, and which claims hold "
                                         "for it (exit 0 when it conforms to Definition 1.2, 1 when not)")
    con.add_argument("--optimizer", default=None, metavar="pkg.module:Name",
                     help="the optimizer to certify (default torch.optim:SGD)")
    con.add_argument("--optimizer-kwargs", metavar="JSON", default=None,
                     help="extra constructor keywords, a JSON object, e.g. '{\"foreach\": true}'")
    con.add_argument("--full", action="store_true",
                     help="also run the families too slow for the quick (< 30 s) certificate")
    con.add_argument("--json", action="store_true", help="print the certificate as JSON instead of text")
    con.add_argument("--out", type=Path, help="also keep a run directory of the cases it ran")
    con.add_argument("--html", type=Path, help="also write the HTML report, with the certificate first")

    rep = sub.add_parser("report", help="build the self-contained HTML report of a run directory")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--html", type=Path, help="default: RUN_DIR/report.html")
    rep.add_argument("--baseline", type=Path, metavar="FILE",
                     help="compare with this baseline (default: baselines/<profile>.csv when it exists); "
                          "exit 1 when a verdict flipped or a value left its band")
    rep.add_argument("--no-baseline", action="store_true", help="no baseline comparison")
    rep.add_argument("--history", type=Path, metavar="DIR",
                     help="add a trend section from this history (harness history add): each property over the "
                          "runs of the same machine class, optimizer and dtype, with sustained shifts flagged (amber)")

    hist = sub.add_parser("history", help="the append-only history of finished runs (SQLite, DIR/history.sqlite)")
    hist_sub = hist.add_subparsers(dest="history_command", metavar="add", required=True, parser_class=OneLineErrors)
    hadd = hist_sub.add_parser("add", help="append a finished run (refused twice, and for smoke or unfinished runs)")
    hadd.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    hadd.add_argument("--into", type=Path, metavar="DIR", help="history directory (default .history/)")

    base = sub.add_parser("baseline", help="write baselines/<profile>.csv from run directories")
    base_sub = base.add_subparsers(dest="baseline_command", metavar="update", required=True,
                                   parser_class=OneLineErrors)
    upd = base_sub.add_parser("update", help="median, spread and n per case and property over the runs "
                                             "(use runs with different seeds: --seeds 0, --seeds 1, --seeds 2)")
    upd.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    upd.add_argument("--out", type=Path, metavar="FILE", help="default: baselines/<profile>.csv")
    return p


def cmd_list(args) -> int:
    from harness import registry
    for case in registry.select(profile=args.profile, include_slow=True):
        print(f"{case.id}\t{case.claim}\t{case.profile}\t{','.join(case.markers)}")
    return EXIT_OK


def _resume_args(args) -> tuple[argparse.Namespace, dict]:
    """The interrupted run's own arguments (from its metadata.json), writing into the same directory."""
    run_dir = args.resume
    defaults = vars(build_parser().parse_args(["run"]))
    given = [k for k, v in vars(args).items() if k in defaults and k != "resume" and v != defaults[k]]
    if given:
        raise BadInput(f"--resume takes the run directory alone (the run's own arguments are reused), "
                       f"got also {', '.join(given)}")
    try:
        meta = json.loads((run_dir / "metadata.json").read_text())
        argv = list(meta["command"][3:])  # after "python -m harness"
    except FileNotFoundError:
        raise BadInput(f"--resume {run_dir}: not a run directory (no metadata.json)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadInput(f"--resume {run_dir}: unreadable metadata.json") from None
    if argv[:1] != ["run"] or "--resume" in argv:
        raise BadInput(f"--resume {run_dir}: metadata.json does not record a `harness run` command")
    resumed = build_parser().parse_args(argv)
    resumed.argv, resumed.out = argv, run_dir
    return resumed, meta


def _finished(run_dir, meta: dict) -> tuple[dict, dict]:
    """Statuses and tables (results, verdicts), per case, of the cases an earlier (interrupted) run finished."""
    from harness import store
    statuses = dict(meta.get("cases") or {})
    if not statuses:
        return {}, {}
    try:
        res, ver, _ = store.RunDir(run_dir).read()
    except FileNotFoundError:
        return {}, {}  # killed before its first case was written: start over
    return statuses, {cid: (res[res.case == cid], ver[ver.case == cid]) for cid in statuses}


def _summary(statuses: dict) -> str:
    counts = pd.Series([s["status"] for s in statuses.values()], dtype=object).value_counts().to_dict()
    shown = [f"{counts.get(k, 0)} {k}" for k in SUMMARY_STATUSES]
    shown += [f"{counts[k]} {k}" for k in ("xpass", "smoke") if counts.get(k)]
    return f"{len(statuses)} cases: " + ", ".join(shown)


def _failure_line(statuses: dict, run_dir: Path) -> str | None:
    """Why the run exits 1, in one line; None when it does not."""
    by = {k: [c for c, s in statuses.items() if s["status"] == k] for k in ("fail", "error", "xpass")}
    parts = []
    if by["fail"]:
        parts.append(f"{len(by['fail'])} case(s) with verdicts not as intended ({', '.join(by['fail'][:3])}"
                     + (", ..." if len(by["fail"]) > 3 else "") + "; see verdicts.csv)")
    if by["error"]:
        traced = any(statuses[c].get("traceback") for c in by["error"])
        parts.append(f"{len(by['error'])} case(s) ended in error, nothing judged for them "
                     f"({', '.join(by['error'][:3])}" + (", ..." if len(by["error"]) > 3 else "")
                     + (f"; tracebacks in {run_dir / 'errors'}" if traced else "; see metadata.json") + ")")
    if by["xpass"]:
        parts.append(f"{len(by['xpass'])} documented non-reproduction(s) passed: remove their xfail "
                     f"({', '.join(by['xpass'][:3])})")
    return "; ".join(parts) or None


def cmd_run(args) -> int:
    import os

    from harness import progress, registry, report, store
    from harness.checkpoint import clear as clear_checkpoint
    from harness.checkpoint import file_stem
    from harness.cifar import DataNotFound
    from harness.schedules import SettingError
    from harness.spec import CaseError
    from harness.optim import (DEFAULT_OPTIMIZER, OptimizerSpecError, check_constructible, load_factory,
                               parse_kwargs)
    from harness import parallel, session, trajectories
    from harness.checks import VERDICT_COLUMNS
    from harness.runner import RESULT_COLUMNS, RunEnv

    meta_before = None
    if args.resume:
        args, meta_before = _resume_args(args)
    if not args.cases and not args.profile:
        raise BadInput("name cases to run, or pass --profile cpu|gpu (`python -m harness list` shows cases)")
    from harness import matrix
    ids = list(dict.fromkeys(args.cases))  # a case named twice runs once
    # Matrix cells ('<case>[<norm>,<dtype>,<impl>]') carry their own optimizer implementation.
    cells = {i: matrix.parse_cell(i) for i in ids if matrix.parse_cell(i)}
    cell_cases, cell_optimizers = [], {}
    for cid, parts in cells.items():
        try:
            case, spec = matrix.resolve(*parts)
        except (matrix.NotApplicable, ValueError) as exc:  # StackError is a ValueError
            raise BadInput(str(exc)) from None
        if spec and args.optimizer:
            raise BadInput(f"{cid} names implementation {parts[3]!r}; with --optimizer use impl 'plugged'")
        cell_cases.append(case)
        cell_optimizers[case.id] = spec
    plain = [i for i in ids if i not in cells]
    cases = registry.select(plain or None, profile=args.profile, include_slow=args.include_slow) \
        if (plain or not ids) else []
    cases += cell_cases
    if ids and args.profile:
        other = [c.id for c in cases if c.profile != args.profile]
        if other:
            raise BadInput(f"--profile {args.profile}: {', '.join(other)} belong to another profile; "
                           f"drop --profile or those cases")
    from harness.stack import StackError
    from harness.stack import parse as parse_stack
    try:
        stack = parse_stack(args.stack)
    except StackError as exc:
        raise BadInput(str(exc)) from None
    if stack.autocast_dtype is not None and args.dtype == "float64":
        raise BadInput(f"--stack {stack.label} autocasts from float32 master weights: drop --dtype float64")
    # Matrix cells carry their own stack ('<case>[<norm>,<dtype>,<impl>,<stack>]'): one per run.
    cell_stacks = {parts[4] for parts in cells.values() if parts[4] is not None}
    if cell_stacks and (len(cell_stacks) > 1 or args.stack is not None):
        if len(cell_stacks) > 1 or stack.label not in cell_stacks:
            raise BadInput(f"the cells name stacks {', '.join(sorted(cell_stacks))} and --stack says {stack.label}: "
                           f"one stack per run")
    if cell_stacks:
        stack = parse_stack(cell_stacks.pop())
    optimizer = args.optimizer or DEFAULT_OPTIMIZER
    # Every optimizer the run will construct, checked once before any case runs: a plug-in that cannot
    # be built with SGD's keywords is one line and exit 2, not one error per case.
    try:
        kwargs = parse_kwargs(args.optimizer_kwargs)
        for spec in dict.fromkeys([optimizer, *[s for s in cell_optimizers.values() if s]]):
            check_constructible(load_factory(spec), spec, kwargs)
    except OptimizerSpecError as exc:
        raise BadInput(str(exc)) from None
    if args.data:
        if not Path(args.data).is_dir():
            raise BadInput(f"--data {args.data}: not a directory")
        os.environ["HARNESS_DATA"] = str(Path(args.data).resolve())
    if args.download:
        os.environ["HARNESS_DOWNLOAD"] = "1"  # read by harness.datasets.cifar10
    env = RunEnv(device=args.device, optimizer=optimizer, dtype=args.dtype, smoke=args.smoke,
                 seeds=args.seeds, optimizer_kwargs=args.optimizer_kwargs or "", stack=stack,
                 stacked_seeds=args.stacked_seeds)

    run_dir = store.RunDir(args.out or store.default_run_dir(args.profile))
    statuses, tables = {}, {}  # tables: (results, verdicts) per finished case
    if meta_before is not None:
        statuses, tables = _finished(run_dir.path, meta_before)
        meta = dict(meta_before, resumed=[*meta_before.get("resumed", []), dict(
            at=store.utc_now(), git_commit=store.git_commit(), device_name=store.device_name(meta_before["device"]))])
        print(f"resuming {run_dir.path}: {len(statuses)} of {len(cases)} cases finished before", file=sys.stderr)
    else:
        devices = sorted({env.device_for(c) for c in cases})
        meta = store.metadata(profile=args.profile, device=",".join(devices) or "none",
                              dtype=args.dtype, optimizer=optimizer, smoke=args.smoke,
                              seeds={c.id: list(env.seeds_for(c)) for c in cases},
                              command=["python", "-m", "harness", *args.argv])
        meta["optimizer_kwargs"] = kwargs
        meta["stack"] = stack.label
    meta.update(status="running", cases=statuses)
    run_dir.write_metadata(meta)
    checkpoints = run_dir.path / "checkpoints"
    arm_store = run_dir.path / "arms"  # shared trajectories of this run (harness.trajectories)
    if meta_before is None:  # a fresh run never continues from checkpoints or arms an earlier run left here
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(arm_store, ignore_errors=True)
    store_before = os.environ.get(trajectories.STORE_ENV)
    os.environ[trajectories.STORE_ENV] = str(arm_store)  # read by the workers too (spawn copies the environment)
    # SIGTERM unwinds like Ctrl-C (only the main thread may install a handler: an embedding
    # caller on another thread keeps its own).
    in_main = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    order = [c.id for c in cases]
    by_id = {c.id: c for c in cases}
    # The tables are written per finished case, in case order, after every case: the files of a
    # parallel run are those of a sequential one, and an interrupted run keeps every finished case.

    def record(case_id: str, status: str, message: str, trace: str, timings, res, ver, seconds: float) -> None:
        entry = {"status": status, "seconds": round(seconds, 2), "message": message}
        if timings:  # median update and compile time apart (harness.runner.step_timings)
            entry["timings"] = timings
        if trace:
            tb_file = run_dir.path / "errors" / f"{file_stem(case_id)}.txt"
            store.atomic_write_text(tb_file, f"{case_id}: {message}\n\n{trace}")
            entry["traceback"] = str(tb_file.relative_to(run_dir.path))
        tables[case_id] = (res, ver)
        done = [cid for cid in order if cid in tables]
        # A case counts as finished (what --resume skips) only once its rows are on disk; its
        # checkpoint goes only after that too.
        run_dir.write_results(_concat([tables[c][0] for c in done], RESULT_COLUMNS))
        run_dir.write_verdicts(_concat([tables[c][1] for c in done], VERDICT_COLUMNS))
        statuses[case_id] = entry
        meta["cases"] = {cid: statuses[cid] for cid in order if cid in statuses}
        run_dir.write_metadata(meta)
        clear_checkpoint(checkpoints, case_id)
        tag = status.upper() + (" (negative control)" if by_id[case_id].negative else "")
        compiled = (f" (compile {timings['compile_s']:.1f}s, step {timings['step_ms']:.3g} ms)"
                    if timings and "compile_s" in timings and (stack.compile or stack.compile_step) else "")
        print(f"{tag:28s} {case_id}  {seconds:.1f}s{compiled}  {message}".rstrip(), flush=True)

    todo = [cid for cid in order if cid not in statuses]
    jobs = min(args.jobs or parallel.default_jobs(), max(len(todo), 1))
    try:
        if jobs > 1:
            for out in parallel.run_parallel(parallel.plan(todo, env), env, jobs, str(checkpoints)):
                if out.bad_input:
                    raise BadInput(out.bad_input)
                record(out.case_id, out.status, out.message, out.traceback, out.timings, out.results, out.verdicts,
                       out.seconds)
        for case_id in (todo if jobs == 1 else []):
            case, case_env = parallel.resolve_case(case_id, env)  # a matrix cell brings its optimizer
            t0 = time.perf_counter()
            outcome = session.execute(
                case, case_env, checkpoint_dir=checkpoints,
                make_progress=lambda total, unit, initial, cid=case.id: progress.for_case(cid, total, unit,
                                                                                          initial=initial))
            record(case.id, outcome.status, outcome.message, outcome.traceback, outcome.timings, outcome.results,
                   outcome.verdicts, time.perf_counter() - t0)
    except (BadInput, DataNotFound, SettingError, CaseError):
        meta.update(status="aborted")  # bad input found mid-run: exit 2 (main), finished cases kept
        run_dir.write_metadata(meta)
        raise
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        meta.update(status="terminated" if terminated else "interrupted")
        run_dir.write_metadata(meta)
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: {len(statuses)} finished cases are in "
              f"{run_dir.path}; finish the run with `python -m harness run --resume {run_dir.path}`",
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)
        if store_before is None:
            os.environ.pop(trajectories.STORE_ENV, None)
        else:
            os.environ[trajectories.STORE_ENV] = store_before
    meta.update(status="finished")
    run_dir.write_metadata(meta)
    shutil.rmtree(arm_store, ignore_errors=True)  # every row is in results.csv now
    print(_summary(statuses) + f"; results in {run_dir.path}")
    if args.html:
        report.write_report(run_dir.path, args.html)
        print(f"report: {args.html}")
    why = _failure_line(statuses, run_dir.path)
    if why:
        print(why, file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_matrix(args) -> int:
    from harness import matrix, store
    from harness.optim import OptimizerSpecError, check_constructible, load_factory, parse_kwargs
    from harness.runner import RunEnv

    impls = args.impl
    env = RunEnv()
    if args.optimizer_kwargs and not args.optimizer:
        raise BadInput("--optimizer-kwargs needs --optimizer (the --impl switches take none)")
    if args.optimizer:
        try:
            kwargs = parse_kwargs(args.optimizer_kwargs)
            check_constructible(load_factory(args.optimizer), args.optimizer, kwargs)
        except OptimizerSpecError as exc:
            raise BadInput(str(exc)) from None
        impls, env = (matrix.PLUGGED,), RunEnv(optimizer=args.optimizer, optimizer_kwargs=args.optimizer_kwargs or "")
    from harness.stack import StackError
    try:
        specs = matrix.cells(case_ids=args.cases or None, norms=args.norm, dtypes=args.dtype, impls=impls,
                             stacks=args.stack or ("plain",))
    except StackError as exc:
        raise BadInput(str(exc)) from None
    out = store.RunDir(args.out or store.default_run_dir("matrix")).path
    rows = []
    for spec in specs:
        rows.append(matrix.run_cell(spec, env))
        row = rows[-1]
        print(f"{row['status'].upper():8s} {matrix.cell_id(*spec)}  {row['seconds']}s  "
              + (f"{row['measured']:.3g}" if row['status'] != 'inapplicable' else ''), flush=True)
        table = pd.DataFrame(rows, columns=matrix.MATRIX_COLUMNS)
        store.atomic_write_csv(out / "matrix.csv", table)  # after every cell: Ctrl-C keeps the rest
    summary = matrix.summarize(table)
    store.atomic_write_text(out / "matrix.md", summary)
    print(summary)
    print(f"matrix: {out / 'matrix.csv'} and {out / 'matrix.md'}")
    return EXIT_FAIL if table.status.isin(["fail", "error"]).any() else EXIT_OK


def cmd_conform(args) -> int:
    from harness import conform, report, store
    from harness.optim import DEFAULT_OPTIMIZER, OptimizerSpecError, check_constructible, load_factory, parse_kwargs

    optimizer = args.optimizer or DEFAULT_OPTIMIZER
    try:
        check_constructible(load_factory(optimizer), optimizer, parse_kwargs(args.optimizer_kwargs))
        cert, outcomes = conform.certify(optimizer, args.optimizer_kwargs or "", full=args.full)
    except OptimizerSpecError as exc:
        raise BadInput(str(exc)) from None
    print(json.dumps(conform.json_safe(cert), indent=2, allow_nan=False) + "\n" if args.json
          else conform.render_text(cert), end="")
    if args.out or args.html:
        run_dir = store.RunDir(args.out or store.default_run_dir("conform"))
        run_dir.write_results(pd.concat([o.results for o in outcomes], ignore_index=True))
        run_dir.write_verdicts(pd.concat([o.verdicts for o in outcomes], ignore_index=True))
        meta = store.metadata(profile=None, device="cpu", dtype=None, optimizer=optimizer,
                              seeds={o.case.id: list(o.case.seeds) for o in outcomes}, smoke=False,
                              command=["python", "-m", "harness", *args.argv])
        meta.update(status="finished", certificate=cert, optimizer_kwargs=cert["optimizer_kwargs"],
                    cases={o.case.id: {"status": o.status, "message": o.message} for o in outcomes})
        run_dir.write_metadata(meta)
        if args.html:
            report.write_report(run_dir.path, args.html, baseline=None)
        print(f"run directory: {run_dir.path}" + (f"; report: {args.html}" if args.html else ""),
              file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK if cert["conforms"] else EXIT_FAIL


def cmd_report(args) -> int:
    import json

    from harness import report
    from harness.baseline import BaselineError
    if args.baseline and args.no_baseline:
        raise BadInput("--baseline FILE and --no-baseline exclude each other")
    out = args.html or args.run_dir / "report.html"
    baseline = None if args.no_baseline else (args.baseline or report.AUTO)
    from harness.history import HistoryError
    try:
        comparison = report.write_report(args.run_dir, out, baseline, strict=True, history=args.history)
    except FileNotFoundError as exc:
        raise BadInput(str(exc)) from None
    except (BaselineError, HistoryError) as exc:
        raise BadInput(str(exc)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{args.run_dir}: unreadable run directory ({str(exc).strip().splitlines()[0]})") from None
    print(f"report: {out}")
    if comparison is not None:
        print(f"baseline {comparison.path}: {comparison.summary()}")
        if comparison.failed:
            print(comparison.failure_line(), file=sys.stderr)
            return EXIT_FAIL
    return EXIT_OK


def cmd_history(args) -> int:
    from harness import history
    try:
        run_id, n = history.add(args.run_dir, args.into)
    except history.HistoryError as exc:
        raise BadInput(str(exc)) from None
    print(f"history {history.db_path(args.into)}: run {run_id} added ({n} verdicts)")
    return EXIT_OK


def cmd_baseline(args) -> int:
    from harness import baseline
    try:
        path, rows = baseline.update(args.run_dirs, args.out)
    except baseline.BaselineError as exc:
        raise BadInput(str(exc)) from None
    n = rows["n"]
    print(f"baseline: {path} ({len(rows)} rows from {len(args.run_dirs)} runs, n = {n.min()}–{n.max()})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from harness.cifar import DataNotFound
    from harness.registry import UnknownCase
    from harness.schedules import SettingError
    from harness.spec import CaseError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return {"list": cmd_list, "run": cmd_run, "matrix": cmd_matrix, "conform": cmd_conform,
                "report": cmd_report, "history": cmd_history, "baseline": cmd_baseline}[args.command](args)
    except (BadInput, UnknownCase, SettingError, CaseError, DataNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # outside `run`'s case loop (which says more itself): one line, no traceback
        print(f"interrupted: {args.command}", file=sys.stderr)
        return EXIT_INTERRUPTED
