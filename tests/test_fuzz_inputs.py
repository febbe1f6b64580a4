"""Bad inputs at every public entry point are refused by sketchattr's own checks — a ValueError,
TypeError or store error raised inside sketchattr with a message — never a torch/numpy internal
error from deep inside a computation, and never accepted silently."""
import traceback

import numpy as np
import pytest
import torch
from torch import nn

import sketchattr as sa

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
X, Y = torch.randn(12, 4), torch.randint(0, 3, (12,))


def _feat(**kw):
    return sa.Featurizer(MODEL, sa.ClassificationTask(), progress=False, **kw)


def _store():
    return _feat(projector="sjlt", m=8).featurize((X, Y))


CASES = {
    "labels out of range": lambda: _feat().train_rows((X, Y + 5)),
    "labels -100": lambda: _feat().train_rows((X, torch.full((12,), -100))),
    "float labels": lambda: _feat().train_rows((X, Y.float() + 0.5)),
    "labels [N, 2]": lambda: _feat().train_rows((X, torch.zeros(12, 2, dtype=torch.long))),
    "labels of another length": lambda: _feat().train_rows((X, Y[:5])),
    "modules=True": lambda: _feat(modules=True).train_rows((X, Y)),
    "modules=2.5": lambda: _feat(modules=2.5).train_rows((X, Y)),
    "modules=0": lambda: _feat(modules=0).train_rows((X, Y)),
    "modules=99": lambda: _feat(modules=99).train_rows((X, Y)),
    "modules unknown name": lambda: _feat(modules="nope").train_rows((X, Y)),
    "modules empty list": lambda: _feat(modules=[]).train_rows((X, Y)),
    "m=1e9": lambda: _feat(projector="sjlt", m=10**9).train_rows((X, Y)),
    "m=0": lambda: _feat(projector="sjlt", m=0),
    "m=-3": lambda: _feat(projector="gaussian", m=-3),
    "m missing": lambda: _feat(projector="gaussian"),
    "unknown projector": lambda: _feat(projector="countsketch", m=8),
    "batch_size=0": lambda: _feat(batch_size=0),
    "engine unknown": lambda: _feat(engine="jit"),
    "model not a module": lambda: sa.Featurizer("model", sa.ClassificationTask()),
    "task without methods": lambda: sa.Featurizer(MODEL, object()),
    "damping=-1": lambda: sa.SketchedInfluence(damping=-1.0),
    "damping=inf": lambda: sa.SketchedInfluence(damping=float("inf")),
    "damping=nan": lambda: sa.SketchedInfluence(damping=float("nan")),
    "damping=0": lambda: sa.SketchedInfluence(damping=0.0),
    "damping='big'": lambda: sa.SketchedInfluence(damping="big"),
    "method unknown": lambda: sa.SketchedInfluence(method="lanczos"),
    "rank=0": lambda: sa.SketchedInfluence(method="nystrom", rank=0),
    "a dataset where query rows go": lambda: sa.SketchedInfluence().fit(_store()).score((X, Y)),
    "query rows of another width": lambda: sa.SketchedInfluence().fit(_store()).score(torch.randn(3, 9)),
    "query rows with NaN": lambda: sa.SketchedInfluence().fit(_store()).score(torch.full((3, 8), float("nan"))),
    "top_k k=0": lambda: sa.SketchedInfluence().fit(_store()).top_k(torch.randn(3, 8), k=0),
    "top_k k too big": lambda: sa.SketchedInfluence().fit(_store()).top_k(torch.randn(3, 8), k=500),
    "score before fit": lambda: sa.SketchedInfluence().score(torch.randn(3, 8)),
    "empty store": lambda: sa.SketchedInfluence().fit(sa.MemoryStore()),
    "storage dtype unknown": lambda: sa.DiskStore("x.h5", storage_dtype="int8"),
    "lock_timeout ok, memory budget 0": lambda: _feat(memory_budget_gib=0),
    "blocks on a mixed sketch": lambda: sa.SketchedInfluence(method="blocks").fit(_store()),
    "max_rows=0": lambda: _feat().featurize((X, Y), max_rows=0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_by_our_own_check(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, TypeError, OSError, RuntimeError)) as info:
        CASES[name]()
    frames = traceback.extract_tb(info.value.__traceback__)
    raised_in = frames[-1].filename.replace("\\\\", "/")
    assert "/sketchattr/" in raised_in, f"{name}: raised by {raised_in}:{frames[-1].lineno}: {info.value}"
    assert len(str(info.value)) > 20, f"{name}: message too terse: {info.value!r}"
