"""Shared builders for the training / command-line tests.

- ``mini_world(path)``: a synthetic world smaller than conftest's ``synthetic_root`` (10 CUHK-SYSU
  gallery images instead of 101, 8 PRW test frames instead of 30), for the tests that evaluate:
  inference over the gallery is what costs time on a CPU, and the protocols only need a few
  images. Same generator, same official layouts.
- ``small_opts(...)``: KEY VALUE pairs (as on a command line) making a run CPU-sized: native
  160 x 120 images, few proposals and RoIs, tiny OIM tables, ResNet-18 x0.5 without ImageNet
  weights, no worker processes.
- ``small_cfg(...)``: the same as a frozen CfgNode; ``write_yaml``: dump a config to a file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Dict, List, Sequence

import pytest

from configs import dump_config, load_config

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the importing test module with one intra-op thread, then restore the setting.

    These tests run whole models on tiny tensors; with two threads on two shared cores, every
    convolution waits for a descheduled sibling thread whenever another process is busy, which
    made a training step 10x slower (4 s instead of 0.4 s) on the project's machines. Import this
    fixture into a test module to use it (it is autouse there).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Sizes of the mini world (see module docstring); 4 labeled training identities per dataset.
MINI_WORLD_OPTIONS = dict(
    train_ids=4,
    test_ids=3,
    train_images=8,
    test_images=8,
    image_width=160,
    image_height=120,
    cuhk=dict(test_images=10),
)
MINI_WORLD_SEED = 3


def mini_world(path) -> pathlib.Path:
    """Write the mini world into ``path`` (``path/CUHK-SYSU``, ``path/PRW``) and return ``path``."""
    from tools import make_synthetic

    path = pathlib.Path(path)
    make_synthetic.generate(str(path), seed=MINI_WORLD_SEED, **MINI_WORLD_OPTIONS)
    return path


# CPU-sized settings, as (key, value) pairs; values are strings as on a command line.
SMALL_SETTINGS = (
    ("INPUT.MIN_SIZE", "120"),
    ("INPUT.MAX_SIZE", "160"),
    ("INPUT.BATCH_SIZE_TRAIN", "2"),
    ("INPUT.NUM_WORKERS_TRAIN", "0"),
    ("INPUT.NUM_WORKERS_TEST", "0"),
    ("MODEL.RPN.PRE_NMS_TOPN_TRAIN", "200"),
    ("MODEL.RPN.POST_NMS_TOPN_TRAIN", "100"),
    ("MODEL.RPN.PRE_NMS_TOPN_TEST", "100"),
    ("MODEL.RPN.POST_NMS_TOPN_TEST", "50"),
    ("MODEL.RPN.BATCH_SIZE_TRAIN", "64"),
    ("MODEL.ROI_HEAD.BATCH_SIZE_TRAIN", "32"),
    ("MODEL.ROI_HEAD.POS_FRAC_TRAIN", "0.25"),
    ("MODEL.ROI_HEAD.SCORE_THRESH_TEST", "0.05"),
    ("MODEL.ROI_HEAD.NMS_THRESH_TEST", "0.5"),
    ("MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST", "20"),
    ("MODEL.LOSS.LUT_SIZE", "8"),
    ("MODEL.LOSS.CQ_SIZE", "16"),
    ("BASELINE.BACKBONE_NAME", "resnet18_x05"),
    ("BASELINE.BACKBONE_PRETRAIN", "False"),
    ("BASELINE.FROZENBN2d", "False"),
    ("SOLVER.MAX_EPOCHS", "1"),
    ("SOLVER.MAX_ITERS_PER_EPOCH", "2"),
    ("SOLVER.LR_DECAY_MILESTONES", "[100]"),
    ("EVAL_START_EPOCH", "100"),
    ("TF_BOARD", "False"),
    ("DEVICE", "cpu"),
    ("SEED", "1"),
)


def data_root(world, dataset: str) -> str:
    return str(pathlib.Path(world) / dataset)


def small_opts(world, dataset: str = "CUHK-SYSU", output_dir=None, **overrides) -> List[str]:
    """KEY VALUE list for ``train_ddps.main`` / ``load_config``: SMALL_SETTINGS, the dataset of
    ``world`` and ``overrides`` (keys with ``__`` for dots: ``SOLVER__BASE_LR=0.01``)."""
    pairs: Dict[str, str] = dict(SMALL_SETTINGS)
    pairs["INPUT.DATASET"] = dataset
    pairs["INPUT.DATA_ROOT"] = data_root(world, dataset)
    if output_dir is not None:
        pairs["OUTPUT_DIR"] = str(output_dir)
    for key, value in overrides.items():
        pairs[key.replace("__", ".")] = str(value)
    out: List[str] = []
    for key, value in pairs.items():
        out += [key, value]
    return out


def small_cfg(world, dataset: str = "CUHK-SYSU", output_dir=None, **overrides):
    """The frozen config of ``small_opts``."""
    return load_config(None, small_opts(world, dataset, output_dir, **overrides))


def write_yaml(cfg, path) -> str:
    dump_config(cfg, path)
    return str(path)


def state_dicts_equal(a, b, path="") -> List[str]:
    """Names of the entries where two nested (state) dicts differ (tensors compared bitwise)."""
    import torch

    diffs: List[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            diffs.append(f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}")
        for k in set(a) & set(b):
            diffs += state_dicts_equal(a[k], b[k], f"{path}.{k}" if path else str(k))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{path}: lengths {len(a)} != {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                diffs += state_dicts_equal(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a) and torch.is_tensor(b):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diffs.append(path)
    elif a != b:
        diffs.append(f"{path}: {a!r} != {b!r}")
    return diffs


def files_under(folder, suffix: str = "") -> Sequence[str]:
    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(suffix)
    )


class Interrupted(Exception):
    """Raised by `straight_and_resumed` to stop a run at the start of its second epoch."""


def straight_and_resumed(straight_opts, resumed_opts, resumed_dir, monkeypatch):
    """Train a run of at least 2 epochs straight; train the same run in another folder, stopped at
    the start of epoch 1; disturb every RNG; continue it with `--resume --ckpt epoch_0.pth`.
    Returns the two final checkpoints (straight, resumed) and the straight run's epoch_0 one, as
    loaded dicts: a bitwise-exact resume gives equal dicts."""
    import random

    import numpy as np
    import torch

    import train_ddps
    from engine.trainer import Trainer

    train_ddps.main(list(straight_opts))
    real_train_epoch = Trainer.train_epoch

    def crash_at_epoch_1(self, epoch):
        if epoch == 1:
            raise Interrupted
        return real_train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_at_epoch_1)
    with pytest.raises(Interrupted):
        train_ddps.main(list(resumed_opts))
    monkeypatch.setattr(Trainer, "train_epoch", real_train_epoch)
    resumed_dir = pathlib.Path(resumed_dir)
    assert sorted(os.listdir(resumed_dir)) == ["config.yaml", "epoch_0.pth"]
    random.seed(987)
    np.random.seed(987)
    torch.manual_seed(987)
    torch.rand(1000)
    train_ddps.main(["--resume", "--ckpt", str(resumed_dir / "epoch_0.pth")] + list(resumed_opts))
    straight_dir = pathlib.Path(dict(zip(straight_opts[::2], straight_opts[1::2]))["OUTPUT_DIR"])

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=True)

    a, b, first = load(straight_dir / "epoch_1.pth"), load(resumed_dir / "epoch_1.pth"), load(straight_dir / "epoch_0.pth")
    # the config each checkpoint records: the same run's, but for the folder it was written to
    import yaml

    configs = [yaml.safe_load(ckpt.pop("config")) for ckpt in (a, b)]
    assert [c.pop("OUTPUT_DIR") for c in configs] == [str(straight_dir), str(resumed_dir)]
    assert configs[0] == configs[1]
    first.pop("config")
    return a, b, first
