"""Person-search datasets read from the official CUHK-SYSU and PRW layouts (SPEC 3, 10).

``build_dataset(name, root, transforms, split)`` -> a ``PersonSearchDataset`` with ``name``,
``root``, ``split``, ``img_prefix`` and ``annotations``; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Callable, Optional

from .base import (
    SPLITS,
    UNLABELED_PID,
    DatasetError,
    DatasetFileNotFoundError,
    PersonSearchDataset,
)
from .cuhk_sysu import CUHKSYSU, CUHKProtocol
from .prw import PRW

__all__ = [
    "UNLABELED_PID",
    "SPLITS",
    "DATASETS",
    "DatasetError",
    "DatasetFileNotFoundError",
    "PersonSearchDataset",
    "CUHKSYSU",
    "CUHKProtocol",
    "PRW",
    "build_dataset",
    "build_transforms",
    "collate_fn",
    "build_train_loader",
    "build_test_loaders",
    "build_test_loader",
    "dataset_statistics",
    "format_statistics_table",
]

DATASETS = {"CUHK-SYSU": CUHKSYSU, "PRW": PRW}
_ALIASES = {"CUHKSYSU": "CUHK-SYSU", "CUHK": "CUHK-SYSU", "PRW": "PRW"}


def canonical_name(name: str) -> Optional[str]:
    """"CUHK-SYSU" / "PRW" for a dataset name (case, '-' and '_' ignored), None if unknown."""
    return _ALIASES.get(str(name).upper().replace("_", "").replace("-", ""))


def build_dataset(
    name: str,
    root: str,
    transforms: Optional[Callable] = None,
    split: str = "train",
    check_images: bool = True,
    cache_dir: Optional[str] = None,
) -> PersonSearchDataset:
    """Build one split ("train" | "gallery" | "query") of "CUHK-SYSU" or "PRW" read from ``root``.

    Every image is checked to exist and have a readable header unless ``check_images`` is False.
    Parsed annotation files are kept in ``cache_dir`` (None: the default folder, see
    ``datasets.parse_cache``; "none": not kept) and re-used while the files are unchanged.
    Raises ValueError for an unknown name or split, DatasetFileNotFoundError / DatasetError
    (a ValueError) naming the file for missing or malformed files.
    """
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    return DATASETS[key](root, transforms, split, check_images=check_images, cache_dir=cache_dir)


from .loaders import build_test_loader, build_test_loaders, build_train_loader, collate_fn  # noqa: E402
from .stats import dataset_statistics, format_statistics_table  # noqa: E402
from .transforms import build_transforms  # noqa: E402
