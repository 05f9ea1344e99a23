"""The training loader (datasets/loaders.py): shuffling and augmentation reproducible from SEED and
the epoch whatever the number of workers or processes, per-process shares, worker settings, one
image decode per sample."""

from types import SimpleNamespace

import pytest
import torch

import datasets.base
from datasets import build_dataset
from datasets.loaders import SeededSampler, build_train_loader, sample_seed
from datasets.transforms import build_transforms


def _cfg(root, seed=1, workers=0, batch=3):
    return SimpleNamespace(
        SEED=seed,
        INPUT=SimpleNamespace(DATASET="CUHK-SYSU", DATA_ROOT=str(root), BATCH_SIZE_TRAIN=batch,
                              BATCH_SIZE_TEST=1, NUM_WORKERS_TRAIN=workers, NUM_WORKERS_TEST=0),
    )


def test_the_last_incomplete_batch_is_dropped(synthetic_root):
    """As the original's loader (drop_last=True): 20 images in batches of 3 give 6 full batches
    an epoch (2 images left out, others each epoch); no complete batch at all is an error."""
    root = synthetic_root / "CUHK-SYSU"
    loader = build_train_loader(_cfg(root, batch=3))
    assert len(loader) == 6
    seen = []
    for e in (0, 1):
        names = [n for n, _, _ in _epoch(loader, e)]
        assert len(names) == 18 == len(set(names))
        seen.append(set(names))
    assert seen[0] != seen[1]
    with pytest.raises(ValueError, match="20 training images.*no complete batch of INPUT.BATCH_SIZE_TRAIN = 21"):
        build_train_loader(_cfg(root, batch=21))


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    items = []
    for images, targets in loader:
        for img, tgt in zip(images, targets):
            items.append((tgt["img_name"], img, tgt["boxes"]))
    return items


def _same(a, b):
    return len(a) == len(b) and all(
        n1 == n2 and torch.equal(i1, i2) and torch.equal(b1, b2) for (n1, i1, b1), (n2, i2, b2) in zip(a, b))


def test_order_and_flips_follow_seed_and_epoch_not_workers(synthetic_root):
    root = synthetic_root / "CUHK-SYSU"
    main = build_train_loader(_cfg(root, workers=0, batch=4))  # 20 images: 5 full batches
    workers = build_train_loader(_cfg(root, workers=2, batch=4))
    assert workers.persistent_workers and workers.prefetch_factor == 2
    assert workers.pin_memory == torch.cuda.is_available()
    epochs_main = [_epoch(main, e) for e in (0, 1)]
    torch.manual_seed(1234)  # the global RNG plays no part
    epochs_workers = [_epoch(workers, e) for e in (0, 1)]
    assert _same(epochs_main[0], epochs_workers[0]) and _same(epochs_main[1], epochs_workers[1])
    # a resumed run builds a new loader and starts at epoch 1: it sees the same epoch 1
    assert _same(_epoch(build_train_loader(_cfg(root, batch=4)), 1), epochs_main[1])
    names = [[n for n, _, _ in ep] for ep in epochs_main]
    assert sorted(names[0]) == sorted(names[1]) and names[0] != names[1]  # reshuffled each epoch
    other_seed = [n for n, _, _ in _epoch(build_train_loader(_cfg(root, seed=2, batch=4)), 0)]
    assert other_seed != names[0]
    # flips happen (p = 0.5) and move the boxes with the image
    plain = build_dataset("CUHK-SYSU", str(root), build_transforms(False), "train")
    by_name = {a["img_name"]: i for i, a in enumerate(plain.annotations)}
    flipped = 0
    for name, img, boxes in epochs_main[0]:
        ref_img, ref_target = plain[by_name[name]]
        if torch.equal(img, ref_img):
            assert torch.equal(boxes, ref_target["boxes"])
        else:
            assert torch.equal(img, ref_img.flip(-1))
            flipped += 1
    assert 0 < flipped < len(epochs_main[0])


def test_processes_share_an_epoch_and_augment_alike(synthetic_root):
    dataset = build_dataset("CUHK-SYSU", str(synthetic_root / "CUHK-SYSU"), build_transforms(True), "train")
    single = SeededSampler(dataset, seed=7)
    shares = [SeededSampler(dataset, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for s in [single] + shares:
        s.set_epoch(3)
    whole = list(single)
    parts = [list(s) for s in shares]
    assert len(whole) == len(dataset) and sorted(i for i, _ in whole) == list(range(len(dataset)))
    assert [len(p) for p in parts] == [len(dataset) // 2] * 2 and len(shares[0]) == len(dataset) // 2
    assert sorted(i for p in parts for i, _ in p) == list(range(len(dataset)))
    # an item gets the same augmentation seed whatever the number of processes
    assert {i: s for i, s in whole} == {i: s for p in parts for i, s in p}
    assert all(s == sample_seed(7, 3, i) for i, s in whole)
    # and the dataset honours it: same seed, same sample; the global RNG is left alone
    index, seed = whole[0]
    state = torch.get_rng_state()
    a, b = dataset[(index, seed)], dataset[(index, seed)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_one_image_decode_per_sample(synthetic_root, monkeypatch):
    dataset = build_dataset("CUHK-SYSU", str(synthetic_root / "CUHK-SYSU"), build_transforms(True), "train")
    opened = []
    real_open = datasets.base.Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(datasets.base.Image, "open", counting_open)
    converts = []
    real_convert = datasets.base.Image.Image.convert

    def counting_convert(self, *args, **kwargs):
        converts.append(args)
        return real_convert(self, *args, **kwargs)

    monkeypatch.setattr(datasets.base.Image.Image, "convert", counting_convert)
    dataset[(0, 5)]
    dataset[1]
    assert opened == [dataset.annotations[0]["img_path"], dataset.annotations[1]["img_path"]]
    assert len(converts) <= 2  # at most the decode's own RGB conversion, never a second one
