"""Data loaders built from the config (SPEC 2, 3): lists of images and targets per batch."""

from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader

from . import build_dataset
from .transforms import build_transforms

__all__ = ["collate_fn", "build_train_loader", "build_test_loaders", "build_test_loader"]


def collate_fn(batch):
    """[(img, target), ...] -> ((img, ...), (target, ...)): images keep their own sizes."""
    return tuple(zip(*batch))


def _loader_kwargs(num_workers: int) -> dict:
    kwargs = {"num_workers": int(num_workers), "collate_fn": collate_fn,
              "pin_memory": torch.cuda.is_available()}
    if int(num_workers) > 0:
        kwargs["persistent_workers"] = True
    return kwargs


def build_train_loader(cfg, distributed: bool = False, drop_last: bool = False) -> DataLoader:
    """Shuffled training loader of cfg.INPUT.DATASET at cfg.INPUT.DATA_ROOT.

    With ``distributed`` a DistributedSampler shuffles (call ``loader.sampler.set_epoch(e)``).
    The dataset is ``loader.dataset`` (``pid_to_class``, ``num_classes``).
    """
    dataset = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, build_transforms(True), "train")
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True) if distributed else None
    return DataLoader(
        dataset,
        batch_size=int(cfg.INPUT.BATCH_SIZE_TRAIN),
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        **_loader_kwargs(cfg.INPUT.NUM_WORKERS_TRAIN),
    )


def build_test_loaders(cfg) -> Tuple[DataLoader, DataLoader]:
    """(gallery_loader, query_loader), in dataset order, BATCH_SIZE_TEST images a batch."""
    transforms = build_transforms(False)
    loaders = []
    for split in ("gallery", "query"):
        dataset = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, transforms, split)
        loaders.append(
            DataLoader(
                dataset,
                batch_size=int(cfg.INPUT.BATCH_SIZE_TEST),
                shuffle=False,
                **_loader_kwargs(cfg.INPUT.NUM_WORKERS_TEST),
            )
        )
    return loaders[0], loaders[1]


# the name used in docs/ARCHITECTURE.md
build_test_loader = build_test_loaders
