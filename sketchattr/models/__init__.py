"""Model constructors (see :mod:`sketchattr.models.registry` for ``make_model``)."""
from .gpt import GPTConfig, make_gpt
from .logistic import make_logistic
from .mlp import make_mlp
from .music_transformer import MusicTransformer, make_music_transformer
from .registry import available_models, make_model, model_name_of
from .resnet import ResNet, load_weights, resnet50, tiny_resnet
from .resnet9 import ResNet9, make_resnet9

__all__ = [
    "GPTConfig", "MusicTransformer", "ResNet", "ResNet9", "available_models", "load_weights", "make_gpt", "make_logistic",
    "make_mlp", "make_model", "resnet50", "tiny_resnet",
    "make_music_transformer", "make_resnet9", "model_name_of",
]
