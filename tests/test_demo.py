"""demo.py (SPEC 8): single-model and distilled-student checkpoints, dataset images or images
given on the command line, clear errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from configs import load_config
from datasets import build_dataset
from models import build_model
from tests.helpers import mini_world, one_torch_thread, small_opts, write_yaml  # noqa: F401

WIDTH, HEIGHT = 160, 120  # the mini world's images
GAP = 8  # demo.jpg: the pictures side by side, 8 pixels apart


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mini_world(tmp_path_factory.mktemp("mini_world"))


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    """The same weights as a single-model checkpoint (BASELINE config) and as a distilled student
    ({"student", "fgd"} layout, DISTILLER.PROJECT config whose teacher checkpoint does not exist)."""
    folder = tmp_path_factory.mktemp("demo_ckpts")
    opts = small_opts(world, "CUHK-SYSU", folder / "out", MODEL__ROI_HEAD__DETECTIONS_PER_IMAGE_TEST=5)
    single_cfg = load_config(None, opts)
    student_cfg = load_config(None, opts + [
        "BASELINE.PROJECT", "False", "DISTILLER.PROJECT", "True", "DISTILLER.TYPE", "FGD_DKD_Relation",
        "DISTILLER.TEACHER.BACKBONE_NAME", "resnet50", "DISTILLER.TEACHER.CKPT", str(folder / "no_teacher.pth"),
        "DISTILLER.STUDENT.BACKBONE_NAME", "resnet18_x05", "DISTILLER.STUDENT.BACKBONE_PRETRAIN", "False",
        "DISTILLER.STUDENT.FROZENBN2d", "False"])
    torch.manual_seed(0)
    sd = build_model(single_cfg, "baseline").state_dict()
    torch.save({"model": sd, "epoch": 3}, folder / "single.pth")
    fgd = {f"loss_fgd_fpn_layer_{i}": {"conv_mask_s.weight": torch.zeros(1, 256, 1, 1)} for i in range(4)}
    torch.save({"model": {"student": sd, "fgd": fgd}, "epoch": 3}, folder / "student.pth")
    return {
        "single": (write_yaml(single_cfg, folder / "single.yaml"), str(folder / "single.pth")),
        "student": (write_yaml(student_cfg, folder / "student.yaml"), str(folder / "student.pth")),
    }


def _open(path):
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _result_lines(text):
    """The demo's report (per gallery image: detections and best similarity), paths cut off."""
    return [line.split(": ", 1)[-1] for line in text.splitlines() if line.startswith(("  ", "best match"))]


@pytest.mark.parametrize("kind", ["single", "student"])
def test_demo_on_the_configured_dataset(kind, checkpoints, world, tmp_path, capsys):
    cfg_path, ckpt = checkpoints[kind]
    out = tmp_path / "pictures"
    # the checkpoints are barely trained: draw every detection (--det-thresh 0) so there is a match
    overview = demo.main(["--cfg", cfg_path, "--ckpt", ckpt, "--out", str(out), "--det-thresh", "0"])
    assert overview == str(out / "demo.jpg")
    names = sorted(os.listdir(out))
    assert names == ["demo.jpg", "gallery_0.jpg", "gallery_1.jpg", "gallery_2.jpg", "gallery_3.jpg", "query.jpg"]
    for name in names:
        im = _open(out / name)
        assert im.size == ((WIDTH + GAP) * 5 - GAP, HEIGHT) if name == "demo.jpg" else (WIDTH, HEIGHT)

    # the query is the dataset's first query, drawn with its box (yellow-ish outline)
    query = build_dataset("CUHK-SYSU", str(world / "CUHK-SYSU"), None, "query").annotations[0]
    x1, y1, x2, y2 = (int(v) for v in query["boxes"][0])
    drawn = np.asarray(_open(out / "query.jpg"), dtype=np.int32)
    original = np.asarray(_open(query["img_path"]), dtype=np.int32)
    edge = drawn[y1 + 2: y2 - 2, x1 + 1]  # the box's left side, inside the 3-pixel outline
    assert np.abs(edge - [255, 200, 0]).mean() < 40
    assert np.abs(drawn - original).mean() > 0.5
    text = capsys.readouterr().out
    assert text.count("detections") == 4 and "best match" in text
    # the student layout gives exactly what the same weights give as a single model
    if kind == "student":
        single_cfg, single_ckpt = checkpoints["single"]
        demo.main(["--cfg", single_cfg, "--ckpt", single_ckpt, "--out", str(tmp_path / "single"), "--det-thresh", "0"])
        assert _result_lines(capsys.readouterr().out) == _result_lines(text)


def test_demo_with_images_on_the_command_line(checkpoints, world, tmp_path, capsys):
    cfg_path, ckpt = checkpoints["student"]
    gallery = build_dataset("CUHK-SYSU", str(world / "CUHK-SYSU"), None, "gallery").annotations
    query_img = gallery[0]["img_path"]
    box = [float(v) for v in gallery[0]["boxes"][0]]
    out = tmp_path / "cli"
    demo.main(["--cfg", cfg_path, "--ckpt", ckpt, "--out", str(out), "--det-thresh", "0", "--query", query_img,
               "--query-box", *map(str, box), "--gallery", gallery[1]["img_path"], gallery[2]["img_path"]])
    assert sorted(os.listdir(out)) == ["demo.jpg", "gallery_0.jpg", "gallery_1.jpg", "query.jpg"]
    assert _open(out / "demo.jpg").size == ((WIDTH + GAP) * 3 - GAP, HEIGHT)
    text = capsys.readouterr().out
    assert gallery[1]["img_path"] in text and gallery[2]["img_path"] in text
    assert f"query {query_img}" in text

    missing = str(tmp_path / "nowhere" / "gallery.jpg")
    with pytest.raises(FileNotFoundError, match="image not found: .*nowhere/gallery.jpg"):
        demo.main(["--cfg", cfg_path, "--ckpt", ckpt, "--out", str(tmp_path / "x"), "--query", query_img,
                   "--query-box", *map(str, box), "--gallery", missing])
    assert not (tmp_path / "x").exists()
    # a query image without its box: a usage error, before any model is built
    with pytest.raises(SystemExit):
        demo.main(["--cfg", cfg_path, "--ckpt", ckpt, "--query", query_img, "--gallery", query_img])
    assert "--query-box" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        demo.main(["--cfg", cfg_path, "--ckpt", str(tmp_path / "none.pth"), "--out", str(tmp_path / "y")])


def test_demo_ranks_only_detections_from_the_threshold_on(checkpoints, world, tmp_path, capsys):
    """Detections below --det-thresh are neither drawn nor ranked (the search protocol's 0.5)."""
    cfg_path, ckpt = checkpoints["single"]
    counts = {}
    for thresh in ("0", "0.5", "1.01"):
        demo.main(["--cfg", cfg_path, "--ckpt", ckpt, "--out", str(tmp_path / thresh), "--det-thresh", thresh])
        text = capsys.readouterr().out
        counts[thresh] = sum(int(line.split(": ")[1].split()[0]) for line in text.splitlines()
                             if line.startswith("  ") and "detections" in line)
    assert counts["0"] >= counts["0.5"] >= counts["1.01"] == 0
    assert counts["0"] > 0
