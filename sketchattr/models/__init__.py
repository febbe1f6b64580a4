"""Model constructors."""
from .mlp import make_mlp

__all__ = ["make_mlp"]
