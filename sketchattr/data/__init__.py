"""Users' data as datasets: padding of token batches, local files and image folders, safe unpickling.

* :class:`PadCollator` — pads token sequences of different lengths (attention mask, labels −100).
* :mod:`sketchattr.data.local_files` — ``.pt`` / ``.npz`` / ``.csv`` / ``.jsonl`` / image folders /
  ``datasets.save_to_disk`` folders as datasets (what the command line reads).
* :class:`ImageFolderDataset` — class-per-folder images (PIL), :class:`CenterCropTransform`.
* :mod:`sketchattr.data.safe_pickle` — pickled arrays through an allow-list: no data file runs code.

May import :mod:`sketchattr.core` only. The benches' datasets (digits, MNIST, CIFAR-2, MAESTRO,
Markov text) are in :mod:`sketchattr.bench.data`.
"""
from sketchattr.data.collate import PadCollator
from sketchattr.data.image_folder import CenterCropTransform, ImageFolderDataset

__all__ = ["CenterCropTransform", "ImageFolderDataset", "PadCollator"]
