"""The saved stages of :func:`~sketchattr.curvature.factors.fit_factors`: one file per stage, checked before use.

Stages (``kfac``: covariance → eigen; ``ekfac``: covariance → eigen → correction;
``diagonal``: diagonal, :data:`STAGES`) are saved under a folder as ``<stage>.pt`` (``torch.save`` of
``{"stage", "metadata" (JSON text), "tensors": {module: {name: tensor}}}``, read back with
``torch.load(weights_only=True)``), written atomically (a temporary file renamed into place). A
stage is loaded only if its metadata equals the fit's; files fitted with other settings raise
:class:`FactorsMismatchError` naming every difference, unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STAGES: dict[str, tuple[str, ...]] = {
    "kfac": ("covariance", "eigen"),
    "ekfac": ("covariance", "eigen", "correction"),
    "diagonal": ("diagonal",),
}


class FactorsMismatchError(ValueError):
    """Saved factors were fitted with other settings (model, modules, kind, Fisher, ...)."""


def stage_files(path: "str | os.PathLike[str]") -> dict[str, Path]:
    """{stage: its file under the folder ``path``} for every stage of every kind."""
    names = {s for stages in STAGES.values() for s in stages}
    return {s: Path(path) / f"{s}.pt" for s in sorted(names)}


def merge(tensors: dict[str, dict[str, torch.Tensor]], stage: dict[str, dict[str, torch.Tensor]]) -> None:
    """Add a stage's ``{module: {name: tensor}}`` to ``tensors`` (in place)."""
    for name, t in stage.items():
        tensors.setdefault(name, {}).update(t)


def save_stage(file: Path, stage: str, meta: dict[str, Any], tensors: dict) -> None:
    """Write ``stage``'s tensors and the fit's metadata to ``file``, atomically."""
    tmp = file.with_suffix(".pt.tmp")
    torch.save({"stage": stage, "metadata": json.dumps(meta, sort_keys=True), "tensors": tensors}, tmp)
    os.replace(tmp, file)


def _read(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise FactorsMismatchError(f"cannot read factor stage file {file}: {exc}; delete it or pass overwrite=True") from exc


def _differences(saved: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(meta))
    return [f"{k}: saved {saved.get(k)!r}, requested {meta.get(k)!r}" for k in keys if saved.get(k) != meta.get(k)]


def check_existing(files: dict[str, Path], meta: dict[str, Any], overwrite: bool) -> None:
    """Every stage file already in the folder must match ``meta`` (unless ``overwrite``)."""
    if overwrite:
        return
    for stage, file in files.items():
        if file.exists():
            diff = _differences(json.loads(_read(file)["metadata"]), meta)
            if diff:
                raise FactorsMismatchError(
                    f"factors under {file.parent} were fitted with other settings (stage {stage!r}):\n  "
                    + "\n  ".join(diff)
                    + "\nUse another path, or pass overwrite=True to recompute them."
                )


def load_stage(file: Path, stage: str, meta: dict[str, Any], overwrite: bool) -> dict | None:
    """``stage``'s tensors saved in ``file`` for a fit with metadata ``meta``; None when there is no
    file, or (with ``overwrite``) when it holds another stage or another fit's."""
    if not file.exists():
        return None
    payload = _read(file)
    if payload.get("stage") != stage or _differences(json.loads(payload["metadata"]), meta):
        if overwrite:
            return None
        check_existing({stage: file}, meta, overwrite=False)
        raise FactorsMismatchError(f"{file} does not hold stage {stage!r}")
    return payload["tensors"]
