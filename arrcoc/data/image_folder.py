"""A folder of your own images (one sub-folder per class, as torchvision's ``ImageFolder`` reads it) as tensors.

    folder = read_image_folder("photos/", backbone.preprocess, limit=1000)
    folder.images      # (N, C, H, W), preprocessed the way the backbone expects
    folder.labels      # (N,) index of each image's class in folder.classes (sorted sub-folder names)
    queries = cyclic_queries(read_query_file("queries.txt"), len(folder))   # optional: (N, 384) embeddings

The images are read once, through the backbone's own preprocessing, and kept in memory: the relevance
module trains for several epochs on them and the evaluation runs every budget on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from tqdm import tqdm

from .tasks import shared_text_encoder

PROGRESS_FROM = 200  # images; smaller folders are read without a progress bar


@dataclass
class FolderImages:
    """The readable images of a folder, preprocessed; ``skipped``: files that could not be decoded."""

    root: Path
    images: Tensor
    labels: Tensor
    classes: list[str]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def folder_classes(root: str | Path) -> list[str]:
    """The class names of the folder ``root`` (its sub-folders, sorted), without reading any image: what a
    classification head built for the folder needs to know first."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected a folder with one sub-folder of "
                                f"images per class)")
    if not any(child.is_dir() for child in root.iterdir()):
        raise ValueError(f"image folder {root} has no class sub-folders: expected one sub-folder of images per "
                         f"class (e.g. {root}/cat/1.jpg, {root}/dog/2.jpg)")
    return find_classes(root)[0]


def _sample(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the images to read: all, or ``limit`` of them drawn at random (the folder is sorted by class,
    so its first images would all be of one class), in folder order."""
    if limit is not None and limit < 1:
        raise ValueError(f"the number of images to read must be >= 1, got {limit}")
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def _decode(path: str) -> Image.Image | None:
    """The image at ``path`` in RGB, or None if it cannot be decoded (a corrupt or mislabelled file)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        return None


def read_image_folder(root: str | Path, preprocess: Callable[[Image.Image], Tensor], limit: int | None = None,
                      seed: int = 0) -> FolderImages:
    """The images of ``root`` (``root/CLASS/IMAGE``), each through ``preprocess`` (PIL RGB image -> (C, H, W)).

    Args:
        root: the folder; its sub-folders, sorted by name, are the classes (labels 0, 1, ...).
        preprocess: the backbone's preprocessing (resize, crop, normalise).
        limit: read at most this many images, a random sample drawn from ``seed`` (default: every image).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no class sub-folders, or a class (among the images read) without one readable image.
    """
    root = Path(root)
    folder_classes(root)  # the folder's own errors first
    dataset = ImageFolder(str(root), allow_empty=True)  # an index of files; nothing is decoded yet
    chosen = _sample(len(dataset.samples), limit, seed)
    images, labels, skipped = [], [], []
    for index in tqdm(chosen, desc=f"reading {root}", leave=False, disable=len(chosen) < PROGRESS_FROM):
        path, label = dataset.samples[index]
        image = _decode(path)
        if image is None:
            skipped.append(path)
            continue
        images.append(preprocess(image))
        labels.append(label)
    _check_every_class_read(root, dataset.classes, labels, limit is not None)
    return FolderImages(root, torch.stack(images), torch.tensor(labels), list(dataset.classes), skipped)


def _check_every_class_read(root: Path, classes: list[str], labels: list[int], sampled: bool) -> None:
    """Refuse a folder in which a class has no readable image: its label would silently never occur."""
    present = set(labels)
    empty = [name for index, name in enumerate(classes) if index not in present]
    if not empty or (sampled and labels):
        return  # a random sample may miss a class of a large folder; that is the sample, not the folder
    raise ValueError(f"class folder(s) {[str(root / name) for name in empty]} hold no readable image: expected "
                     f"image files ({', '.join(IMG_EXTENSIONS)}) in every class folder")


def read_query_file(path: str | Path) -> list[str]:
    """The query sentences of a text file, one a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query file {path} not found (expected a text file, one query sentence a line)")
    sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"query file {path} holds no sentence (expected one query sentence a line)")
    return sentences


def cyclic_queries(sentences: list[str], count: int) -> Tensor:
    """(count, 384) MiniLM embeddings of ``sentences`` taken in turn, image i getting sentence i mod len: each
    sentence is embedded once."""
    embeddings = shared_text_encoder()(sentences)
    return embeddings[torch.arange(count) % len(sentences)]
