"""A content hash of a model's parameters, stored with sketches to catch a changed model."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from sketchattr.modules import unwrap_model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) over every parameter and buffer's name, shape, dtype and values
    (of the module inside a DistributedDataParallel wrapper: wrapped or not, the same hash)."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        t = tensor.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
