"""Every example in the documentation runs, and the layout page names the
modules there are.

The ``python`` code blocks of README.md and docs/*.md run as a reader would
paste them: a page's blocks in order, in one namespace (as ``__main__``, so
their functions travel by value as a script's do), in a temporary directory,
with ``QJAMFAB_HOSTS=local:2``, so that blocks written with ``Master()`` run
on two local workers. A block that cannot run here says why in a comment on
the line before it, ``<!-- skip: needs a Slurm cluster -->``. Other languages
(``bash``, ``text``, ...) never run; a block must name its language.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^\s*<!--\s*skip:(.*?)-->\s*$")
# Languages a reader would take for Python: only ``python`` runs, so the
# others are refused rather than silently left out.
PYTHON_LIKE = {"py", "python3", "ipython", "pycon"}
# What some pages' examples import from the optional extras (the test extra
# has them all): without one, that page is skipped rather than failed.
OPTIONAL = {"distributed", "joblib", "sklearn", "scipy"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    source: str
    skip: str | None  # the reason it does not run, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their skip reasons."""
    lines = page.read_text().splitlines()
    found = []
    for token in MarkdownIt("commonmark").parse("\n".join(lines)):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        before = lines[start - 1] if start > 0 else ""
        skip = SKIP.match(before)
        found.append(
            Block(
                page,
                start + 1,
                token.info.split()[0] if token.info.strip() else "",
                token.content,
                skip[1].strip() if skip else None,
            )
        )
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language == "python" and b.skip is None]


def test_every_block_says_what_it_is():
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if not block.language:
                problems.append(
                    f"{block.where}: a code block without a language: mark it "
                    f"python (it runs), or bash / text (it does not)"
                )
            elif block.language in PYTHON_LIKE:
                problems.append(
                    f"{block.where}: ```{block.language} does not run: write "
                    f"```python (with a skip comment if it must not run)"
                )
            if block.skip is not None and not block.skip:
                problems.append(
                    f"{block.where}: a skip comment without a reason: say why, "
                    f"as in <!-- skip: needs SSH hosts a, b -->"
                )
            if block.skip is not None and block.language != "python":
                problems.append(
                    f"{block.where}: a skip comment before a {block.language} "
                    f"block, which never runs: remove the comment"
                )
    assert not problems, "\n".join(problems)


def test_the_pages_have_examples_that_run():
    # A guard on the collector itself: if it found nothing, nothing would fail.
    assert sum(len(runnable(page)) for page in PAGES) >= 10


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if runnable(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    from qjamfab import Master

    monkeypatch.setenv("QJAMFAB_HOSTS", "local:2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("dask") is not None:
            import dask.config

            # A LocalCluster's workers (and qjamfab's cache beside them)
            # would otherwise stay in the system's temporary directory.
            stack.enter_context(dask.config.set({"temporary-directory": str(tmp_path)}))
        try:
            for block in runnable(page):
                # Padded so that a traceback gives the page's own line numbers.
                code = compile("\n" * block.line + block.source, str(page), "exec")
                try:
                    exec(code, namespace)
                except ModuleNotFoundError as exc:
                    if exc.name not in OPTIONAL:
                        raise AssertionError(
                            f"the example at {block.where} fails: {exc!r}"
                        ) from exc
                    pytest.skip(
                        f"the example at {block.where} needs {exc.name}, "
                        f"which the test extra installs: pip install -e '.[test]'"
                    )
                except Exception as exc:
                    raise AssertionError(
                        f"the example at {block.where} fails: {exc!r}"
                    ) from exc
        finally:
            for value in namespace.values():  # a failed page leaves no workers
                if isinstance(value, Master):
                    value.close()


def layout_names() -> set[str]:
    text = (ROOT / "docs" / "layout.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {
        name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])
    }


def test_layout_page_names_every_module_and_no_other():
    package = ROOT / "qjamfab"
    modules = {
        str(p.relative_to(package))
        for p in package.rglob("*")
        if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    }
    named = layout_names()
    assert not modules - named, (
        f"docs/layout.md does not name {sorted(modules - named)}: add a row "
        f"saying what each does"
    )
    assert not named - modules, (
        f"docs/layout.md names {sorted(named - modules)}, which qjamfab/ does "
        f"not have: remove or rename those rows"
    )
