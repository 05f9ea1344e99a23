"""Test-time batching and sharding (datasets.loaders.InferenceBatchSampler, engine.inference):

- every image is run exactly once over all processes, each process gets a disjoint share;
- one image a batch (the default) keeps dataset order and gives exactly what a loop of
  single-image forwards written here gives;
- several images a batch are grouped by aspect ratio and their outputs come back in dataset
  order, equal to one image a batch up to float rounding when the images need no padding.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.loaders import InferenceBatchSampler, build_test_loaders
from engine.inference import run_inference
from models import build_model
from tests.helpers import mini_world, one_torch_thread, small_cfg  # noqa: F401  (autouse fixture)


class _Images:
    def __init__(self, folder, sizes):
        self.annotations = []
        for i, (w, h) in enumerate(sizes):
            path = folder / f"{i}.jpg"
            Image.new("RGB", (w, h), (i * 7 % 255, 90, 30)).save(path)
            self.annotations.append({"img_path": str(path)})

    def __len__(self):
        return len(self.annotations)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_image_once_in_disjoint_shares_grouped_by_aspect_ratio(tmp_path, world, batch):
    rng = np.random.default_rng(world * 10 + batch)
    sizes = [(int(w), int(h)) for w, h in zip(rng.integers(40, 200, 23), rng.integers(40, 200, 23))]
    dataset = _Images(tmp_path, sizes)
    ratios = np.array([w / h for w, h in sizes])
    seen = []
    for rank in range(world):
        sampler = InferenceBatchSampler(dataset, batch, rank, world)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(1 <= len(b) <= batch for b in batches)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(rank, len(sizes), world))  # its share, every image once
        if batch == 1:
            assert flat == list(range(rank, len(sizes), world))  # dataset order
        else:
            assert np.all(np.diff(ratios[flat]) >= 0)  # similar shapes share a batch
        seen += flat
    assert sorted(seen) == list(range(len(sizes)))
    with pytest.raises(ValueError, match="BATCH_SIZE_TEST must be at least 1"):
        InferenceBatchSampler(dataset, 0)


def _reference_outputs(model, gallery, query):
    """One forward per image, in dataset order, written from the model's interface."""
    g_dets, g_feats, q_feats = [], [], []
    with torch.no_grad():
        for i in range(len(gallery)):
            img, _ = gallery[i]
            out = model([img])[0]
            g_dets.append(torch.cat([out["boxes"], out["scores"][:, None]], 1).numpy())
            g_feats.append(out["embeddings"].reshape(len(out["boxes"]), -1).numpy())
        for i in range(len(query)):
            img, target = query[i]
            out = model([img], [target], query_img_as_gallery=True)[0]
            q_feats.append(out["embeddings"].reshape(len(out["boxes"]), -1).numpy())
    return g_dets, g_feats, q_feats


@pytest.fixture(scope="module")
def model_and_cfg(tmp_path_factory):
    world = mini_world(tmp_path_factory.mktemp("mini_world"))
    cfg = small_cfg(world, "CUHK-SYSU", None, MODEL__ROI_HEAD__SCORE_THRESH_TEST=0.0)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _inference(model, cfg, batch):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.BATCH_SIZE_TEST = batch
    gallery, query = build_test_loaders(cfg)
    return run_inference(model, gallery, query, torch.device("cpu"), progress=False), gallery, query


def test_one_image_a_batch_is_exactly_a_loop_of_single_forwards(model_and_cfg):
    model, cfg = model_and_cfg
    raw, gallery, query = _inference(model, cfg, 1)
    g_dets, g_feats, q_feats = _reference_outputs(model, gallery.dataset, query.dataset)
    assert sum(len(d) for d in g_dets) > 5 * len(g_dets)  # many detections to compare
    for got, want in ((raw["gallery_dets"], g_dets), (raw["gallery_feats"], g_feats), (raw["query_feats"], q_feats)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.array_equal(a, b)
    assert all(np.array_equal(f[:1], b) for f, b in zip(raw["query_feats"], raw["query_box_feats"]))


def test_batched_outputs_come_back_in_dataset_order(model_and_cfg):
    model, cfg = model_and_cfg
    one, _, _ = _inference(model, cfg, 1)
    many, gallery, _ = _inference(model, cfg, 3)
    assert len(gallery.batch_sampler) < len(gallery.dataset)  # batches of several images ran
    # the synthetic images share one size: no padding, so only float rounding may differ
    for key in ("gallery_dets", "gallery_feats", "query_dets", "query_feats", "query_box_feats"):
        assert len(one[key]) == len(many[key])
        for a, b in zip(one[key], many[key]):
            assert a.shape == b.shape, key
            assert np.allclose(a, b, atol=1e-3, rtol=1e-3), (key, np.abs(a - b).max())
