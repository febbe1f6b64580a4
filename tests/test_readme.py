"""Every ```python block of README.md and docs/*.md runs as a reader sees it, none skipped.

How the blocks run
------------------
* Each page (README.md, then docs/*.md) is cut into sections at its ``## `` headings; the text
  before the first one is a section too (the README's quick start). The python blocks of a
  section run in order, in one fresh namespace, in a fresh temporary working directory (so
  ``grad_cache/`` and ``results/`` paths land there). Nothing is imported or defined for a
  block: it sees exactly what it and the visible blocks before it in its section define.
* A block is self-contained (its own imports and a few lines of setup, e.g. the package's own
  ``sketchattr.bench.recipes`` / ``sketchattr.bench.data.digits``) or it continues the blocks above it in its
  section. Then the prose just before it must say so ("continuing from the block above"), and
  every name it uses but does not define must be defined by an earlier block of its section.
  :func:`test_blocks_say_where_their_names_come_from` checks this from each block's syntax tree
  before anything runs, so a name borrowed silently fails with the block's line even when the
  borrowed code path would not run.
* A block that cannot run here as written (CUDA only, several processes) is made runnable
  visibly (the README's torch.distributed block initialises a process group only when torchrun
  launched it, and runs as one process otherwise) or moved into ```bash / ```text. Nothing is
  skipped: ```py and ```python3 blocks run like ```python ones, and a fence that only looks like
  python (``pycon``, ``ipython``) fails the collection check.
* A failure names the block: ``README.md line N (section ..., python block k)`` (or
  ``docs/x.md line N``), and the traceback's frames in the block point at the page's own lines.
* The README stays a user's guide: at most :data:`MAX_README_LINES` lines, every docs page linked
  from it, and no page links outside the repository or to a missing file or heading.

Sections run with one torch thread and one BLAS thread (see the comment in the test). The whole
file takes about 30-40 s on 2 CPU cores shared with other jobs.
"""
from __future__ import annotations

import ast
import builtins
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 450

PYTHON_LANGS = {"python", "python3", "py", "py3"}
PYTHON_LIKE = re.compile(r"^(py|python\d*|pycon|ipython\d*)$", re.IGNORECASE)
CONTINUING = re.compile(r"continuing\s+from\s+the\s+blocks?\s+above", re.IGNORECASE)
BUILTIN_NAMES = frozenset(dir(builtins))


# ----------------------------------------------------------------------------- parsing
@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the block's first code line
    section: str
    index: int  # 1-based position among the section's python blocks
    code: str
    prose: str  # the page's text between the previous fence (or the section's heading) and this block

    def where(self) -> str:
        return f"{self.page} line {self.line} (section {self.section!r}, python block {self.index})"


@dataclass
class Section:
    page: str
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Parsed:
    sections: list[Section]
    fences: list[tuple[str, int, str]]  # (page, line, language) of every opening fence
    problems: list[str]


def parse_page(text: str, page: str) -> Parsed:
    lines = text.splitlines()
    intro = "quickstart (before the first ## heading)" if page == "README.md" else "intro (before the first ## heading)"
    sections = [Section(page, intro, 1)]
    fences: list[tuple[str, int, str]] = []
    problems: list[str] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            lang = stripped[3:].strip().split(" ")[0].split("{")[0]
            fences.append((page, i + 1, lang))
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if j == len(lines):
                problems.append(f"{page} line {i + 1}: code fence never closed")
            if lang.lower() in PYTHON_LANGS:
                sec = sections[-1]
                sec.blocks.append(Block(page, i + 2, sec.title, len(sec.blocks) + 1, "\n".join(lines[i + 1 : j]),
                                        "\n".join(prose)))
            prose = []
            i = j + 1
            continue
        if "readme-setup" in stripped:
            problems.append(f"{page} line {i + 1}: hidden setup comments are gone; give the block visible setup "
                            "or say in the prose that it continues the block above")
        if line.startswith("## "):
            sections.append(Section(page, line[3:].strip(), i + 1))
            prose = []
        else:
            prose.append(line)
        i += 1
    return Parsed([s for s in sections if s.blocks], fences, problems)


def _parse_all() -> Parsed:
    out = Parsed([], [], [])
    for path in PAGES:
        parsed = parse_page(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
        out.sections += parsed.sections
        out.fences += parsed.fences
        out.problems += parsed.problems
    return out


PARSED = _parse_all()


# ------------------------------------------------------------------- names of a block
def block_names(code: str) -> tuple[set[str], set[str]]:
    """(names the block defines, names it uses without defining them); builtins excluded."""
    tree = ast.parse(code)
    defined: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    return defined, used - defined - BUILTIN_NAMES


def name_problems(section: Section) -> list[str]:
    """A block uses only names it defines, or (when its prose says it continues the block above)
    names earlier blocks of its section define."""
    problems, earlier = [], set()
    for block in section.blocks:
        try:
            defined, free = block_names(block.code)
        except SyntaxError as exc:
            problems.append(f"{block.where()}: does not parse: {exc}")
            continue
        if free:
            missing = sorted(free - earlier)
            if missing:
                problems.append(f"{block.where()}: uses {', '.join(missing)}, which no visible block of its section "
                                "defines; import / build them in the block")
            elif not CONTINUING.search(" ".join(block.prose.split())):
                problems.append(f"{block.where()}: uses {', '.join(sorted(free))} from the blocks above without saying "
                                "so; write 'continuing from the block above' in the prose before it, or make it "
                                "self-contained")
        earlier |= defined
    return problems


# ------------------------------------------------------------------------------- tests
def _compiled(block: Block):
    """Code compiled so that tracebacks name the page and its real line numbers."""
    return compile("\n" * (block.line - 1) + block.code, str(ROOT / block.page), "exec")


def _fail(block: Block, exc: BaseException) -> None:
    path = str(ROOT / block.page)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    frames = [ln.replace(path, block.page) for ln in tb.splitlines() if f'File "{path}"' in ln]
    pytest.fail(f"{block.where()} failed: {type(exc).__name__}: {exc}\n{chr(10).join(frames)}\n\n{tb}", pytrace=False)


def test_readme_blocks_are_all_collected():
    """No python block escapes the runner: every fence is closed and parsed, no hidden setup is left."""
    assert not PARSED.problems, "\n".join(PARSED.problems)
    odd = [f"{page} line {ln}: ```{lang} looks like python; label it ```python (it then runs here) "
           "or ```bash / ```text" for page, ln, lang in PARSED.fences
           if PYTHON_LIKE.match(lang) and lang.lower() not in PYTHON_LANGS]
    assert not odd, "\n".join(odd)
    blocks = [b for s in PARSED.sections for b in s.blocks]
    assert len(blocks) == sum(lang.lower() in PYTHON_LANGS for _, _, lang in PARSED.fences) > 0
    assert any(s.page == "README.md" and s.line == 1 for s in PARSED.sections), "the quick start block must open the README"


def test_blocks_say_where_their_names_come_from():
    problems = [p for s in PARSED.sections for p in name_problems(s)]
    assert not problems, "\n".join(problems)


def test_parser_and_name_check_on_a_made_up_page():
    """The runner's own parsing and name check, on a small made-up page."""
    text = "\n".join([
        "intro", "```python", "import os", "a = os.sep", "```",
        "## One", "text", "```python", "b = a", "```",                                 # a: not in section One
        "## Two", "```python", "x = 1", "```", "Continuing from the block", "above:", "", "```py", "y = x + len('')",
        "```", "```bash", "ls", "```", "```python", "z = y", "```",                    # z = y: prose is silent
        "<!-- readme-setup: digits -->",
    ])
    parsed = parse_page(text, "README.md")
    intro, one, two = parsed.sections
    assert [b.line for b in intro.blocks] == [3] and one.blocks[0].line == 9
    assert [b.code for b in two.blocks] == ["x = 1", "y = x + len('')", "z = y"]  # ```py counts, ```bash does not
    assert len(parsed.problems) == 1 and "line 27" in parsed.problems[0]       # the hidden-setup comment
    assert name_problems(intro) == []
    (p_one,) = name_problems(one)
    assert "uses a," in p_one
    (p_two,) = name_problems(two)
    assert "python block 3" in p_two and "without saying so" in p_two
    assert block_names("def f(n):\n    return [k for k in range(n)]\ntry:\n    f(m)\nexcept E as e:\n    print(e)") \
        == ({"f", "n", "k", "e"}, {"m", "E"})


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_stand_alone():
    """The docs are the repository's own: no pointers outside it; relative links and their anchors resolve."""
    pages = [*PAGES, ROOT / "ARCHITECTURE.md"]
    anchors = {p.resolve(): {_slug(m) for m in re.findall(r"^#+ (.+)$", p.read_text(encoding="utf-8"), re.M)}
               for p in pages}
    bad = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for pat in ("../shared", "/work/shared", "DESIGN.md", "BENCHMARKS.md"):
            if pat in text:
                bad.append(f"{page.relative_to(ROOT)} mentions {pat!r}")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target:
                continue
            path = (page.parent / target).resolve() if target else page.resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)} links to missing {target!r}")
            elif anchor and path in anchors and anchor not in anchors[path]:
                bad.append(f"{page.relative_to(ROOT)} links to {target or page.name}#{anchor}: no such heading")
    assert not bad, "\n".join(bad)


def test_readme_is_a_guide():
    """The README stays short (research notes, long tables and plots live in docs/) and links every docs page."""
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move details to docs/ and link them"
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not unlinked, f"docs pages not linked from the README: {unlinked}"


@pytest.mark.parametrize("section", PARSED.sections,
                         ids=lambda s: f"{s.page}:L{s.line}-{re.sub(r'[^a-z0-9]+', '-', s.title.lower()).strip('-')[:40]}")
def test_readme_section_runs(section: Section, tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    saved_threads = torch.get_num_threads()
    # one thread for torch and for the BLAS under scipy / numpy (threadpoolctl comes with
    # scikit-learn): on a shared 2-core machine two threads that wait for each other were up to
    # 100× slower (the LoRA fine-tune's steps; scipy's eigh of F̂ took 11-15 s instead of 0.3 s).
    # The blocks' results do not depend on it.
    torch.set_num_threads(1)
    blas_one_thread = threadpool_limits(1)
    ns: dict[str, Any] = {"__name__": "__readme__"}  # nothing else: a block imports what it uses
    try:
        for block in section.blocks:
            t0 = time.perf_counter()
            try:
                exec(_compiled(block), ns)  # noqa: S102 - running the docs is the test
            except Exception as exc:  # noqa: BLE001 - reported with the block's line
                _fail(block, exc)
            print(f"{block.where()}: {time.perf_counter() - t0:.1f} s")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        blas_one_thread.restore_original_limits()
