"""The docs: README.md is the front door (short), every page under docs/ is reachable from it, every
relative link resolves, and the code example of docs/writing-a-case.md declares valid cases."""
from __future__ import annotations

import re
from pathlib import Path

from harness.spec import validate

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:|#", t)]


def test_every_relative_link_resolves():
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in PAGES for target in _relative_links(page)
              if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo += [(page.parent / t.split("#")[0]).resolve() for t in _relative_links(page)]
    assert not [p.relative_to(REPO) for p in PAGES if p.resolve() not in seen]


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 160


def test_the_writing_a_case_example_declares_valid_cases():
    text = (REPO / "docs" / "writing-a-case.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}
    exec(compile(code, "docs/writing-a-case.md", "exec"), namespace)
    assert namespace["CASES"] and all(validate(c).exact for c in namespace["CASES"])
