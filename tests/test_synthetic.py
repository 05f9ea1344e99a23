"""The synthetic generator: file structures as loadmat returns the released files, read back with
the readers, protocol invariants and determinism."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import scipy.io

from datasets import UNLABELED_PID, build_dataset
from datasets.prw import BOX_KEYS
from tools import make_synthetic

TINY = dict(
    train_ids=3, test_ids=3, train_images=5, test_images=6, image_width=96, image_height=72,
    gallery_sizes=(2, 50), cameras=3,
)

TINY_NO_SIZES = {k: v for k, v in TINY.items() if k != "gallery_sizes"}


def build(root, name, split):
    return build_dataset(name, str(root / name), None, split)


def test_cuhk_files_have_release_structure(synthetic_root, synthetic_options):
    ann = synthetic_root / "CUHK-SYSU" / "annotation"
    img = scipy.io.loadmat(str(ann / "Images.mat"))["Img"]
    n_images = synthetic_options["train_images"] + synthetic_options["cuhk"]["test_images"]
    assert img.shape == (1, n_images) and set(img.dtype.names) == {"imname", "nAppear", "box"}
    first = img[0, 0]
    assert first["imname"].dtype.kind == "U" and first["imname"].shape == (1,)
    assert first["nAppear"].shape == (1, 1)
    assert first["box"].shape == (1, int(first["nAppear"][0, 0]))
    assert set(first["box"].dtype.names) == {"idlocate", "ishard"}
    assert first["box"][0, 0]["idlocate"].shape == (1, 4)
    pool = scipy.io.loadmat(str(ann / "pool.mat"))["pool"]
    assert pool.shape == (101, 1) and pool.dtype == object and str(pool[0, 0][0]).endswith(".jpg")
    train = scipy.io.loadmat(str(ann / "test" / "train_test" / "Train.mat"))["Train"]
    assert train.shape == (synthetic_options["train_ids"], 1) and train.dtype == object
    assert train[0, 0].shape == (1, 1) and set(train[0, 0].dtype.names) == {"idname", "nAppear", "scene"}
    scene = train[0, 0][0, 0]["scene"]
    assert scene.shape[0] == 1 and set(scene.dtype.names) == {"imname", "idlocate", "ishard"}
    for size in (50, 100):
        t = scipy.io.loadmat(str(ann / "test" / "train_test" / f"TestG{size}.mat"))[f"TestG{size}"]
        assert t.shape == (1, synthetic_options["test_ids"])
        assert t[0, 0]["Query"].shape == (1, 1)
        assert set(t[0, 0]["Query"].dtype.names) == {"imname", "idlocate", "ishard", "idname"}
        gallery = t[0, 0]["Gallery"]
        assert gallery.shape == (1, size)
        sizes = [g["idlocate"].size for g in gallery[0]]
        assert sizes[0] == 4 and sizes[-1] == 0  # the person first, then absent entries


def test_prw_files_have_release_structure(synthetic_root, synthetic_options):
    root = synthetic_root / "PRW"
    train = scipy.io.loadmat(str(root / "frame_train.mat"))["img_index_train"]
    test = scipy.io.loadmat(str(root / "frame_test.mat"))["img_index_test"]
    assert train.shape == (synthetic_options["train_images"], 1) and train.dtype == object
    assert test.shape == (synthetic_options["test_images"], 1)
    name = str(train[0, 0][0])
    assert name.startswith("c") and "s" in name and not name.endswith(".jpg")
    keys = set()
    negative = 0
    for n in [str(v[0]) for v in np.concatenate([train.ravel(), test.ravel()])]:
        data = scipy.io.loadmat(str(root / "annotations" / f"{n}.jpg.mat"))
        key = next(k for k in BOX_KEYS if k in data)
        keys.add(key)
        assert data[key].ndim == 2 and data[key].shape[1] == 5
        negative += int((data[key][:, 1:3] < 0).sum())
    assert keys == set(BOX_KEYS)
    assert negative > 0
    raw = (root / "query_info.txt").read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line.split()) == 6 for line in lines[:-1])
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_cuhk_read_back(synthetic_root, synthetic_options):
    train = build(synthetic_root, "CUHK-SYSU", "train")
    gallery = build(synthetic_root, "CUHK-SYSU", "gallery")
    query = build(synthetic_root, "CUHK-SYSU", "query")
    n_ids, n_q = synthetic_options["train_ids"], synthetic_options["test_ids"]
    assert len(train) == synthetic_options["train_images"]
    assert len(gallery) == synthetic_options["cuhk"]["test_images"]
    assert len(query) == n_q
    assert train.num_classes == n_ids and train.pid_to_class == {p: p - 1 for p in range(1, n_ids + 1)}
    train_pids = np.concatenate([a["pids"] for a in train.annotations])
    assert (train_pids == UNLABELED_PID).any()
    # every training identity in several images
    for pid in range(1, n_ids + 1):
        assert sum(pid in a["pids"] for a in train.annotations) >= make_synthetic.SynthOptions().train_appearances[0]
    assert [a["pids"].tolist() for a in query.annotations] == [[k + 1] for k in range(n_q)]
    # the query box is a box of the query image in the gallery split, with its pid
    index = {a["img_name"]: a for a in gallery.annotations}
    for k, q in enumerate(query.annotations):
        g = index[q["img_name"]]
        row = np.flatnonzero((g["boxes"] == q["boxes"][0]).all(axis=1))
        assert len(row) == 1 and g["pids"][row[0]] == k + 1
    train_names = {a["img_name"] for a in train.annotations}
    assert not train_names & set(index)


@pytest.mark.parametrize("size", [50, 100, -1])
def test_cuhk_protocol_invariants(synthetic_root, size):
    gallery = build(synthetic_root, "CUHK-SYSU", "gallery")
    query = build(synthetic_root, "CUHK-SYSU", "query")
    proto = gallery.load_protocol(size, query)
    n_g = len(gallery)
    q_count = len(query)
    expected_g = n_g - 1 if size == -1 else size
    assert proto.query_gallery.shape == (q_count, expected_g) and proto.query_gallery.dtype == np.int64
    names = np.array([a["img_name"] for a in gallery.annotations])
    for k in range(q_count):
        row = proto.query_gallery[k]
        assert len(set(row.tolist())) == len(row)
        # the query image is never in its own gallery
        assert query.annotations[k]["img_name"] not in set(names[row])
        gts = proto.gt_gallery[proto.gt_query == k]
        assert len(gts) >= 1
        holding = {i for i, a in enumerate(gallery.annotations) if k + 1 in a["pids"]}
        holding.discard(int(np.flatnonzero(names == query.annotations[k]["img_name"])[0]))
        assert set(gts.tolist()) == holding
        if size != -1:
            # the images with the person come first
            assert set(row[: len(gts)].tolist()) == holding
    # ground-truth boxes are the gallery boxes that carry the query's pid
    for q, g, box in zip(proto.gt_query, proto.gt_gallery, proto.gt_boxes):
        anno = gallery.annotations[g]
        match = (anno["boxes"] == box.astype(np.int32)).all(axis=1)
        assert match.any() and anno["pids"][match][0] == q + 1


def test_cuhk_protocols_nested(synthetic_root):
    gallery = build(synthetic_root, "CUHK-SYSU", "gallery")
    p50, p100 = gallery.load_protocol(50), gallery.load_protocol(100)
    assert (p100.query_gallery[:, :50] == p50.query_gallery).all()
    assert p50.gt_query.tolist() == p100.gt_query.tolist() == gallery.load_protocol(-1).gt_query.tolist()


def test_prw_read_back(synthetic_root, synthetic_options):
    train = build(synthetic_root, "PRW", "train")
    gallery = build(synthetic_root, "PRW", "gallery")
    query = build(synthetic_root, "PRW", "query")
    assert len(train) == synthetic_options["train_images"]
    assert len(gallery) == synthetic_options["test_images"]
    assert len(query) == synthetic_options["test_ids"]
    pids = sorted(train.pid_to_class)
    assert len(pids) == synthetic_options["train_ids"] == train.num_classes
    assert pids[-1] == 932 and pids != list(range(1, len(pids) + 1))  # not contiguous
    assert sorted(train.pid_to_class.values()) == list(range(train.num_classes))
    labels = np.concatenate([train[i][1]["labels"].numpy() for i in range(len(train))])
    assert set(labels[labels != UNLABELED_PID].tolist()) == set(range(1, train.num_classes + 1))
    assert (labels == UNLABELED_PID).any()
    for ds in (train, gallery, query):
        for a in ds.annotations:
            assert (a["boxes"] >= 0).all() and (a["boxes"][:, 2:] > a["boxes"][:, :2]).all()
    assert {a["cam_id"] for a in gallery.annotations} == set(range(1, 7))
    test_pids = set(np.concatenate([a["pids"] for a in gallery.annotations]).tolist()) - {UNLABELED_PID}
    assert not test_pids & set(pids)
    for q in query.annotations:
        pid = int(q["pids"][0])
        # the query box is a box of its frame, and the person is seen by another camera
        frame = next(a for a in gallery.annotations if a["img_name"] == q["img_name"])
        assert ((frame["boxes"] == q["boxes"][0]).all(axis=1) & (frame["pids"] == pid)).any()
        others = [a for a in gallery.annotations if a["img_name"] != q["img_name"] and pid in a["pids"]]
        assert others and any(a["cam_id"] != q["cam_id"] for a in others)


def _tree_digest(root):
    """Image bytes and the parsed content of every annotation (the .mat headers carry a date)."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            h.update(os.path.relpath(path, root).encode())
            if f.endswith(".mat"):
                data = scipy.io.loadmat(path)
                h.update(repr(sorted((k, repr(v)) for k, v in data.items() if not k.startswith("__"))).encode())
            else:
                h.update(open(path, "rb").read())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    a = make_synthetic.generate(str(tmp_path / "a"), seed=3, **TINY)
    make_synthetic.generate(str(tmp_path / "b"), seed=3, **TINY)
    make_synthetic.generate(str(tmp_path / "c"), seed=4, **TINY)
    for name in ("CUHK-SYSU", "PRW"):
        assert _tree_digest(tmp_path / "a" / name) == _tree_digest(tmp_path / "b" / name)
        assert _tree_digest(tmp_path / "a" / name) != _tree_digest(tmp_path / "c" / name)
    assert a["CUHK-SYSU"]["queries"] == 3 and a["PRW"]["queries"] == 3
    # the tiny world reads back too, including its TestG2 protocol
    gallery = build(tmp_path / "a", "CUHK-SYSU", "gallery")
    assert gallery.load_protocol(2).query_gallery.shape == (3, 2)


def test_cli_and_options(tmp_path, capsys):
    opts = ["--train-ids", "2", "--test-ids", "2", "--train-images", "3", "--test-images", "4",
            "--image-width", "64", "--image-height", "48", "--gallery-sizes", "2", "50", "--datasets", "PRW"]
    capped = make_synthetic.generate_cuhk(str(tmp_path / "x" / "CUHK-SYSU"), gallery_sizes=(2, 100), **TINY_NO_SIZES)
    assert capped["gallery_sizes"] == {"TestG2": 2, "TestG50": 5, "TestG100": 5}
    assert make_synthetic.main(["--out", str(tmp_path / "w"), "--seed", "1", *opts]) == 0
    out = capsys.readouterr().out
    assert "PRW" in out and "queries=2" in out
    assert (tmp_path / "w" / "PRW" / "query_info.txt").exists()
    assert not (tmp_path / "w" / "CUHK-SYSU").exists()
    with pytest.raises(TypeError, match="unknown option"):
        make_synthetic.make_options(colours=3)
    hard = make_synthetic.make_options("hard")
    default = make_synthetic.SynthOptions()
    assert hard.clutter_palette > default.clutter_palette and hard.max_persons > default.max_persons
    assert hard.train_ids > default.train_ids and hard.num_colors < default.num_colors
