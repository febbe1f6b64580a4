"""The label mapping of a store: which class name is which class id.

``build`` records it in the run spec (``data.classes``: names in id order, or None when the
training labels were integer ids; ``data.classes_source``: where it came from) and prints it;
``score`` and ``select`` read every query/target file with it. ``--classes a b c`` sets it at
build (the order gives the id); at score/select it names the ids of a store built from integer
labels, and must equal the stored mapping otherwise.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sketchattr.cli.config import CommandError

SHOWN = 20
"""Classes printed in a mapping before it is cut short."""


def add_classes_argument(g: Any, build: bool) -> None:
    """``--classes NAME ...`` (build: sets the mapping; score/select: names a store's integer ids)."""
    help_text = ("class names in class-id order (the first is class 0): how string labels and class folders map to the "
                 "model's outputs (default: sorted names, printed)") if build else (
                 "class names in class-id order for query files with string labels, when the store was built from "
                 "integer labels (otherwise the store's mapping is used; a different one is refused)")
    g.add_argument("--classes", nargs="+", type=str, default=None, metavar="NAME", help=help_text)


def check_classes(classes: Sequence[str] | None) -> list[str] | None:
    """``--classes`` as a list, refusing a name given twice."""
    if classes is None:
        return None
    names = [str(c) for c in classes]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise CommandError(f"--classes names {twice} more than once; each class needs one id")
    return names


def mapping_text(classes: Sequence[str]) -> str:
    """``cat=0, dog=1`` (cut after :data:`SHOWN` classes)."""
    text = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:SHOWN]))
    return text + (f", ... ({len(classes)} classes)" if len(classes) > SHOWN else "")


def classes_source(given: Sequence[str] | None, train: Any) -> str | None:
    """Where the build's mapping came from: ``--classes``, the training file's sorted label
    names or class folders, or None (integer ids, no names)."""
    if given is not None:
        return "--classes"
    if train.classes is None:
        return None
    what = "class folders" if train.source == "image_folder" else "label names"
    return f"sorted {what} of {train.path.name}"


def label_line(classes: Sequence[str] | None, source: str | None, labels: np.ndarray | None, file: str) -> str:
    """What ``build`` prints about the labels (classification only)."""
    if classes is not None:
        hint = "" if source == "--classes" else "; override with --classes"
        return f"labels: {mapping_text(classes)} (from {source}{hint})"
    if labels is None or len(labels) == 0:
        return f"labels: none in {file}"
    distinct = np.unique(labels)
    return (f"labels: integer class ids {int(distinct.min())}..{int(distinct.max())} as stored in {file} "
            f"({len(distinct)} distinct; name them with --classes)")


def resolve_classes(data: dict[str, Any], given: Sequence[str] | None) -> list[str] | None:
    """The mapping for a later command's files: the stored one, or ``--classes`` when the store
    has none; a ``--classes`` that differs from the stored mapping is refused."""
    given = check_classes(given)
    stored = data.get("classes")
    if given is None or stored is None:
        return given if given is not None else stored
    if list(stored) != given:
        source = data.get("classes_source") or "its build"
        raise CommandError(f"--classes {' '.join(given)} differs from the store's label mapping {mapping_text(stored)} "
                           f"(from {source}): its rows were computed with those class ids. Drop --classes, or rebuild the "
                           "store with `sketchattr build --classes ...`")
    return given

