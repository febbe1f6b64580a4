"""The benches' models: MLP, logistic regression, ResNet-9, ResNet-50 (torchvision's keys), GPT
presets and the Music Transformer; ``make_model`` picks one by name (:mod:`.registry`).

Part of the bench zoo (:mod:`sketchattr.bench`): may import every stage.
"""
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
