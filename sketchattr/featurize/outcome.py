"""What a featurize pass hands back: its summary (:class:`FeaturizeRun`) and the refusal of
non-finite rows (:func:`check_finite`; every projector maps a NaN/inf coordinate into its row)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FeaturizeRun", "NonFiniteGradientError", "check_finite"]


class NonFiniteGradientError(ValueError):
    """A per-example gradient contained NaN or inf."""


@dataclass(frozen=True)
class FeaturizeRun:
    """What one :meth:`Featurizer.featurize` call did: ``rows`` computed and written,
    ``remaining`` planned rows still missing (> 0 when it stopped at ``max_rows`` /
    ``max_seconds``; calling again resumes), ``seconds`` of wall time."""

    rows: int
    remaining: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.remaining == 0


def check_finite(rows: torch.Tensor, indices: np.ndarray, kind: str) -> None:
    """Refuse rows ``[B, m]`` with a NaN/inf coordinate, naming their dataset ``indices`` ``[B]``."""
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        rows = indices[bad.cpu().numpy()].tolist()
        raise NonFiniteGradientError(
            f"non-finite (NaN/inf) {kind} gradient for dataset row(s) {rows[:10]}"
            + (" ..." if len(rows) > 10 else "")
            + ": check the inputs and the loss of these examples"
        )
