"""Readers against small hand-written release files with known answers, and their error paths."""

from __future__ import annotations

import os
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import datasets
from datasets import DatasetError, DatasetFileNotFoundError, build_dataset
from datasets.base import DatasetWarning
from datasets.cuhk_sysu import CUHKProtocol
from datasets.transforms import RandomHorizontalFlip, build_transforms

W, H = 80, 100


# ---------------------------------------------------------------------------------------------
# hand-written files: numpy structures laid out as loadmat returns the released files


def struct(fields, rows, shape=None):
    arr = np.empty(shape or (1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        arr.reshape(-1)[i] = tuple(row)
    return arr


def cell(values, shape=None):
    arr = np.empty(shape or (len(values), 1), dtype=object)
    for i, v in enumerate(values):
        arr.reshape(-1)[i] = v
    return arr


def loc(*xywh):
    return np.array([xywh], dtype=np.float64)


def hard():
    return np.array([[0.0]])


def write_jpeg(path, color=(120, 60, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (W, H), color).save(path, quality=90)


def image_struct(name, boxes, shape=None):
    box = struct(["idlocate", "ishard"], [(loc(*b), hard()) for b in boxes])
    return (name, np.array([[float(len(boxes))]]), box)


CUHK_IMAGES = {
    "s1.jpg": [(10, 20, 30, 60), (50, 10, 20, 40), (5, 5, 0, 10)],  # last: zero width
    "s2.jpg": [(12, 22, 28, 58), (40, 30, 25, 50)],
    "s3.jpg": [(10, 10, 20, 40)],
    "s4.jpg": [(30, 5, 20, 45), (1, 2, 10, 20)],
    "s5.jpg": [(8, 8, 16, 32), (40, 10, 20, 40)],
}
CUHK_POOL = ["s4.jpg", "s3.jpg", "s5.jpg"]  # gallery order = pool order


def make_testg(entries, shape=None):
    """entries: [(query name, query box, [(gallery name, box or None), ...]), ...]."""
    rows = []
    for qname, qbox, gallery in entries:
        query = struct(["imname", "idlocate", "ishard", "idname"], [(qname, loc(*qbox), hard(), "p1")], (1, 1))
        gal = struct(
            ["imname", "idlocate", "ishard"],
            [(n, loc(*b) if b is not None else np.zeros((0, 0)), hard()) for n, b in gallery],
        )
        rows.append((query, gal))
    return struct(["Query", "Gallery"], rows, shape)


TESTG50 = [
    ("s3.jpg", (10, 10, 20, 40), [("s4.jpg", (30, 5, 20, 45)), ("s5.jpg", None)]),
    ("s5.jpg", (8, 8, 16, 32), [("s3.jpg", None), ("s4.jpg", None)]),
]
TESTG100 = [
    ("s3.jpg", (10, 10, 20, 40), [("s4.jpg", (30, 5, 20, 45)), ("s5.jpg", None)]),
    ("s5.jpg", (8, 8, 16, 32), [("s4.jpg", None), ("s3.jpg", None)]),
]


def write_cuhk(root: pathlib.Path, transposed=False, images=None, pool=None, testg50=None, testg100=None, img_key="Img"):
    images = CUHK_IMAGES if images is None else images
    pool = CUHK_POOL if pool is None else pool
    for name in images:
        write_jpeg(str(root / "Image" / "SSM" / name))
    ann = root / "annotation"
    tt = ann / "test" / "train_test"
    tt.mkdir(parents=True, exist_ok=True)
    n = len(images)
    img = struct(["imname", "nAppear", "box"], [image_struct(k, v) for k, v in images.items()], (n, 1) if transposed else (1, n))
    scipy.io.savemat(str(ann / "Images.mat"), {img_key: img})
    scipy.io.savemat(str(ann / "pool.mat"), {"pool": cell(pool, (1, len(pool)) if transposed else None)})
    ids = [
        [("s1.jpg", (10, 20, 30, 60)), ("s2.jpg", (12, 22, 28, 58))],
        [("s2.jpg", (40, 30, 25, 50))],
    ]
    cells = []
    for k, scenes in enumerate(ids):
        scene = struct(["imname", "idlocate", "ishard"], [(n_, loc(*b), hard()) for n_, b in scenes])
        cells.append(struct(["idname", "nAppear", "scene"], [(f"p{k}", np.array([[len(scenes)]]), scene)], (1, 1)))
    scipy.io.savemat(str(tt / "Train.mat"), {"Train": cell(cells, (1, 2) if transposed else None)})
    scipy.io.savemat(str(tt / "TestG50.mat"), {"TestG50": make_testg(testg50 or TESTG50, (2, 1) if transposed else None)})
    scipy.io.savemat(str(tt / "TestG100.mat"), {"TestG100": make_testg(testg100 or TESTG100)})
    return root


PRW_FRAMES = {
    "c1s1_000001": ("box_new", [[1, 10, 20, 30, 60], [-2, -5, 10, 20, 40], [-2, 50, 50, 0, 10]]),
    "c2s1_000002": ("anno_file", [[932, 5, 5, 20, 40], [480, 30.5, 10, 20.7, 40]]),
    "c1s2_000003": ("anno_previous", [[700, 10, 10, 20, 40]]),
    "c3s1_000004": ("box_new", [[700, 1, -3, 20, 40], [-2, 30, 30, 10, 20]]),
}
PRW_QUERY = "700 10 10 20 40 c1s2_000003\r\n700 1.0 0.5 20.0 39.5 c3s1_000004\r\n"


def write_prw(root: pathlib.Path, query=PRW_QUERY):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, (key, rows) in PRW_FRAMES.items():
        write_jpeg(str(root / "frames" / f"{name}.jpg"))
        variables = {key: np.array(rows, dtype=np.float64)}
        if name == "c3s1_000004":
            variables["anno_previous"] = np.array([[5, 1, 2, 3, 4]], dtype=np.float64)  # stale
        scipy.io.savemat(str(root / "annotations" / f"{name}.jpg.mat"), variables)
    scipy.io.savemat(str(root / "frame_train.mat"), {"img_index_train": cell(["c1s1_000001", "c2s1_000002"])})
    scipy.io.savemat(str(root / "frame_test.mat"), {"img_index_test": cell(["c1s2_000003", "c3s1_000004"])})
    (root / "query_info.txt").write_bytes(query.encode())
    return root


@pytest.fixture
def cuhk_root(tmp_path):
    return write_cuhk(tmp_path / "CUHK-SYSU")


@pytest.fixture
def prw_root(tmp_path):
    return write_prw(tmp_path / "PRW")


def boxes_of(ds):
    return [a["boxes"].tolist() for a in ds.annotations]


def pids_of(ds):
    return [a["pids"].tolist() for a in ds.annotations]


# ---------------------------------------------------------------------------------------------
# CUHK-SYSU


@pytest.mark.parametrize("transposed", [False, True])
def test_cuhk_train(tmp_path, transposed):
    root = write_cuhk(tmp_path / "CUHK-SYSU", transposed=transposed)
    loaded = scipy.io.loadmat(str(root / "annotation" / "Images.mat"))["Img"]
    assert loaded.shape == ((5, 1) if transposed else (1, 5))
    ds = build_dataset("CUHK-SYSU", str(root), None, "train")
    assert (ds.name, ds.split, ds.root) == ("CUHK-SYSU", "train", str(root))
    assert ds.img_prefix == os.path.join(str(root), "Image", "SSM")
    assert [a["img_name"] for a in ds.annotations] == ["s1.jpg", "s2.jpg"]
    # x, y, w, h -> x1, y1, x2, y2; the zero-width box is dropped
    assert boxes_of(ds) == [[[10, 20, 40, 80], [50, 10, 70, 50]], [[12, 22, 40, 80], [40, 30, 65, 80]]]
    assert pids_of(ds) == [[1, 5555], [1, 2]]
    a = ds.annotations[0]
    assert a["boxes"].dtype == np.int32 and a["pids"].dtype == np.int32
    assert a["img_path"] == os.path.join(ds.img_prefix, "s1.jpg")
    assert ds.pid_to_class == {1: 0, 2: 1} and ds.num_classes == 2
    img, target = ds[1]
    assert img.shape == (3, H, W) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2]
    assert target["boxes"].dtype == torch.float32 and target["img_name"] == "s2.jpg"
    assert ds[0][1]["labels"].tolist() == [1, 5555]


def test_cuhk_train_split_is_sorted_by_name(tmp_path):
    """The original's training split is sorted(all images - pool), not Images.mat order: an
    extra image s10 listed last in Images.mat comes between s1 and s2."""
    images = dict(CUHK_IMAGES)
    images["s10.jpg"] = [(20, 20, 30, 60)]
    images = {"s2.jpg": images.pop("s2.jpg"), **images}  # s2 first in Images.mat
    root = write_cuhk(tmp_path / "CUHK-SYSU", images=images)
    ds = build_dataset("CUHK-SYSU", str(root), None, "train")
    assert [a["img_name"] for a in ds.annotations] == ["s1.jpg", "s10.jpg", "s2.jpg"]
    assert pids_of(ds) == [[1, 5555], [5555], [1, 2]]  # identities follow their boxes


def test_cuhk_gallery_query_and_protocols(cuhk_root):
    gallery = build_dataset("CUHK-SYSU", str(cuhk_root), None, "gallery")
    query = build_dataset("CUHK-SYSU", str(cuhk_root), None, "query")
    assert [a["img_name"] for a in gallery.annotations] == CUHK_POOL
    assert boxes_of(gallery) == [[[30, 5, 50, 50], [1, 2, 11, 22]], [[10, 10, 30, 50]], [[8, 8, 24, 40], [40, 10, 60, 50]]]
    assert pids_of(gallery) == [[1, 5555], [1], [2, 5555]]
    assert [a["img_name"] for a in query.annotations] == ["s3.jpg", "s5.jpg"]
    assert boxes_of(query) == [[[10, 10, 30, 50]], [[8, 8, 24, 40]]]
    assert pids_of(query) == [[1], [2]]
    # the gallery split gives raw pids as labels
    assert gallery[0][1]["labels"].tolist() == [1, 5555]

    p50 = gallery.load_protocol(50, query)
    assert isinstance(p50, CUHKProtocol) and p50.gallery_size == 50
    assert p50.query_gallery.dtype == np.int64 and p50.query_gallery.tolist() == [[0, 2], [1, 0]]
    assert p50.gt_query.tolist() == [0] and p50.gt_gallery.tolist() == [0]
    assert p50.gt_boxes.dtype == np.float32 and p50.gt_boxes.tolist() == [[30, 5, 50, 50]]
    assert gallery.load_protocol(50) is p50  # cached
    p100 = gallery.load_protocol(100)
    assert p100.query_gallery.tolist() == [[0, 2], [0, 1]]
    full = gallery.load_protocol(-1)
    # every gallery image but the query's own (s3 = 1 for query 0, s5 = 2 for query 1)
    assert full.query_gallery.tolist() == [[0, 2], [0, 1]]
    assert full.gt_query.tolist() == [0] and full.gt_gallery.tolist() == [0]
    assert full.gt_boxes.tolist() == [[30, 5, 50, 50]]
    assert full.gt_query.dtype == np.int64 and full.gt_boxes.shape == (1, 4)


def test_cuhk_query_order_checked(tmp_path):
    swapped = [TESTG50[1], TESTG50[0]]
    root = write_cuhk(tmp_path / "CUHK-SYSU", testg100=swapped)
    gallery = build_dataset("CUHK-SYSU", str(root), None, "gallery")
    with pytest.raises(DatasetError, match="TestG100.mat: query 0 differs"):
        gallery.load_protocol(100)
    query = build_dataset("CUHK-SYSU", str(root), None, "query")
    query.annotations.reverse()
    with pytest.raises(DatasetError, match="query dataset entry 0"):
        gallery.load_protocol(50, query)


def test_build_dataset_names_and_splits(cuhk_root):
    with pytest.raises(ValueError, match="unknown dataset 'Market'"):
        build_dataset("Market", str(cuhk_root), None, "train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset("CUHK-SYSU", str(cuhk_root), None, "test")
    assert build_dataset("cuhk_sysu", str(cuhk_root), None, "query").name == "CUHK-SYSU"
    assert datasets.UNLABELED_PID == 5555


# ---------------------------------------------------------------------------------------------
# PRW


def test_prw_splits(prw_root):
    train = build_dataset("PRW", str(prw_root), None, "train")
    gallery = build_dataset("PRW", str(prw_root), None, "gallery")
    query = build_dataset("PRW", str(prw_root), None, "query")
    assert [a["img_name"] for a in train.annotations] == ["c1s1_000001.jpg", "c2s1_000002.jpg"]
    # x, y, w, h clipped at 0 BEFORE the conversion, as the original (x = -5, w = 20 gives
    # [0, 20], not [0, 15]); zero-width box dropped; float coords truncated after the sum
    assert boxes_of(train) == [[[10, 20, 40, 80], [0, 10, 20, 50]], [[5, 5, 25, 45], [30, 10, 51, 50]]]
    assert pids_of(train) == [[1, 5555], [932, 480]]  # raw pids kept, -2 -> 5555
    assert [a["cam_id"] for a in train.annotations] == [1, 2]
    assert train.pid_to_class == {1: 0, 480: 1, 932: 2} and train.num_classes == 3
    assert train[1][1]["labels"].tolist() == [3, 2]
    assert train[0][1]["labels"].tolist() == [1, 5555]
    # anno_previous alone is read; box_new wins over a stale anno_previous
    assert boxes_of(gallery) == [[[10, 10, 30, 50]], [[1, 0, 21, 40], [30, 30, 40, 50]]]
    assert pids_of(gallery) == [[700], [700, 5555]]
    assert [a["cam_id"] for a in gallery.annotations] == [1, 3]
    assert gallery[1][1]["labels"].tolist() == [700, 5555]
    # CRLF query file with float coordinates; query boxes are converted first, clipped after
    # (the original's rule for query_info.txt: y = 0.5, h = 39.5 -> y2 = 40)
    assert [a["img_name"] for a in query.annotations] == ["c1s2_000003.jpg", "c3s1_000004.jpg"]
    assert boxes_of(query) == [[[10, 10, 30, 50]], [[1, 0, 21, 40]]]
    assert pids_of(query) == [[700], [700]] and [a["cam_id"] for a in query.annotations] == [1, 3]


def test_prw_query_file_line_endings(tmp_path):
    root = write_prw(tmp_path / "PRW", query="700 10 10 20 40 c1s2_000003\n\n700 1 0 20 39 c3s1_000004")
    query = build_dataset("PRW", str(root), None, "query")
    assert boxes_of(query) == [[[10, 10, 30, 50]], [[1, 0, 21, 39]]]


# ---------------------------------------------------------------------------------------------
# errors: raised when the dataset is built, naming the file


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    for name in ("CUHK-SYSU", "PRW"):
        with pytest.raises(DatasetFileNotFoundError, match="nowhere") as info:
            build_dataset(name, str(missing), None, "train")
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(
    "name,split,relpath",
    [
        ("CUHK-SYSU", "train", "annotation/pool.mat"),
        ("CUHK-SYSU", "train", "annotation/test/train_test/Train.mat"),
        ("CUHK-SYSU", "gallery", "annotation/Images.mat"),
        ("CUHK-SYSU", "query", "annotation/test/train_test/TestG50.mat"),
        ("PRW", "train", "frame_train.mat"),
        ("PRW", "gallery", "annotations/c3s1_000004.jpg.mat"),
        ("PRW", "query", "query_info.txt"),
    ],
)
def test_missing_file(tmp_path, name, split, relpath):
    root = write_cuhk(tmp_path / name) if name == "CUHK-SYSU" else write_prw(tmp_path / name)
    os.remove(root / relpath)
    with pytest.raises(DatasetFileNotFoundError, match=os.path.basename(relpath)):
        build_dataset(name, str(root), None, split)


def test_missing_protocol_file(cuhk_root):
    gallery = build_dataset("CUHK-SYSU", str(cuhk_root), None, "gallery")
    with pytest.raises(FileNotFoundError, match="TestG500.mat"):
        gallery.load_protocol(500)


def test_missing_key(tmp_path):
    root = write_cuhk(tmp_path / "CUHK-SYSU", img_key="Images")
    with pytest.raises(DatasetError, match=r"Images.mat: variable 'Img' not found"):
        build_dataset("CUHK-SYSU", str(root), None, "train")
    root = write_prw(tmp_path / "PRW")
    scipy.io.savemat(str(root / "annotations" / "c1s1_000001.jpg.mat"), {"boxes": np.zeros((1, 5))})
    with pytest.raises(DatasetError, match=r"c1s1_000001.jpg.mat: none of the variables \['box_new'"):
        build_dataset("PRW", str(root), None, "train")
    scipy.io.savemat(str(root / "frame_test.mat"), {"img_index": cell(["c1s2_000003"])})
    with pytest.raises(DatasetError, match="frame_test.mat: variable 'img_index_test' not found"):
        build_dataset("PRW", str(root), None, "gallery")


def test_malformed_matrix(tmp_path):
    root = write_prw(tmp_path / "PRW")
    scipy.io.savemat(str(root / "annotations" / "c2s1_000002.jpg.mat"), {"box_new": np.zeros((2, 4))})
    with pytest.raises(DatasetError, match=r"c2s1_000002.jpg.mat: 'box_new' expected an N x 5 array .* shape \(2, 4\)"):
        build_dataset("PRW", str(root), None, "train")
    images = dict(CUHK_IMAGES, **{"s2.jpg": [(12, 22, 28, 58), (40, 30, 25)]})
    root = write_cuhk(tmp_path / "CUHK-SYSU", images=images)
    with pytest.raises(DatasetError, match=r"Images.mat: Img\[1\] \(s2.jpg\) box 1: malformed idlocate"):
        build_dataset("CUHK-SYSU", str(root), None, "train")


def test_malformed_query_line(tmp_path):
    root = write_prw(tmp_path / "PRW", query="700 10 10 20 40 c1s2_000003\r\n700 10 10 c3s1_000004\r\n")
    with pytest.raises(DatasetError, match=r"query_info.txt:2: expected 'pid x y w h name'"):
        build_dataset("PRW", str(root), None, "query")


def test_unknown_name_in_protocol(tmp_path):
    bad = [TESTG50[0], ("s5.jpg", (8, 8, 16, 32), [("s99.jpg", None), ("s4.jpg", None)])]
    root = write_cuhk(tmp_path / "a", testg50=bad)
    with pytest.raises(DatasetError, match=r"TestG50.mat: query 1 gallery entry 0: image 's99.jpg' is not in"):
        build_dataset("CUHK-SYSU", str(root), None, "gallery")
    # a training image in a gallery list
    bad = [TESTG50[0], ("s5.jpg", (8, 8, 16, 32), [("s1.jpg", None), ("s4.jpg", None)])]
    root = write_cuhk(tmp_path / "b", testg50=bad)
    with pytest.raises(DatasetError, match=r"'s1.jpg' is not in the gallery set"):
        build_dataset("CUHK-SYSU", str(root), None, "gallery")
    # a query box that is not among the image's boxes
    bad = [("s3.jpg", (11, 10, 20, 40), TESTG50[0][2]), TESTG50[1]]
    root = write_cuhk(tmp_path / "c", testg50=bad)
    # (SeqNet leaves such a box unlabeled; so do we, with a warning that names it)
    with pytest.warns(DatasetWarning, match=r"TestG50.mat: query 0: box .* \[11, 10, 20, 40\] is not among"):
        gallery = build_dataset("CUHK-SYSU", str(root), None, "gallery")
    s3 = next(a for a in gallery.annotations if a["img_name"] == "s3.jpg")
    assert 1 not in s3["pids"].tolist()
    # an unknown name in a larger protocol file: raised when the protocol is loaded
    bad100 = [TESTG100[0], ("s5.jpg", (8, 8, 16, 32), [("s77.jpg", None), ("s3.jpg", None)])]
    root = write_cuhk(tmp_path / "d", testg100=bad100)
    gallery = build_dataset("CUHK-SYSU", str(root), None, "gallery")
    with pytest.raises(DatasetError, match=r"TestG100.mat: query 1 gallery entry 0: image 's77.jpg'"):
        gallery.load_protocol(100)
    # a pool name absent from Images.mat, and a PRW query frame that is not a test frame
    root = write_cuhk(tmp_path / "e", pool=CUHK_POOL + ["s42.jpg"])
    with pytest.raises(DatasetError, match=r"pool.mat: image 's42.jpg' is not in .*Images.mat"):
        build_dataset("CUHK-SYSU", str(root), None, "train")
    root = write_prw(tmp_path / "PRW", query="1 10 10 20 40 c1s1_000001\r\n")
    with pytest.raises(DatasetError, match=r"query_info.txt: query 0 \(c1s1_000001\) is not in the test set"):
        build_dataset("PRW", str(root), None, "query")


def test_missing_and_corrupt_images(tmp_path):
    root = write_cuhk(tmp_path / "a")
    os.remove(root / "Image" / "SSM" / "s2.jpg")
    with pytest.raises(DatasetFileNotFoundError, match=r"missing image file: .*s2.jpg"):
        build_dataset("CUHK-SYSU", str(root), None, "train")
    root = write_prw(tmp_path / "PRW")
    (root / "frames" / "c3s1_000004.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=r"unreadable image file .*c3s1_000004.jpg"):
        build_dataset("PRW", str(root), None, "gallery")
    # a truncated JPEG has a readable header but no end-of-image marker: the build names it
    root = write_cuhk(tmp_path / "b")
    path = root / "Image" / "SSM" / "s1.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"truncated image file .*s1.jpg: a JPEG file ends with"):
        build_dataset("CUHK-SYSU", str(root), None, "train")
    # ... and its decoding, for a file cut after the check, names the file too
    ds = build_dataset("CUHK-SYSU", str(root), None, "train", check_images=False)
    with pytest.raises(DatasetError, match=r"cannot decode image file .*s1.jpg"):
        ds[0]
    # a complete JPEG with a few padding bytes after its end marker is fine
    path.write_bytes(data + b"\x00" * 16)
    assert len(build_dataset("CUHK-SYSU", str(root), None, "train")) > 0


def test_truncated_png_is_found_by_the_cheap_check(tmp_path):
    from datasets.base import check_image_files

    path = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    check_image_files([str(path)], cache_dir="none")
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(DatasetError, match=r"truncated image file .*frame.png: a PNG file"):
        check_image_files([str(path)], cache_dir="none")


# ---------------------------------------------------------------------------------------------
# transforms, loaders, statistics


def test_transforms():
    img = Image.fromarray(np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3))
    target = {"boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0]]), "labels": torch.tensor([1]), "img_name": "x"}
    tensor, out = build_transforms(False)(img, target)
    assert tensor.shape == (3, 2, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0] * 255, torch.tensor([0.0, 1.0, 2.0]))
    assert out["boxes"].tolist() == [[1.0, 0.0, 3.0, 2.0]]
    flipped, out = RandomHorizontalFlip(1.0)(tensor, target)
    assert torch.equal(flipped, tensor.flip(-1))
    assert out["boxes"].tolist() == [[2.0, 0.0, 4.0, 2.0]]  # x1' = W - x2, x2' = W - x1
    assert target["boxes"].tolist() == [[1.0, 0.0, 3.0, 2.0]]  # input not modified
    assert any(isinstance(t, RandomHorizontalFlip) and t.prob == 0.5 for t in build_transforms(True).transforms)
    torch.manual_seed(0)
    flips = sum(build_transforms(True)(img, target)[1]["boxes"][0, 0].item() == 2.0 for _ in range(200))
    assert 60 < flips < 140


def test_loaders(cuhk_root):
    cfg = SimpleNamespace(
        INPUT=SimpleNamespace(
            DATASET="CUHK-SYSU", DATA_ROOT=str(cuhk_root), BATCH_SIZE_TRAIN=2, BATCH_SIZE_TEST=1,
            NUM_WORKERS_TRAIN=0, NUM_WORKERS_TEST=0,
        )
    )
    loader = datasets.build_train_loader(cfg)
    assert loader.dataset.split == "train" and loader.batch_size == 2
    images, targets = next(iter(loader))
    assert isinstance(images, tuple) and len(images) == 2 and images[0].shape == (3, H, W)
    assert isinstance(targets, tuple) and {"boxes", "labels", "img_name"} <= set(targets[0])
    gallery_loader, query_loader = datasets.build_test_loaders(cfg)
    assert gallery_loader.dataset.split == "gallery" and query_loader.dataset.split == "query"
    names = [t[0]["img_name"] for _, t in gallery_loader]
    assert names == CUHK_POOL  # dataset order, one image a batch
    assert datasets.collate_fn([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))


def test_statistics(cuhk_root, prw_root):
    train = build_dataset("CUHK-SYSU", str(cuhk_root), None, "train")
    stats = datasets.dataset_statistics(train)
    assert stats["images"] == 2 and stats["boxes"] == 4
    assert stats["labeled_boxes"] == 3 and stats["unlabeled_boxes"] == 1 and stats["identities"] == 2
    assert stats["cameras"] is None
    assert stats["box_width"] == (20, 30) and stats["box_height"] == (40, 60)
    prw = build_dataset("PRW", str(prw_root), None, "gallery")
    assert datasets.dataset_statistics(prw)["cameras"] == 2
    table = datasets.format_statistics_table([train, prw])
    lines = table.splitlines()
    assert len(lines) == 4 and "images" in lines[0] and lines[2].startswith("CUHK-SYSU")
    assert lines[3].startswith("PRW")


def test_prw_box_conversion_rules():
    """Annotation boxes clip x, y, w, h at 0 and then convert; query boxes convert and then clip
    (both as the original; the example is SPEC 3's)."""
    from datasets.prw import annotation_boxes, query_boxes

    xywh = np.array([[-3.0, 5.0, 36.0, 40.0], [10.0, -2.5, 20.9, 30.0]])
    boxes, keep = annotation_boxes(xywh)
    assert boxes.tolist() == [[0, 5, 36, 45], [10, 0, 30, 30]] and keep.all()
    boxes, keep = query_boxes(xywh)
    assert boxes.tolist() == [[0, 5, 33, 45], [10, 0, 30, 27]] and keep.all()
    assert boxes.dtype == np.int32


def _prw_with(root, frames, train, test, query="700 10 10 20 40 c1s2_000003\r\n"):
    """A PRW release of the given frames {name: rows} (key box_new)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, rows in frames.items():
        write_jpeg(str(root / "frames" / f"{name}.jpg"))
        scipy.io.savemat(str(root / "annotations" / f"{name}.jpg.mat"),
                         {"box_new": np.array(rows, dtype=np.float64).reshape(-1, 5)})
    scipy.io.savemat(str(root / "frame_train.mat"), {"img_index_train": cell(train)})
    scipy.io.savemat(str(root / "frame_test.mat"), {"img_index_test": cell(test)})
    (root / "query_info.txt").write_bytes(query.encode())
    return root


def test_prw_keeps_what_the_original_keeps(tmp_path):
    """The gallery keeps a box of no width (ground truth the protocols count, as the original's);
    the training split keeps a frame without any person, and leaves the empty box out of the
    training targets."""
    frames = {"c1s1_000001": [[1, 10, 20, 30, 60], [-2, 50, 50, 0, 10]],
              "c1s1_000002": np.zeros((0, 5)),
              "c1s2_000003": [[700, 10, 10, 20, 40], [-2, 60, 10, 0, 30]]}
    root = _prw_with(tmp_path / "PRW", frames, ["c1s1_000001", "c1s1_000002"], ["c1s2_000003"])
    train = build_dataset("PRW", str(root), None, "train")
    assert [a["img_name"] for a in train.annotations] == ["c1s1_000001.jpg", "c1s1_000002.jpg"]
    assert boxes_of(train) == [[[10, 20, 40, 80]], []] and pids_of(train) == [[1], []]
    assert train[1][1]["boxes"].shape == (0, 4)
    gallery = build_dataset("PRW", str(root), None, "gallery")
    assert boxes_of(gallery) == [[[10, 10, 30, 50], [60, 10, 60, 40]]]
    assert pids_of(gallery) == [[700, 5555]]


def test_prw_ids_other_than_minus_two_below_one_are_refused(tmp_path):
    frames = {"c1s1_000001": [[1, 10, 20, 30, 60], [-1, 50, 50, 10, 10]], "c1s2_000003": [[700, 10, 10, 20, 40]]}
    root = _prw_with(tmp_path / "PRW", frames, ["c1s1_000001"], ["c1s2_000003"])
    with pytest.raises(DatasetError, match=r"c1s1_000001.jpg.mat.*ids \[-1\].*-2 \(unlabeled\)"):
        build_dataset("PRW", str(root), None, "train")
