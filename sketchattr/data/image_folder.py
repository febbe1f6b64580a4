"""Class-per-folder image datasets (ImageNet layout) read with PIL; torchvision is not needed.

Layout: ``root/<class>/<image>``. Classes are the sub-folders of ``root`` in sorted order
(label = position), images are the files with an image extension (:data:`IMG_EXTENSIONS`,
case-insensitive) anywhere below each class folder, sorted by path, so labels and row order
match ``torchvision.datasets.ImageFolder``. An empty root or class folder fails naming it.

Each item is ``(x float32 [3, crop, crop], y int64)``: :class:`CenterCropTransform` resizes the
shorter side to ``resize`` (PIL bilinear, as torchvision's ``Resize`` on PIL images), crops the
centre ``crop × crop`` (torchvision's rounding), scales to [0, 1] and normalises with the
ImageNet mean/std: the evaluation transform of the ImageNet examples (Resize 256, CenterCrop
224). The same code runs with or without torchvision, so rows do not depend on what is
installed. Pillow is required (``pip install pillow``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is installed wherever the tests run
        raise ImportError("reading image folders needs Pillow: pip install pillow") from exc
    return Image


def find_classes(root: "str | os.PathLike[str]", classes: Sequence[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """Class names and {class folder: label} for the folders under ``root``.

    classes: the label order to use (e.g. the train split's, for a validation folder); every
    folder of ``root`` must be one of them. Default: the sorted folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not found:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    if classes is None:
        return found, {c: i for i, c in enumerate(found)}
    label = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in label]
    if unknown:
        raise ValueError(f"class folders {unknown[:10]} of {root} are not among the {len(label)} given classes")
    return list(classes), {c: label[c] for c in found}


def find_images(root: "str | os.PathLike[str]", class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image file, classes in label order, paths sorted within a class."""
    samples = []
    for cls, label in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        folder = Path(root) / cls
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(folder, followlinks=True)
            for f in names if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise FileNotFoundError(f"class folder {folder} holds no image files (extensions: {', '.join(IMG_EXTENSIONS)})")
        samples += [(f, label) for f in files]
    return samples


class CenterCropTransform:
    """PIL image -> float32 tensor [3, crop, crop]: shorter side to ``resize``, centre crop,
    [0, 1], per-channel ``(x − mean) / std``. ``resize=None`` skips the resize."""

    def __init__(self, resize: int | None = 256, crop: int = 224,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        if crop < 1 or (resize is not None and resize < crop):
            raise ValueError(f"need 1 <= crop <= resize, got resize={resize}, crop={crop}")
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: Any) -> torch.Tensor:
        Image = _pil_image()
        image = image.convert("RGB")
        if self.resize is not None:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if w <= h else (new_long, self.resize)
            image = image.resize(size, Image.BILINEAR)
        w, h = image.size
        if w < self.crop or h < self.crop:
            raise ValueError(f"image of size {w}×{h} is smaller than the {self.crop}×{self.crop} crop")
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


class ImageFolderDataset(Dataset):
    """Lazy class-per-folder dataset: item i is ``(transform(image_i), label_i)``.

    transform: PIL image -> tensor (default ``CenterCropTransform()``: 224×224, ImageNet
    normalisation). classes: label order to follow (see :func:`find_classes`).

    Attributes (torchvision's names): ``classes``, ``class_to_idx``, ``samples`` [(path, label)],
    ``targets`` int64 [n] (used by ``sketchattr.sample.dataset_labels`` for stratified sampling).
    """

    def __init__(self, root: "str | os.PathLike[str]", transform: Callable[[Any], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.classes, self.class_to_idx = find_classes(self.root, classes)
        self.samples = find_images(self.root, self.class_to_idx)
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self.transform = transform or CenterCropTransform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        with _pil_image().open(path) as image:
            x = self.transform(image)
        return x, torch.tensor(label, dtype=torch.int64)
