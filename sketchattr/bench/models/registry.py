"""``make_model(name, split, seed)``: the experiment models, sized from a :class:`DatasetSplit`.

| name | model | for |
| --- | --- | --- |
| ``lr`` | Flatten + Linear(prod(input_shape), num_classes) | classification |
| ``mlp`` | ``make_mlp(prod(input_shape), hidden=128, num_classes)``, preceded by Flatten for non-flat inputs (digits: exactly the bench MLP, 9,610 params, same init as ``make_mlp(seed=seed)``) | classification |
| ``resnet9`` | :class:`~sketchattr.bench.models.resnet9.ResNet9` (``width=16``) | images [C, H, W] |
| ``musictransformer`` | :class:`~sketchattr.bench.models.music_transformer.MusicTransformer` (2 layers, d_model 64, 4 heads, max_len = T) | token LM |
| ``gpt`` | :func:`~sketchattr.bench.models.gpt.make_gpt` (a preset, default ``gpt-14m``: 6 layers, d_model 384, 6 heads; vocab and seq_len from the split) | token LM |

The returned module carries ``sketchattr_model_name`` (the registry name), which
:func:`sketchattr.bench.train.train_model` uses to pick its default recipe.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from sketchattr.bench.models.gpt import make_gpt
from sketchattr.bench.models.logistic import make_logistic
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.bench.models.music_transformer import MusicTransformer, make_music_transformer
from sketchattr.bench.models.resnet9 import ResNet9, make_resnet9

if TYPE_CHECKING:
    from sketchattr.bench.data.registry import DatasetSplit


def _need_classes(name: str, split: "DatasetSplit") -> int:
    if split.num_classes is None:
        raise ValueError(f"model {name!r} needs a classification split; {split.name!r} has num_classes=None")
    return int(split.num_classes)


def _lr(split: "DatasetSplit", seed: int) -> nn.Module:
    return make_logistic(math.prod(split.input_shape), _need_classes("lr", split), seed=seed)


def _mlp(split: "DatasetSplit", seed: int, hidden: Any = 128) -> nn.Module:
    mlp = make_mlp(math.prod(split.input_shape), hidden, _need_classes("mlp", split), seed=seed)
    return mlp if len(split.input_shape) == 1 else nn.Sequential(nn.Flatten(), *mlp)


def _resnet9(split: "DatasetSplit", seed: int, width: int = 16) -> nn.Module:
    if len(split.input_shape) != 3:
        raise ValueError(f"resnet9 needs image inputs [C, H, W]; {split.name!r} has input_shape {split.input_shape}")
    return make_resnet9(_need_classes("resnet9", split), in_channels=split.input_shape[0], width=width, seed=seed)


def _music_transformer(split: "DatasetSplit", seed: int, **kwargs: Any) -> nn.Module:
    if split.vocab_size is None:
        raise ValueError(f"musictransformer needs a token split with vocab_size; {split.name!r} has none")
    kwargs.setdefault("max_len", split.input_shape[-1])
    return make_music_transformer(split.vocab_size, seed=seed, **kwargs)


def _gpt(split: "DatasetSplit", seed: int, preset: str = "gpt-14m", **dims: Any) -> nn.Module:
    if split.vocab_size is None:
        raise ValueError(f"gpt needs a token split with vocab_size; {split.name!r} has none")
    return make_gpt(preset, seed=seed, **{"vocab": split.vocab_size, "seq_len": split.input_shape[-1], **dims})


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lr": _lr, "mlp": _mlp, "resnet9": _resnet9, "musictransformer": _music_transformer, "gpt": _gpt,
}


def available_models() -> list[str]:
    """Names accepted by :func:`make_model`."""
    return list(_BUILDERS)


def make_model(name: str, split: "DatasetSplit", seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``split`` after ``torch.manual_seed(seed)`` (float32, train mode).

    kwargs: ``hidden`` (mlp), ``width`` (resnet9), ``max_len`` / ``d_model`` / ``n_heads`` /
    ``n_layers`` (musictransformer), ``preset`` / ``d_model`` / ``n_layer`` / ``n_head`` (gpt).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    torch.manual_seed(seed)
    model = _BUILDERS[name](split, seed, **kwargs)
    model.sketchattr_model_name = name
    return model


def model_name_of(model: nn.Module) -> str | None:
    """The registry name of ``model``: its ``sketchattr_model_name``, else guessed from its type."""
    name = getattr(model, "sketchattr_model_name", None)
    if name is not None:
        return name
    if isinstance(model, ResNet9):
        return "resnet9"
    if isinstance(model, MusicTransformer):
        return "musictransformer"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears and all(isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Sequential)) for m in model.modules()):
        return "lr" if len(linears) == 1 else "mlp"
    return None
