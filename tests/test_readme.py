"""Every ```python block of README.md runs, none skipped.

How the blocks run
------------------
* README.md is cut into sections at its ``## `` headings (the text before the first one is the
  quickstart section). The python blocks of a section run in order, in one namespace, so a block
  may use what an earlier block of its section defined. Each section starts from
  ``import torch; import sketchattr as sa`` (the quickstart's import) in a fresh temporary
  working directory, so ``grad_cache/`` and ``results/`` paths land there.
* A block that needs objects the README does not build on that spot (a trained model, a train
  set, a checkpoint list) gets them from a **setup comment** written just before its fence, blank
  lines allowed in between; GitHub does not render it::

      <!-- readme-setup: digits, checkpoints
      extra_name = something(model)        # optional python lines, run after the fixtures
      -->
      ```python
      ...

  The first line names fixtures of :data:`FIXTURES` below (comma-separated, may be empty); the
  following lines, if any, are python run in the section's namespace after the fixtures. A
  fixture is a small function that puts named objects into the namespace (see each one's
  docstring for what it defines) at small, fast sizes.
* A new block needs nothing to be picked up. If it uses names no earlier block of its section
  defines, it fails with a ``NameError``; add a setup comment (a fixture, or a line of python).
  A block that cannot run here as written (CUDA only, a multi-process launcher) must be made
  runnable (the ``torchrun`` fixture sets up a one-process group the way torchrun would) or
  moved out of ```python into ```bash / ```text: nothing is skipped. ```py and ```python3 blocks
  run like ```python ones; a fence that only looks like python (``pycon``, ``ipython``) fails
  the collection check below.
* A failure names the block: ``README.md line N (section ..., python block k)``, and the
  traceback's frames in the block point at README.md's own line numbers.

Sections run with one torch thread and one BLAS thread (see the comment in the test). The whole
file takes about 40 s on 2 CPU cores shared with other jobs (load average 6-9).
"""
from __future__ import annotations

import copy
import re
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PYTHON_LANGS = {"python", "python3", "py", "py3"}
PYTHON_LIKE = re.compile(r"^(py|python\d*|pycon|ipython\d*)$", re.IGNORECASE)
SETUP_OPEN = "<!-- readme-setup:"


# ----------------------------------------------------------------------------- parsing
@dataclass
class Block:
    line: int  # 1-based README line of the block's first code line
    section: str
    index: int  # 1-based position among the section's python blocks
    code: str
    fixtures: tuple[str, ...] = ()
    setup_code: str = ""
    setup_line: int = 0  # 1-based README line of the setup's first python line

    def where(self) -> str:
        return f"README.md line {self.line} (section {self.section!r}, python block {self.index})"


@dataclass
class Section:
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Parsed:
    sections: list[Section]
    fences: list[tuple[int, str]]  # (line, language) of every opening fence
    problems: list[str]


def parse_readme(text: str) -> Parsed:
    lines = text.splitlines()
    sections = [Section("quickstart (before the first ## heading)", 1)]
    fences: list[tuple[int, str]] = []
    problems: list[str] = []
    pending: tuple[int, tuple[str, ...], str, int] | None = None  # setup comment waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            lang = stripped[3:].strip().split(" ")[0].split("{")[0]
            fences.append((i + 1, lang))
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if j == len(lines):
                problems.append(f"README.md line {i + 1}: code fence never closed")
            code = "\n".join(lines[i + 1 : j])
            if lang.lower() in PYTHON_LANGS:
                sec = sections[-1]
                block = Block(i + 2, sec.title, len(sec.blocks) + 1, code)
                if pending is not None:
                    _, block.fixtures, block.setup_code, block.setup_line = pending
                    pending = None
                sec.blocks.append(block)
            elif pending is not None:
                problems.append(f"README.md line {pending[0]}: readme-setup comment is followed by a ```{lang} "
                                "block, not a ```python one")
                pending = None
            i = j + 1
            continue
        if stripped.startswith(SETUP_OPEN):
            start = i
            body = [stripped[len(SETUP_OPEN):]]
            while "-->" not in body[-1] and i + 1 < len(lines):
                i += 1
                body.append(lines[i])
            if "-->" not in body[-1]:
                problems.append(f"README.md line {start + 1}: readme-setup comment never closed")
            body[-1] = body[-1].split("-->")[0]
            names = tuple(n.strip() for n in body[0].split(",") if n.strip())
            pending = (start + 1, names, "\n".join(body[1:]), start + 2)
        elif stripped.startswith("<!--") and "readme-setup" in stripped:
            problems.append(f"README.md line {i + 1}: write the setup comment as '{SETUP_OPEN} fixtures' "
                            "(fixtures on the first line, python after it)")
        elif stripped and pending is not None:
            problems.append(f"README.md line {pending[0]}: readme-setup comment must come just before its "
                            "```python block (only blank lines between)")
            pending = None
        if line.startswith("## "):
            sections.append(Section(line[3:].strip(), i + 1))
        i += 1
    if pending is not None:
        problems.append(f"README.md line {pending[0]}: readme-setup comment with no ```python block after it")
    return Parsed([s for s in sections if s.blocks], fences, problems)


PARSED = parse_readme(README.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- fixtures
@cache
def _digits_objects() -> dict:
    import sketchattr as sa
    from sketchattr.data.digits import load_digits_split
    from sketchattr.recipes import train_digits_mlp

    split = load_digits_split()
    model, task = train_digits_mlp(seed=0, split=split), sa.ClassificationTask()
    featurizer = sa.Featurizer(model, task, projector="sjlt", m=1024, seed=0, progress=False)
    train_set, query_set = split.train_dataset(), split.query_dataset()
    store = featurizer.featurize(train_set)
    queries = featurizer.query_rows(query_set)
    scorer = sa.SketchedInfluence(damping="auto").fit(store)
    return dict(split=split, model=model, task=task, train_set=train_set, query_set=query_set, featurizer=featurizer,
                store=store, queries=queries, scorer=scorer, scores=scorer.score(queries))


def fx_digits(ns: dict) -> None:
    """The quickstart's objects on the digits-mlp bench: ``split``, ``model`` (the reference
    digits MLP), ``task`` (ClassificationTask), ``train_set`` / ``query_set`` (TensorDatasets),
    ``featurizer`` (SJLT m = 1024, seed 0), ``store`` (in memory), ``queries`` (sketched query rows),
    ``scorer`` (``SketchedInfluence(damping="auto")`` fitted on the store) and ``scores`` [100, 1000].
    Built once and shared by the sections that use it: a block must not train ``model`` further."""
    ns.update(_digits_objects())


def fx_checkpoints(ns: dict) -> None:
    """``model_ep20``, ``model_ep40``, ``model_ep60``: the digits MLP saved after epochs 20, 40 and 60
    of the reference recipe (SGD lr 0.05), plus ``train_set`` / ``query_set``."""
    from sketchattr.data.digits import load_digits_split
    from sketchattr.models.mlp import make_mlp
    from sketchattr.recipes import train_classifier

    split = load_digits_split()
    saved: dict[int, Any] = {}
    train_classifier(make_mlp(seed=0), split.x_train, split.y_train, seed=0,
                     on_epoch_end=lambda e, m: saved.__setitem__(e, copy.deepcopy(m).eval()) if e in (20, 40, 60) else None)
    ns.update(model_ep20=saved[20], model_ep40=saved[40], model_ep60=saved[60],
              train_set=split.train_dataset(), query_set=split.query_dataset())


def fx_retraining(ns: dict) -> None:
    """``train_fn(subset_positions, seed) -> model`` and ``measure_fn(model) -> [n_query]`` for the
    digits bench, shortened to 2 epochs so that 100 subsets × 2 seeds retrain in seconds (the
    real recipe is ``sketchattr.recipes.train_digits_mlp``); needs ``split`` (the digits fixture)."""
    from sketchattr.models.mlp import make_mlp
    from sketchattr.recipes import query_margins, train_classifier

    split = ns["split"]

    def train_fn(positions, seed):
        return train_classifier(make_mlp(seed=seed), split.x_train[positions], split.y_train[positions], seed=seed,
                                epochs=2)

    ns.update(train_fn=train_fn, measure_fn=lambda model: query_margins(model, split))


@cache
def _markov_lm() -> tuple[Any, list, list]:
    from sketchattr.data.markov import markov_text
    from sketchattr.recipes import tiny_gpt2, train_lm

    text = markov_text()
    train = text.train[:120]
    model, _ = train_lm(tiny_gpt2(vocab=text.vocab, seed=0), train, epochs=2)
    return model, train, text.queries[:10]


def fx_markov_lm(ns: dict) -> None:
    """The transformer LDS bench's model family, small: ``model`` (tiny Hugging Face GPT-2, 2 epochs
    on 120 Markov-text sequences), ``train`` (those sequences), ``queries`` (10 query sequences),
    ``task`` (CausalLMTask) and ``collate`` (PadCollator)."""
    import sketchattr as sa

    model, train, queries = _markov_lm()
    ns.update(model=copy.deepcopy(model), train=train, queries=queries, task=sa.CausalLMTask(), collate=sa.PadCollator())


def fx_torchrun(ns: dict) -> None:
    """The environment torchrun gives a one-process job (RANK 0, WORLD_SIZE 1, MASTER_ADDR/PORT on a
    free local port), so ``dist.init_process_group(...)`` runs; the group is destroyed after the section."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    ns["__readme_env__"].update(env)  # set by the runner (monkeypatch), undone after the section


FIXTURES: dict[str, Callable[[dict], None]] = {
    "digits": fx_digits,
    "checkpoints": fx_checkpoints,
    "retraining": fx_retraining,
    "markov_lm": fx_markov_lm,
    "torchrun": fx_torchrun,
}


# ------------------------------------------------------------------------------- tests
def _compiled(code: str, first_line: int):
    """Code compiled so that tracebacks name README.md and its real line numbers."""
    return compile("\n" * (first_line - 1) + code, str(README), "exec")


def _fail(block: Block, what: str, exc: BaseException) -> None:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    readme_frames = [ln.replace(str(README), "README.md") for ln in tb.splitlines() if f'File "{README}"' in ln]
    hint = ""
    if isinstance(exc, NameError):
        hint = (f"\nhint: a name the block uses is not defined in its section; put a setup comment just before "
                f"the block: '{SETUP_OPEN} <fixtures> -->' (fixtures: {', '.join(sorted(FIXTURES))}) with any "
                "extra python lines before the '-->'")
    pytest.fail(f"{block.where()} failed in its {what}: {type(exc).__name__}: {exc}\n"
                f"{chr(10).join(readme_frames)}{hint}\n\n{tb}", pytrace=False)


def test_readme_blocks_are_all_collected():
    """No python block escapes the runner: every fence is parsed, setup comments are attached to a
    python block and name known fixtures."""
    assert not PARSED.problems, "\n".join(PARSED.problems)
    odd = [f"README.md line {ln}: ```{lang} looks like python; label it ```python (it then runs here) "
           "or ```bash / ```text" for ln, lang in PARSED.fences if PYTHON_LIKE.match(lang) and lang.lower() not in PYTHON_LANGS]
    assert not odd, "\n".join(odd)
    blocks = [b for s in PARSED.sections for b in s.blocks]
    assert len(blocks) == sum(lang.lower() in PYTHON_LANGS for _, lang in PARSED.fences) > 0
    unknown = [f"{b.where()}: unknown fixture {n!r} (known: {', '.join(sorted(FIXTURES))})"
               for b in blocks for n in b.fixtures if n not in FIXTURES]
    assert not unknown, "\n".join(unknown)


def test_parser_attaches_setup_and_flags_strays():
    """The runner's own parsing, on a small made-up README."""
    text = "\n".join([
        "intro", "```python", "a = 1", "```",
        "## One", "<!-- readme-setup: digits", "b = 2", "-->", "", "```python", "c = a", "```",
        "```bash", "ls", "```", "<!-- readme-setup: torchrun -->", "text between", "```python", "d = 1", "```",
        "```py", "e = 1", "```",
    ])
    parsed = parse_readme(text)
    (intro, one) = parsed.sections
    assert [b.line for b in intro.blocks] == [3] and intro.blocks[0].fixtures == ()
    first, second, third = one.blocks
    assert (first.line, first.fixtures, first.setup_code.strip(), first.setup_line) == (11, ("digits",), "b = 2", 7)
    assert second.fixtures == () and third.code == "e = 1"  # ```py counts as python
    assert len(parsed.problems) == 1 and "line 16" in parsed.problems[0]  # setup comment not next to its block


def test_docs_stand_alone():
    """The docs are the repository's own: no pointers outside it, and relative links resolve."""
    pages = [README, ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for pat in ("../shared", "/work/shared", "DESIGN.md", "BENCHMARKS.md"):
            if pat in text:
                bad.append(f"{page.relative_to(ROOT)} mentions {pat!r}")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (page.parent / target).exists():
                bad.append(f"{page.relative_to(ROOT)} links to missing {target!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("section", PARSED.sections, ids=lambda s: f"L{s.line}-{re.sub(r'[^a-z0-9]+', '-', s.title.lower()).strip('-')[:40]}")
def test_readme_section_runs(section: Section, tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    saved_threads = torch.get_num_threads()
    # one thread for torch and for the BLAS under scipy / numpy (threadpoolctl comes with
    # scikit-learn): on a shared 2-core machine two threads that wait for each other were up to
    # 100× slower (the LoRA fine-tune's steps; scipy's eigh of F̂ took 11-15 s instead of 0.3 s).
    # The README's results do not depend on it.
    torch.set_num_threads(1)
    blas_one_thread = threadpool_limits(1)
    ns: dict[str, Any] = {"__name__": "__readme__", "__readme_env__": {}}
    exec("import torch\nimport sketchattr as sa", ns)  # noqa: S102 - running the README is the test
    try:
        for block in section.blocks:
            t0 = time.perf_counter()
            failure = None
            try:
                for name in block.fixtures:
                    FIXTURES[name](ns)
                for key in ns["__readme_env__"]:
                    monkeypatch.setenv(key, ns["__readme_env__"][key])  # restored after the test
                if block.setup_code.strip():
                    exec(_compiled(block.setup_code, block.setup_line), ns)
            except Exception as exc:  # noqa: BLE001 - reported with the block's line
                failure = ("setup", exc)
            t1 = time.perf_counter()
            if failure is None:
                try:
                    exec(_compiled(block.code, block.line), ns)
                except Exception as exc:  # noqa: BLE001
                    failure = ("code", exc)
            if failure is not None:
                _fail(block, *failure)
            print(f"{block.where()}: setup {t1 - t0:.1f} s, block {time.perf_counter() - t1:.1f} s")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        blas_one_thread.restore_original_limits()
