"""Common parts of the person-search datasets (SPEC 3 and 10, docs/ARCHITECTURE.md).

A dataset reads the official release files of its split when it is built and keeps
``annotations``: one dict per image (``img_name``, ``img_path``, ``boxes`` int32 (n, 4) x1 y1 x2 y2,
``pids`` int32 (n,), and ``cam_id`` for PRW). Every problem found in the files is raised at build
time as a :class:`DatasetError` (a ValueError) naming the file and what was expected; a missing file
or folder raises :class:`DatasetFileNotFoundError` (both a DatasetError and a FileNotFoundError).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError

UNLABELED_PID = 5555
SPLITS = ("train", "gallery", "query")

__all__ = [
    "UNLABELED_PID",
    "SPLITS",
    "DatasetError",
    "DatasetFileNotFoundError",
    "PersonSearchDataset",
    "match_rows",
    "xywh_to_xyxy",
]


class DatasetError(UserError, ValueError):
    """A dataset file is malformed or inconsistent; the message names the file."""


class DatasetWarning(UserWarning):
    """Something in a dataset file is odd but readable (e.g. an identity box matching no box)."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file or folder is missing; the message names it."""


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetFileNotFoundError(f"missing {what}: {path} (no such directory)")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"missing {what}: {path}")
    return path


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) x, y, w, h -> x1, y1, x2, y2 (same dtype)."""
    boxes = np.asarray(boxes)
    out = boxes.copy()
    out[:, 2:] = boxes[:, :2] + boxes[:, 2:]
    return out


def match_rows(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each row of ``queries`` the index of the first equal row of ``table``, -1 if none.

    Both are integer matrices with the same number of columns. Vectorised with np.unique.
    """
    table = np.asarray(table, dtype=np.int64).reshape(len(table), -1)
    queries = np.asarray(queries, dtype=np.int64).reshape(len(queries), -1)
    if len(queries) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(table) == 0:
        return np.full(len(queries), -1, dtype=np.int64)
    both = np.concatenate([table, queries], axis=0)
    _, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(table)
    first = np.full(inverse.max() + 1, -1, dtype=np.int64)
    # assigning in reverse order leaves the first occurrence
    first[inverse[:n][::-1]] = np.arange(n - 1, -1, -1)
    return first[inverse[n:]]


def check_image_files(paths: List[str], cache_dir: Optional[str] = None, name: str = "images") -> None:
    """Check that every image exists, that its header can be read and that it is complete (a
    JPEG or PNG ends with its end marker; no full decode).

    A list that passed is remembered in the annotation cache (``datasets.parse_cache``) with
    every file's size and modification time: an unchanged list is not opened again."""
    from .parse_cache import load_or_parse

    try:  # the cache's look at every file (os.stat) is also the check that it exists
        load_or_parse(paths, lambda: _check_headers(paths), f"image_headers.{name}", cache_dir=cache_dir)
    except FileNotFoundError as exc:
        missing = next((p for p in paths if not os.path.isfile(p)), exc.filename)
        raise DatasetFileNotFoundError(f"missing image file: {missing}") from exc


# How a complete file of these formats ends. A JPEG ends with its end-of-image marker FF D9 (it
# cannot occur inside the compressed data, where FF is always followed by 00 or a restart
# marker), a PNG with its IEND chunk. Writers may pad a few bytes after it, so the marker is
# looked for in the last END_WINDOW bytes. A file cut short (an interrupted copy or download)
# has a valid header and decodes until the cut, so the header alone does not show it.
END_MARKERS = {"JPEG": (b"\xff\xd9", "its end-of-image marker FF D9"), "PNG": (b"IEND", "its IEND chunk")}
END_WINDOW = 64


def _is_complete(path: str, fmt: Optional[str]) -> bool:
    if fmt not in END_MARKERS:
        return True
    marker = END_MARKERS[fmt][0]
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - END_WINDOW, 0))
        return marker in f.read()


def _check_headers(paths: List[str]) -> list:
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetFileNotFoundError(f"missing image file: {path}")
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
                fmt = img.format
        except Exception as exc:
            raise DatasetError(f"unreadable image file {path}: {exc}") from exc
        if width <= 0 or height <= 0:
            raise DatasetError(f"unreadable image file {path}: empty image ({width}x{height})")
        if not _is_complete(path, fmt):
            raise DatasetError(f"truncated image file {path}: a {fmt} file ends with {END_MARKERS[fmt][1]}, "
                               f"this one stops before it (an interrupted copy or download?); replace it "
                               f"with a complete copy")
    return []  # nothing to keep but the fact that the list passed


def load_image(path: str) -> Image.Image:
    """Decode an image as RGB; a decoding problem raises a DatasetError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetFileNotFoundError(f"missing image file: {path}") from exc
    except Exception as exc:
        raise DatasetError(f"cannot decode image file {path}: {exc}") from exc


class PersonSearchDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``name`` and implement ``_load_annotations``.

    ``dataset[i]`` -> ``(image, target)``: image a float tensor 3 x H x W in [0, 1] (after
    ``transforms``), target ``{"boxes": float32 (n, 4), "labels": int64 (n,), "img_name": str}``.
    For the training split the labels are the contiguous classes + 1 (``pid_to_class``), the
    unlabeled boxes keep 5555; other splits give the dataset pids.
    """

    name: str = ""

    def __init__(
        self,
        root: str,
        transforms: Optional[Callable] = None,
        split: str = "train",
        check_images: bool = True,
        cache_dir: Optional[str] = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
        self.root = str(root)
        self.transforms = transforms
        self.split = split
        # where parsed annotation files are kept between builds (datasets.parse_cache)
        self.cache_dir = cache_dir
        require_dir(self.root, f"{self.name} dataset root")
        self.img_prefix = self._image_dir()
        require_dir(self.img_prefix, f"{self.name} image folder")
        self.annotations: List[Dict] = self._load_annotations()
        if check_images:
            check_image_files([a["img_path"] for a in self.annotations], cache_dir=cache_dir,
                              name=f"{self.name}.{split}")
        self.pid_to_class: Dict[int, int] = {}
        self.num_classes = 0
        self._labels: Optional[List[np.ndarray]] = None
        if split == "train":
            self._build_classes()

    # subclasses ---------------------------------------------------------------------------
    def _image_dir(self) -> str:
        raise NotImplementedError

    def _load_annotations(self) -> List[Dict]:
        raise NotImplementedError

    # training classes ---------------------------------------------------------------------
    def _build_classes(self) -> None:
        all_pids = (
            np.concatenate([a["pids"] for a in self.annotations])
            if self.annotations
            else np.zeros(0, dtype=np.int32)
        )
        labeled = np.unique(all_pids[all_pids != UNLABELED_PID]).astype(np.int64)
        self.pid_to_class = {int(p): i for i, p in enumerate(labeled)}
        self.num_classes = len(labeled)
        self._labels = []
        for anno in self.annotations:
            pids = anno["pids"].astype(np.int64)
            cls = np.searchsorted(labeled, pids) + 1
            self._labels.append(np.where(pids == UNLABELED_PID, UNLABELED_PID, cls))

    # torch Dataset ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index):
        """``index`` is an int, or ``(index, seed)`` as the training loader's sampler yields it:
        then the random transforms draw from a torch RNG seeded with ``seed`` (the global RNG
        state is left as it was), so augmentation depends on the seed only, not on the worker
        or process that loads the sample."""
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        anno = self.annotations[index]
        img = load_image(anno["img_path"])  # the only decode of this image in the step
        labels = self._labels[index] if self._labels is not None else anno["pids"]
        target = {
            "boxes": torch.as_tensor(anno["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1),
            "img_name": anno["img_name"],
        }
        if self.transforms is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                img, target = self.transforms(img, target)
        elif self.transforms is not None:
            img, target = self.transforms(img, target)
        else:
            from .transforms import to_tensor

            img = to_tensor(img)
        return img, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"root={self.root!r}, images={len(self)})"
        )
