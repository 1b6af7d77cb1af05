"""Collects the cases declared in the `cases` package (every module's `CASES` list), validates
each, and looks them up by id. Collection is lazy: nothing is imported until a case is asked for.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from harness.spec import Case, CaseError, validate


class UnknownCase(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def collect(package: str = "cases") -> dict[str, Case]:
    pkg = importlib.import_module(package)
    found: dict[str, Case] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package}.{info.name}")
        declared = getattr(module, "CASES", None)
        if declared is None:
            continue
        for case in declared:
            try:
                validate(case)
            except CaseError as exc:
                raise CaseError(f"{package}.{info.name}: {exc}") from None
            if case.id in found:
                raise CaseError(f"{package}.{info.name}: case {case.id!r}: field 'id': declared twice")
            found[case.id] = case
    return found


@functools.cache
def all_cases() -> dict[str, Case]:
    return collect()


def get(case_id: str) -> Case:
    cases = all_cases()
    if case_id not in cases:
        import difflib
        close = difflib.get_close_matches(case_id, list(cases), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `python -m harness list` shows them"
        raise UnknownCase(f"unknown case {case_id!r}{hint}")
    return cases[case_id]


def select(ids: list[str] | None = None, profile: str | None = None, include_slow: bool = False) -> list[Case]:
    if ids:
        return [get(i) for i in ids]
    return [c for c in all_cases().values()
            if (profile is None or c.profile == profile) and (include_slow or not c.slow)]
