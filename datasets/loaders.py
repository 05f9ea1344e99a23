"""Data loaders built from the config (SPEC 2, 3): lists of images and targets per batch."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import build_dataset
from .transforms import build_transforms

__all__ = ["collate_fn", "build_train_loader", "build_test_loaders", "build_test_loader", "SeededSampler",
           "sample_seed", "InferenceBatchSampler"]


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


def image_aspect_ratios(dataset, indices: List[int]) -> np.ndarray:
    """Width / height of the given images, from their headers (no decode)."""
    from PIL import Image

    ratios = np.empty(len(indices), dtype=np.float64)
    for k, i in enumerate(indices):
        with Image.open(dataset.annotations[i]["img_path"]) as img:
            ratios[k] = img.size[0] / max(img.size[1], 1)
    return ratios


class InferenceBatchSampler(Sampler):
    """The batches of a test loader: this process's share of the images (every WORLD_SIZE-th
    image from its rank on), ``batch_size`` images a batch.

    With more than one image a batch, the share is ordered by aspect ratio first (as
    torchvision's GroupedBatchSampler groups images) so that the images of a batch pad little.
    ``batches`` lists the dataset indices of every batch: inference puts its outputs back in
    dataset order with it. One image a batch keeps dataset order."""

    def __init__(self, dataset, batch_size: int = 1, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"INPUT.BATCH_SIZE_TEST must be at least 1, got {batch_size}")
        indices = list(range(rank, len(dataset), world_size))
        if batch_size > 1 and indices:
            order = np.argsort(image_aspect_ratios(dataset, indices), kind="stable")
            indices = [indices[k] for k in order]
        self.batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    def __iter__(self):
        for batch in self.batches:
            yield list(batch)

    def __len__(self) -> int:
        return len(self.batches)


def build_test_loaders(cfg, distributed: Optional[bool] = None) -> Tuple[DataLoader, DataLoader]:
    """(gallery_loader, query_loader) over the test splits, BATCH_SIZE_TEST images a batch.

    Distributed (default: when torch.distributed runs), each process gets its share of the
    images; ``loader.batch_sampler.batches`` says which (see InferenceBatchSampler) and
    ``loader.dataset`` is the whole split."""
    from utils.dist import get_rank, get_world_size, is_distributed

    if distributed is None:
        distributed = is_distributed()
    rank, world = (get_rank(), get_world_size()) if distributed else (0, 1)
    transforms = build_transforms(False)
    loaders = []
    for split in ("gallery", "query"):
        dataset = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, transforms, split,
                                cache_dir=getattr(cfg.INPUT, "ANNOTATION_CACHE_DIR", None))
        sampler = InferenceBatchSampler(dataset, int(cfg.INPUT.BATCH_SIZE_TEST), rank, world)
        loaders.append(DataLoader(dataset, batch_sampler=sampler, **_loader_kwargs(cfg.INPUT.NUM_WORKERS_TEST)))
    return loaders[0], loaders[1]


# the name used in docs/ARCHITECTURE.md
build_test_loader = build_test_loaders
