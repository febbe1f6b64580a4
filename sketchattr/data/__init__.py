"""Datasets for benches and experiments (local files only; see :mod:`sketchattr.data.registry`)."""
from .digits import DigitsSplit, load_digits_split
from .image_folder import CenterCropTransform, ImageFolderDataset
from .registry import DatasetSplit, available_datasets, load_dataset, subsample_index

__all__ = ["CenterCropTransform", "DatasetSplit", "ImageFolderDataset", "DigitsSplit", "available_datasets", "load_dataset", "load_digits_split", "subsample_index"]
