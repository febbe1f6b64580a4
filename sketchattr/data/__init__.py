"""Datasets for benches and experiments (local files only; see :mod:`sketchattr.data.registry`)."""
from sketchattr.data.digits import DigitsSplit, load_digits_split
from sketchattr.data.image_folder import CenterCropTransform, ImageFolderDataset
from sketchattr.data.registry import DatasetSplit, available_datasets, load_dataset, subsample_index

__all__ = ["CenterCropTransform", "DatasetSplit", "ImageFolderDataset", "DigitsSplit", "available_datasets", "load_dataset", "load_digits_split", "subsample_index"]
