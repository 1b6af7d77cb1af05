"""`python -m harness list | run | report`. Exit codes: 0 every verdict as intended, 1 a verdict
failed (or a run diverged), 2 bad input (unknown case, bad value), 130 interrupted; each non-zero
exit says why in one line on stderr."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadInput(Exception):
    pass


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be non-negative, got {text!r}")
    return seeds


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
    run.add_argument("--device", type=_device, help="default: cpu for the cpu profile, cuda for gpu")
    run.add_argument("--dtype", choices=("float64", "float32"), help="override the cases' dtype")
    run.add_argument("--seeds", type=_seeds, help="override the cases' seeds, e.g. 0,1,2")
    run.add_argument("--smoke", action="store_true", help="a few steps on tiny data; results, no verdicts")
    run.add_argument("--include-slow", action="store_true", help="with --profile: include slow cases")
    run.add_argument("--data", metavar="DIR", help="CIFAR-10 data root (default: $HARNESS_DATA)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<UTC time>-<profile>)")
    run.add_argument("--html", type=Path, help="also write the HTML report here")

    rep = sub.add_parser("report", help="build the self-contained HTML report of a run directory")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--html", type=Path, help="default: RUN_DIR/report.html")
    return p


def cmd_list(args) -> int:
    from harness import registry
    for case in registry.select(profile=args.profile, include_slow=True):
        print(f"{case.id}\t{case.claim}\t{case.profile}\t{','.join(case.markers)}")
    return EXIT_OK


def cmd_run(args) -> int:
    import os

    from harness import registry, report, store
    from harness.optim import DEFAULT_OPTIMIZER, OptimizerSpecError, load_factory
    from harness.runner import RunEnv
    from harness.session import execute

    if not args.cases and not args.profile:
        raise BadInput("name cases to run, or pass --profile cpu|gpu (`python -m harness list` shows cases)")
    ids = list(dict.fromkeys(args.cases))  # a case named twice runs once
    cases = registry.select(ids or None, profile=args.profile, include_slow=args.include_slow)
    if ids and args.profile:
        other = [c.id for c in cases if c.profile != args.profile]
        if other:
            raise BadInput(f"--profile {args.profile}: {', '.join(other)} belong to another profile; "
                           f"drop --profile or those cases")
    optimizer = args.optimizer or DEFAULT_OPTIMIZER
    try:
        load_factory(optimizer)
    except OptimizerSpecError as exc:
        raise BadInput(str(exc)) from None
    if args.data:
        if not Path(args.data).is_dir():
            raise BadInput(f"--data {args.data}: not a directory")
        os.environ["HARNESS_DATA"] = str(Path(args.data).resolve())
    env = RunEnv(device=args.device, optimizer=optimizer, dtype=args.dtype, smoke=args.smoke,
                 seeds=args.seeds)

    run_dir = store.RunDir(args.out or store.default_run_dir(args.profile))
    devices = sorted({env.device_for(c) for c in cases})
    meta = store.metadata(profile=args.profile, device=",".join(devices) or "none",
                          dtype=args.dtype, optimizer=optimizer, smoke=args.smoke,
                          seeds={c.id: list(env.seeds_for(c)) for c in cases},
                          command=["python", "-m", "harness", *args.argv])
    meta["status"] = "running"
    run_dir.write_metadata(meta)
    results, verdicts, statuses = [], [], {}
    exit_code = EXIT_OK
    try:
        for case in cases:
            t0 = time.perf_counter()
            outcome = execute(case, env)
            seconds = time.perf_counter() - t0
            statuses[case.id] = {"status": outcome.status, "seconds": round(seconds, 2),
                                 "message": outcome.message}
            results.append(outcome.results)
            verdicts.append(outcome.verdicts)
            # Rewritten after every case: an interrupted run keeps every finished case.
            run_dir.write_results(pd.concat(results, ignore_index=True))
            run_dir.write_verdicts(pd.concat(verdicts, ignore_index=True))
            tag = outcome.status.upper() + (" (negative control)" if case.negative else "")
            print(f"{tag:28s} {case.id}  {seconds:.1f}s  {outcome.message}".rstrip(), flush=True)
            if outcome.status in ("fail", "error"):
                exit_code = EXIT_FAIL
    except KeyboardInterrupt:
        meta.update(status="interrupted", cases=statuses)
        run_dir.write_metadata(meta)
        print(f"interrupted: finished cases are in {run_dir.path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    meta.update(status="finished", cases=statuses)
    run_dir.write_metadata(meta)
    counts = pd.Series([s["status"] for s in statuses.values()]).value_counts().to_dict()
    print(f"{len(cases)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f"; results in {run_dir.path}")
    if args.html:
        report.write_report(run_dir.path, args.html)
        print(f"report: {args.html}")
    if exit_code:
        print("some verdicts failed (see verdicts.csv)", file=sys.stderr)
    return exit_code


def cmd_report(args) -> int:
    from harness import report
    out = args.html or args.run_dir / "report.html"
    try:
        report.write_report(args.run_dir, out)
    except FileNotFoundError as exc:
        raise BadInput(str(exc)) from None
    print(f"report: {out}")
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
        return {"list": cmd_list, "run": cmd_run, "report": cmd_report}[args.command](args)
    except (BadInput, UnknownCase, SettingError, CaseError, DataNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
