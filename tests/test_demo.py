"""demo.py: single-model and distilled-student checkpoints, dataset images or images
given on the command line, clear errors."""

import json
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
    assert names == ["demo.jpg", "demo.json", "gallery_0.jpg", "gallery_1.jpg", "gallery_2.jpg", "gallery_3.jpg",
                     "query.jpg"]
    for name in names[2:]:
        assert _open(out / name).size == (WIDTH, HEIGHT)
    overview = _open(out / "demo.jpg")  # the pictures side by side, the legend below them
    assert overview.width == (WIDTH + GAP) * 5 - GAP and overview.height > HEIGHT + 40
    legend = np.asarray(overview, dtype=np.int32)[HEIGHT:]
    for colour in (demo.QUERY, demo.BEST, demo.OTHER, demo.TRUTH):  # a swatch of every colour
        assert (np.abs(legend - colour).sum(axis=-1) < 30).sum() > 20, colour

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
    summary = json.loads((out / "demo.json").read_text())
    assert summary["same_identity"] in (True, False) and f"query's identity (pid {int(query['pids'][0])}" in text
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
    assert sorted(os.listdir(out)) == ["demo.jpg", "demo.json", "gallery_0.jpg", "gallery_1.jpg", "query.jpg"]
    assert _open(out / "demo.jpg").width == (WIDTH + GAP) * 3 - GAP
    text = capsys.readouterr().out
    assert "identity of the best match: unknown" in text  # own pictures: no ground truth
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


@pytest.mark.parametrize("box, why", [
    (["-5", "10", "60", "100"], "outside (left)"),
    (["10", "10", "60", "121"], "outside (bottom)"),
    (["60", "10", "20", "100"], "inverted"),
    (["10", "50", "60", "50"], "empty"),
    (["nan", "10", "60", "100"], "not a number"),
])
def test_a_query_box_that_does_not_fit_is_refused_before_the_model_is_loaded(checkpoints, world, tmp_path, box, why):
    cfg_path, _ = checkpoints["single"]
    image = sorted((world / "CUHK-SYSU" / "Image" / "SSM").glob("*.jpg"))[0]
    # a checkpoint that does not exist: the box error must come first
    with pytest.raises(demo.DemoInputError, match=rf"--query-box .* does not fit the query image .*{image.name} "
                                                  rf"\({WIDTH} x {HEIGHT}\)"):
        demo.main(["--cfg", cfg_path, "--ckpt", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o"),
                   "--query", str(image), "--query-box", *box, "--gallery", str(image)])
    assert not (tmp_path / "o").exists()


def test_a_picture_that_is_not_an_image_is_named(checkpoints, world, tmp_path):
    cfg_path, _ = checkpoints["single"]
    image = sorted((world / "CUHK-SYSU" / "Image" / "SSM").glob("*.jpg"))[0]
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(demo.DemoInputError, match=r"cannot read image .*notes\.jpg"):
        demo.main(["--cfg", cfg_path, "--ckpt", str(tmp_path / "none.pth"), "--query", str(image),
                   "--query-box", "10", "10", "60", "100", "--gallery", str(text)])


def test_the_identity_verdict_follows_the_ground_truth():
    truth = demo.GroundTruth(pid=7, boxes=[np.array([[10, 10, 50, 90]], np.float32), np.zeros((0, 4), np.float32)])
    on_person = [(np.array([[12, 12, 50, 88], [100, 10, 140, 90]], np.float32), np.ones(2), np.array([0.9, 0.2])),
                 (np.array([[0, 0, 30, 60]], np.float32), np.ones(1), np.array([0.5]))]
    same, iou = demo.identity_verdict(on_person, demo.best_match(on_person), truth)
    assert same is True and iou == pytest.approx((38 * 76) / (40 * 80))
    elsewhere = [(on_person[0][0], np.ones(2), np.array([0.2, 0.9])), on_person[1]]
    assert demo.identity_verdict(elsewhere, demo.best_match(elsewhere), truth)[0] is False
    in_image_without_person = [on_person[0], (on_person[1][0], np.ones(1), np.array([0.95]))]
    assert demo.identity_verdict(in_image_without_person, demo.best_match(in_image_without_person), truth) == (False, 0.0)
    assert demo.identity_verdict(on_person, demo.best_match(on_person), None) == (None, None)
    assert "IS the query's identity" in demo.verdict_text(True, 0.9, truth)
    assert "NOT the query's identity" in demo.verdict_text(False, 0.1, truth)
