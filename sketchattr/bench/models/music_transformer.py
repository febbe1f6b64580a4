"""A small decoder-only transformer LM for event tokens (MAESTRO-style), vmap-friendly.

Token + learned position embeddings, ``n_layers`` pre-LayerNorm blocks (hand-written causal
multi-head self-attention + GELU MLP), final LayerNorm, linear head to the vocabulary.
Built only from ``nn.Embedding`` / ``nn.Linear`` / ``nn.LayerNorm`` and tensor ops (no in-place ops,
no ``nn.MultiheadAttention`` / fused attention), so ``torch.func`` per-example gradients work.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask. [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, dh = self.n_heads, d // self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, dh).transpose(1, 2) for z in (q, k, v))  # [B, h, T, dh]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(dh)                     # [B, h, T, T]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MusicTransformer(nn.Module):
    """Decoder-only LM: tokens int64 [B, T] (T <= max_len) -> logits [B, T, vocab_size]."""

    def __init__(self, vocab_size: int, max_len: int = 64, d_model: int = 64, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.tok_emb = nn.Embedding(self.vocab_size, d_model)
        self.pos_emb = nn.Embedding(self.max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        positions = torch.arange(t, device=tokens.device).expand(tokens.shape)  # per example: hooks see [B, T]
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_music_transformer(vocab_size: int, max_len: int = 64, d_model: int = 64, n_heads: int = 4,
                           n_layers: int = 2, seed: int = 0) -> MusicTransformer:
    """``MusicTransformer`` built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MusicTransformer(vocab_size, max_len=max_len, d_model=d_model, n_heads=n_heads, n_layers=n_layers)
