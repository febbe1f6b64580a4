"""Datasets for benches."""
from .digits import DigitsSplit, load_digits_split

__all__ = ["DigitsSplit", "load_digits_split"]
