"""Content hashes stored with sketches: of a model's parameters (a changed model) and of a
dataset (rows of another dataset appended to a store)."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from sketchattr.featurize.selection import unwrap_model
from sketchattr.featurize.sharding import full_tensors


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) over every parameter and buffer's name, shape, dtype and values
    (of the module inside a DistributedDataParallel wrapper: wrapped or not, the same hash; of a
    ``fully_shard``-ed model's full parameters, gathered one at a time — sharded or not, the same
    hash, and every rank must call it)."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    for name, tensor in full_tensors([*model.named_parameters(), *model.named_buffers()]):
        t = tensor.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#: examples hashed by :func:`dataset_fingerprint`
FINGERPRINT_SAMPLE = 8


def dataset_fingerprint(dataset: Any) -> str:
    """``"n=<len>:<hash>"``: the dataset's length and a sha256 (first 16 hex digits) of the examples at
    ``FINGERPRINT_SAMPLE`` positions drawn with ``np.random.RandomState(0)`` (tensors, arrays, numbers,
    strings, and tuples/lists/dicts of them). Cheap, and a different dataset of the same length is
    caught unless it agrees on every sampled example."""
    n = len(dataset)
    h = hashlib.sha256()
    picks = np.sort(np.random.RandomState(0).choice(n, min(n, FINGERPRINT_SAMPLE), replace=False)) if n else []
    for i in picks:
        _update(h, dataset[int(i)])
    return f"n={n}:{h.hexdigest()[:16]}"


def _update(h: "hashlib._Hash", item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        h.update(f"t{tuple(t.shape)}{t.dtype}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes())
    elif isinstance(item, np.ndarray):
        h.update(f"a{item.shape}{item.dtype}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, dict):
        for key in sorted(item, key=str):
            h.update(str(key).encode())
            _update(h, item[key])
    elif isinstance(item, (tuple, list)):
        h.update(f"s{len(item)}".encode())
        for x in item:
            _update(h, x)
    else:
        h.update(repr(item).encode())
