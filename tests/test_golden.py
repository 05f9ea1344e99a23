"""The project against the ORIGINAL release's own results (tests/data/golden, see its README).

The expected values were produced by the original DDPS code (its readers, its eval_func.py and its
FGD / DKD / relation losses) on inputs written independently of this project. They are facts about
the method: never regenerate them from this project's output and never loosen a tolerance to make
a test pass; if a value disagrees, the code is wrong.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from datasets import build_dataset
from engine.evaluation import eval_detection, eval_search_cuhk, eval_search_prw
from models.distill import DFDLoss, cd_loss, ld_loss

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "golden"
DATASETS = ("CUHK-SYSU", "PRW")
IMAGE_DIRS = {"CUHK-SYSU": ("Image", "SSM"), "PRW": ("frames",)}
PROTOCOL_TOL = 1e-9  # absolute, on fractions
LOSS_RTOL = 1e-4


def load_json(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# readers


READERS = load_json(GOLDEN / "readers" / "expected.json")


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("split", ("train", "gallery", "query"))
def test_readers_match_the_original(name, split):
    dataset = build_dataset(name, str(GOLDEN / "readers" / name), None, split)
    expected = READERS[name][split]
    if split == "query":  # a list in protocol order
        assert len(dataset.annotations) == len(expected)
        for anno, exp in zip(dataset.annotations, expected):
            assert anno["img_name"] == exp["img_name"]
            assert anno["boxes"].dtype == np.int32
            assert anno["boxes"].tolist() == exp["boxes"]
            for key in ("pids", "cam_id"):
                if key in exp:
                    got = anno[key].tolist() if key == "pids" else int(anno[key])
                    assert got == exp[key], (anno["img_name"], key)
        return
    got = {a["img_name"]: a for a in dataset.annotations}
    assert sorted(got) == sorted(expected)  # the same images kept, none dropped or added
    for img_name, exp in expected.items():
        anno = got[img_name]
        assert anno["boxes"].dtype == np.int32 and anno["pids"].dtype == np.int32
        assert anno["boxes"].tolist() == exp["boxes"], img_name
        assert anno["pids"].tolist() == exp["pids"], img_name
        if "cam_id" in exp:
            assert int(anno["cam_id"]) == exp["cam_id"], img_name


# ----------------------------------------------------------------------------------------------
# protocols


PROTOCOLS = load_json(GOLDEN / "protocols" / "expected.json")


@pytest.fixture(scope="module")
def protocol_world(tmp_path_factory):
    """Gallery and query datasets of both protocol sets, and the raw outputs per dataset.

    The annotation files are copied next to empty image folders (the readers need the folders;
    the protocols never open an image)."""
    root = tmp_path_factory.mktemp("golden_protocols")
    outputs = np.load(GOLDEN / "protocols" / "outputs.npz")
    world = {}
    for name in DATASETS:
        shutil.copytree(GOLDEN / "protocols" / name, root / name)
        (root / name).joinpath(*IMAGE_DIRS[name]).mkdir(parents=True, exist_ok=True)
        gallery = build_dataset(name, str(root / name), None, "gallery", check_images=False)
        query = build_dataset(name, str(root / name), None, "query", check_images=False)

        def field(key, n, name=name):
            return [outputs[f"{name}/{key}/{i}"] for i in range(n)]

        raw = dict(
            gallery_dets=field("gallery_dets", len(gallery)),
            gallery_feats=field("gallery_feats", len(gallery)),
            query_box_feats=field("query_box_feats", len(query)),
            query_dets=field("query_dets", len(query)),
            query_feats=field("query_feats", len(query)),
        )
        world[name] = (gallery, query, raw)
    return world


def _search_args(world, name):
    gallery, query, raw = world[name]
    return (gallery, query, raw["gallery_dets"], raw["gallery_feats"], raw["query_box_feats"],
            raw["query_dets"], raw["query_feats"])


def _assert_search(result, expected):
    assert abs(result["mAP"] - expected["mAP"]) <= PROTOCOL_TOL, (result["mAP"], expected["mAP"])
    np.testing.assert_allclose(np.asarray(result["accs"], dtype=np.float64), expected["accs"],
                               rtol=0, atol=PROTOCOL_TOL)


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("labeled_only", (False, True))
def test_detection_protocol_matches_the_original(protocol_world, name, labeled_only):
    gallery, _, raw = protocol_world[name]
    recall, ap = eval_detection(gallery, raw["gallery_dets"], det_thresh=0.01, labeled_only=labeled_only)
    expected = PROTOCOLS[f"{name}/det/labeled_only={labeled_only}"]
    np.testing.assert_allclose([recall, ap], expected, rtol=0, atol=PROTOCOL_TOL)


@pytest.mark.parametrize("gallery_size", (50, 100))
@pytest.mark.parametrize("cbgm", (False, True))
def test_cuhk_search_protocol_matches_the_original(protocol_world, gallery_size, cbgm):
    result = eval_search_cuhk(*_search_args(protocol_world, "CUHK-SYSU"), cbgm=cbgm, gallery_size=gallery_size)
    _assert_search(result, PROTOCOLS[f"CUHK-SYSU/search/gallery_size={gallery_size},cbgm={cbgm}"])


@pytest.mark.parametrize("ignore_cam_id", (True, False))
@pytest.mark.parametrize("cbgm", (False, True))
def test_prw_search_protocol_matches_the_original(protocol_world, ignore_cam_id, cbgm):
    result = eval_search_prw(*_search_args(protocol_world, "PRW"), cbgm=cbgm, ignore_cam_id=ignore_cam_id)
    _assert_search(result, PROTOCOLS[f"PRW/search/ignore_cam_id={ignore_cam_id},cbgm={cbgm}"])


def test_every_protocol_result_is_tested():
    """The twelve results of the golden file are all covered by the tests above."""
    covered = {f"{n}/det/labeled_only={lo}" for n in DATASETS for lo in (False, True)}
    covered |= {f"CUHK-SYSU/search/gallery_size={g},cbgm={c}" for g in (50, 100) for c in (False, True)}
    covered |= {f"PRW/search/ignore_cam_id={i},cbgm={c}" for i in (True, False) for c in (False, True)}
    assert covered == set(PROTOCOLS) and len(covered) == 12


# ----------------------------------------------------------------------------------------------
# distillation terms


LOSSES = load_json(GOLDEN / "losses" / "expected.json")


@pytest.fixture(scope="module")
def loss_inputs():
    data = np.load(GOLDEN / "losses" / "inputs.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


def _dfd(inputs, **weights):
    torch.manual_seed(0)  # the global term does not depend on the random conv_mask at init
    module = DFDLoss(inputs["fs"].shape[1], temp=0.5, **weights)
    boxes = [inputs["b0"], inputs["b1"]]
    size = tuple(int(v) for v in inputs["image_size"])
    with torch.no_grad():
        return float(module(inputs["fs"], inputs["ft"], boxes, size))


@pytest.mark.parametrize("term", ("fg", "bg", "attention", "global"))
def test_dfd_components_match_the_original(loss_inputs, term):
    weights = dict(alpha=0.0, beta=0.0, gamma=0.0, lam=0.0)
    weights[{"fg": "alpha", "bg": "beta", "attention": "gamma", "global": "lam"}[term]] = 1.0
    assert _dfd(loss_inputs, **weights) == pytest.approx(LOSSES[f"dfd_{term}"], rel=LOSS_RTOL)


def test_dfd_weighted_total_matches_the_original(loss_inputs):
    total = _dfd(loss_inputs, alpha=5e-5, beta=2.5e-5, gamma=5e-5, lam=5e-7)
    assert total == pytest.approx(LOSSES["dfd_total"], rel=LOSS_RTOL)


def test_ld_matches_the_original(loss_inputs):
    value = ld_loss(loss_inputs["ls"], loss_inputs["lt"], loss_inputs["lab"], alpha=1.0, beta=0.5, temperature=4.0)
    assert float(value) == pytest.approx(LOSSES["ld"], rel=LOSS_RTOL)


def test_cd_matches_the_original(loss_inputs):
    assert float(cd_loss(loss_inputs["es"], loss_inputs["et"])) == pytest.approx(LOSSES["cd_sum"], rel=LOSS_RTOL)
