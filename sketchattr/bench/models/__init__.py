"""Model constructors (see :mod:`sketchattr.bench.models.registry` for ``make_model``)."""
from sketchattr.bench.models.gpt import GPTConfig, make_gpt
from sketchattr.bench.models.logistic import make_logistic
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.bench.models.music_transformer import MusicTransformer, make_music_transformer
from sketchattr.bench.models.registry import available_models, make_model, model_name_of
from sketchattr.bench.models.resnet import ResNet, load_weights, resnet50, tiny_resnet
from sketchattr.bench.models.resnet9 import ResNet9, make_resnet9

__all__ = [
    "GPTConfig", "MusicTransformer", "ResNet", "ResNet9", "available_models", "load_weights", "make_gpt", "make_logistic",
    "make_mlp", "make_model", "resnet50", "tiny_resnet",
    "make_music_transformer", "make_resnet9", "model_name_of",
]
