"""Model constructors (see :mod:`sketchattr.models.registry` for ``make_model``)."""
from .logistic import make_logistic
from .mlp import make_mlp
from .music_transformer import MusicTransformer, make_music_transformer
from .registry import available_models, make_model, model_name_of
from .resnet import ResNet, load_weights, resnet50, tiny_resnet
from .resnet9 import ResNet9, make_resnet9

__all__ = [
    "MusicTransformer", "ResNet", "ResNet9", "load_weights", "resnet50", "tiny_resnet", "available_models", "make_logistic", "make_mlp", "make_model",
    "make_music_transformer", "make_resnet9", "model_name_of",
]
