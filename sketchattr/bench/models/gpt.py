"""GPT-style decoder-only LM configs and presets (the architecture is :class:`MusicTransformer`).

:class:`~sketchattr.bench.models.music_transformer.MusicTransformer` already is a GPT block stack
(token + learned position embeddings, pre-LN causal self-attention + GELU MLP, final LayerNorm,
linear head), vmap- and hook-friendly; this module only names its sizes:

| preset | vocab | seq_len | d_model | n_layer | n_head | params |
| --- | --- | --- | --- | --- | --- | --- |
| ``tiny`` | 64 | 16 | 32 | 2 | 2 | 30,144 |
| ``gpt-14m`` | 4096 | 64 | 384 | 6 | 6 | 13,821,952 |

``gpt-14m`` is the model of ``benchmarks/featurize_throughput.py`` and
``experiments/big_model_run.py``. Every Linear layer (4 per block + the head) can be sketched by
:class:`~sketchattr.project.FactorizedProjector`; embeddings and LayerNorms are not Linear.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from sketchattr.bench.models.music_transformer import MusicTransformer


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a GPT-style LM: tokens int64 [B, T <= seq_len] -> logits [B, T, vocab]."""

    vocab: int = 4096
    seq_len: int = 64
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 6

    def __post_init__(self) -> None:
        for name in ("vocab", "seq_len", "d_model", "n_layer", "n_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")

    @property
    def num_params(self) -> int:
        """Parameter count (closed form; equals ``sum(p.numel())`` of the built model)."""
        d, v = self.d_model, self.vocab
        block = 12 * d * d + 13 * d  # qkv 3d²+3d, proj d²+d, fc1 4d²+4d, fc2 4d²+d, two LayerNorms 4d
        return v * d + self.seq_len * d + self.n_layer * block + 2 * d + d * v + v

    @property
    def num_linear(self) -> int:
        """Linear layers (4 per block + the head): the modules a factorized sketch covers."""
        return 4 * self.n_layer + 1


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab=64, seq_len=16, d_model=32, n_layer=2, n_head=2),
    "gpt-14m": GPTConfig(vocab=4096, seq_len=64, d_model=384, n_layer=6, n_head=6),
}


def gpt_config(preset: "str | GPTConfig" = "gpt-14m", **overrides: Any) -> GPTConfig:
    """A preset by name (or a config) with fields replaced by ``overrides`` (``None`` values ignored)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown GPT preset {preset!r}; available: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return dataclasses.replace(preset, **{k: int(v) for k, v in overrides.items() if v is not None})


def make_gpt(config: "str | GPTConfig" = "gpt-14m", seed: int = 0, **overrides: Any) -> MusicTransformer:
    """The GPT-style LM of ``config`` (preset name or :class:`GPTConfig`, plus ``overrides``),
    built after ``torch.manual_seed(seed)`` (float32, train mode)."""
    cfg = gpt_config(config, **overrides)
    torch.manual_seed(seed)
    model = MusicTransformer(cfg.vocab, max_len=cfg.seq_len, d_model=cfg.d_model, n_heads=cfg.n_head, n_layers=cfg.n_layer)
    model.sketchattr_model_name = "gpt"
    return model
