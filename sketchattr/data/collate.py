"""Batching token sequences of different lengths: :class:`PadCollator`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["PadCollator"]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids")


@dataclass
class PadCollator:
    """``collate_fn`` that pads token sequences into one Hugging Face-style batch.

    An example is a dict with ``input_ids`` (a list of ints or a 1-D tensor) and optionally
    ``attention_mask``, ``labels`` (−100 where nothing is predicted), ``token_type_ids``,
    ``position_ids`` of the same length, and any other entries (stacked as they are); or just the
    token ids. Returns ``input_ids`` ``[B, L]`` (``pad_token_id`` on padding), ``attention_mask``
    (0 on padding), ``labels`` when any example has per-token labels (−100 on padding; one label
    per example, as for sequence classification, is stacked ``[B]``) and the rest, stacked.

    L is the longest example, rounded up to ``pad_to_multiple_of``, or ``max_length`` (a longer
    example raises unless ``truncate=True``). ``padding_side``: ``"right"`` or ``"left"``.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    truncate: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PadCollator got an empty list of examples")
        rows = [e if isinstance(e, dict) else {"input_ids": e} for e in examples]
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
        length = max(len(t) for t in ids)
        if self.max_length is not None:
            if length > self.max_length and not self.truncate:
                raise ValueError(f"an example has {length} tokens, more than max_length={self.max_length} "
                                 "(pass truncate=True to cut it)")
            length = self.max_length
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out: dict[str, Any] = {}
        scalar_labels = all("labels" in r and torch.as_tensor(r["labels"]).dim() == 0 for r in rows)
        with_labels = any("labels" in r for r in rows) and not scalar_labels
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0, "position_ids": 0}
        for key in _SEQUENCE_KEYS:
            if key == "labels" and not with_labels:
                continue
            if key not in ("input_ids", "attention_mask", "labels") and not any(key in r for r in rows):
                continue
            cols = []
            for r, t in zip(rows, ids):
                if key == "input_ids":
                    v = t
                elif key == "attention_mask":
                    v = torch.as_tensor(r.get("attention_mask", torch.ones(len(t))), dtype=torch.long).reshape(-1)
                elif key == "labels" and "labels" not in r:
                    v = t.clone()
                else:
                    v = torch.as_tensor(r[key], dtype=torch.long).reshape(-1)
                if len(v) != len(t):
                    raise ValueError(f"{key} has {len(v)} entries but input_ids has {len(t)}")
                cols.append(self._pad(v[:length], length, fill[key]))
            out[key] = torch.stack(cols)
        for key in rows[0]:
            if key not in _SEQUENCE_KEYS or (key == "labels" and scalar_labels):
                out[key] = torch.stack([torch.as_tensor(r[key]) for r in rows])
        return out

    def _pad(self, v: torch.Tensor, length: int, value: int) -> torch.Tensor:
        pad = v.new_full((length - len(v),), value)
        return torch.cat([v, pad]) if self.padding_side == "right" else torch.cat([pad, v])
