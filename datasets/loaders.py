"""Data loaders built from the config (SPEC 2, 3): lists of images and targets per batch."""

from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import build_dataset
from .transforms import build_transforms

__all__ = ["collate_fn", "build_train_loader", "build_test_loaders", "build_test_loader", "SeededSampler",
           "sample_seed"]


def collate_fn(batch):
    """[(img, target), ...] -> ((img, ...), (target, ...)): images keep their own sizes."""
    return tuple(zip(*batch))


# Batches each worker loads ahead (DataLoader's prefetch_factor): with NUM_WORKERS_TRAIN workers,
# up to workers x PREFETCH_FACTOR batches wait, enough to hide image decoding behind a GPU step.
PREFETCH_FACTOR = 2


def _loader_kwargs(num_workers: int) -> dict:
    """Workers, pinned memory when a GPU is there (faster, asynchronous host-to-device copies),
    workers kept alive between epochs, and prefetching."""
    kwargs = {"num_workers": int(num_workers), "collate_fn": collate_fn,
              "pin_memory": torch.cuda.is_available()}
    if int(num_workers) > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = PREFETCH_FACTOR
    return kwargs


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item `index` in `epoch` of a run seeded with `seed`."""
    mixed = (int(seed) * 1_000_003 + int(epoch)) * 2_000_003 + int(index)
    return mixed % (2**63 - 1)


class SeededSampler(Sampler):
    """Shuffles like DistributedSampler (a permutation drawn from SEED + epoch, split among the
    processes) and yields ``(index, seed)`` pairs: the dataset seeds its random transforms with
    `seed` (``sample_seed(SEED, epoch, index)``). The order of the samples and their augmentation
    are then a function of SEED, the epoch and the number of processes only: independent of the
    number of workers, of which worker loads what, and of resuming in the middle of a run.
    ``set_epoch(e)`` (called by the Trainer) selects the epoch."""

    def __init__(self, dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                       seed=int(seed), drop_last=False)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(self.epoch)

    def __iter__(self):
        for index in self.base:
            yield (int(index), sample_seed(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.base)


def build_train_loader(cfg, distributed: bool = False, drop_last: bool = True) -> DataLoader:
    """Shuffled training loader of cfg.INPUT.DATASET at cfg.INPUT.DATA_ROOT.

    The sampler (``loader.sampler``, a SeededSampler) shuffles from cfg.SEED and the epoch; call
    ``loader.sampler.set_epoch(e)`` before each epoch (the Trainer does). With ``distributed``
    each process gets its 1/WORLD_SIZE share of the permutation (torch.distributed must be
    initialised); BATCH_SIZE_TRAIN is per process. The dataset is ``loader.dataset``
    (``pid_to_class``, ``num_classes``). The last incomplete batch of an epoch is dropped, as
    the original's loader does (``drop_last=True``): it sets the number of steps per epoch, hence
    the length of the warm-up.
    """
    dataset = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, build_transforms(True), "train",
                            cache_dir=getattr(cfg.INPUT, "ANNOTATION_CACHE_DIR", None))
    replicas, rank = 1, 0
    if distributed:
        from utils.dist import get_rank, get_world_size

        replicas, rank = get_world_size(), get_rank()
    sampler = SeededSampler(dataset, seed=getattr(cfg, "SEED", 0), num_replicas=replicas, rank=rank)
    batch = int(cfg.INPUT.BATCH_SIZE_TRAIN)
    if drop_last and len(sampler) < batch:
        raise ValueError(
            f"{dataset.name} at {dataset.root}: {len(dataset)} training images ({len(sampler)} per process) "
            f"make no complete batch of INPUT.BATCH_SIZE_TRAIN = {batch}")
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        drop_last=drop_last,
        **_loader_kwargs(cfg.INPUT.NUM_WORKERS_TRAIN),
    )


def build_test_loaders(cfg) -> Tuple[DataLoader, DataLoader]:
    """(gallery_loader, query_loader), in dataset order, BATCH_SIZE_TEST images a batch."""
    transforms = build_transforms(False)
    loaders = []
    for split in ("gallery", "query"):
        dataset = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, transforms, split,
                                cache_dir=getattr(cfg.INPUT, "ANNOTATION_CACHE_DIR", None))
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
