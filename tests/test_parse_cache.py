"""The on-disk annotation cache (datasets/parse_cache.py): a second build reads no release file,
an edited file or a damaged entry is parsed again, an entry can never run code, and the
annotations, protocols and warnings are the same from the cache as from the files."""

import os
import pickle
import warnings

import numpy as np
import pytest
import scipy.io

from datasets import build_dataset
from datasets.base import DatasetError, DatasetWarning
from datasets.matfile import clear_cache
from datasets.parse_cache import ParseCacheWarning, resolve_cache_dir
from tests.test_datasets import TESTG50, write_cuhk, write_jpeg, write_prw

SPLITS = ("train", "gallery", "query")


def snapshot(root, name, cache_dir, sizes=(50, 100)):
    """Everything a build gives: per split the annotations, per gallery size the protocol."""
    out = {}
    for split in SPLITS:
        ds = build_dataset(name, str(root), None, split, cache_dir=str(cache_dir))
        out[split] = [(a["img_name"], a["boxes"].tolist(), a["pids"].tolist(), a.get("cam_id")) for a in ds.annotations]
        if name == "CUHK-SYSU" and split == "gallery":
            for size in sizes:
                p = ds.load_protocol(size)
                out[size] = [p.query_gallery.tolist(), p.gt_query.tolist(), p.gt_gallery.tolist(), p.gt_boxes.tolist()]
    return out


@pytest.fixture
def no_file_reads(monkeypatch):
    """Fail on any read of a .mat file or an image header (what the cache must spare)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a release file was read although the cache holds it")

    def arm():
        clear_cache()  # the in-process memo would hide the disk cache
        monkeypatch.setattr(scipy.io, "loadmat", refuse)
        monkeypatch.setattr("datasets.base.Image.open", refuse)

    return arm


@pytest.mark.parametrize("name", ["CUHK-SYSU", "PRW"])
def test_second_build_reads_no_release_file_and_gives_the_same(tmp_path, name, no_file_reads):
    root = write_cuhk(tmp_path / name) if name == "CUHK-SYSU" else write_prw(tmp_path / name)
    cache = tmp_path / "cache"
    clear_cache()
    reference = snapshot(root, name, "none")  # parsed from the files, nothing kept
    assert not cache.exists()
    first = snapshot(root, name, cache)
    assert first == reference
    assert len(os.listdir(cache)) > 0
    no_file_reads()
    assert snapshot(root, name, cache) == reference


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    monkeypatch.setenv("DDPS_CACHE_DIR", str(tmp_path / "env_cache"))
    assert resolve_cache_dir("none") is None
    assert resolve_cache_dir("") == str(tmp_path / "env_cache")
    monkeypatch.delenv("DDPS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == str(tmp_path / "xdg" / "ddps" / "annotations")
    clear_cache()
    snapshot(root, "CUHK-SYSU", "none")
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "env_cache").exists()


def _touch_later(path):
    """Make sure an edit gets a new modification time even on coarse clocks."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_an_edited_file_is_parsed_again(tmp_path):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    cache = tmp_path / "cache"
    clear_cache()
    before = snapshot(root, "CUHK-SYSU", cache)
    # the second query moves to another box of s5.jpg... by rewriting TestG50 (same size on disk
    # is likely: only numbers change), and s4.jpg's box in Images.mat grows
    edited = [TESTG50[0], (TESTG50[1][0], TESTG50[1][1], TESTG50[1][2][::-1])]
    write_cuhk(tmp_path / "CUHK-SYSU", testg50=edited)
    for f in ("Images.mat", "pool.mat", "test/train_test/TestG50.mat"):
        _touch_later(root / "annotation" / f)
    clear_cache()
    after = snapshot(root, "CUHK-SYSU", cache)
    assert after == snapshot(root, "CUHK-SYSU", "none")
    assert after[50] != before[50]


def test_an_edited_prw_annotation_file_is_parsed_again(tmp_path):
    root = write_prw(tmp_path / "PRW")
    cache = tmp_path / "cache"
    clear_cache()
    before = snapshot(root, "PRW", cache)
    path = root / "annotations" / "c1s2_000003.jpg.mat"
    scipy.io.savemat(str(path), {"anno_previous": np.array([[700, 12, 11, 20, 40]], dtype=np.float64)})
    _touch_later(path)
    clear_cache()
    after = snapshot(root, "PRW", cache)
    assert after["gallery"][0][1] == [[12, 11, 32, 51]] != before["gallery"][0][1]


def test_a_damaged_entry_is_parsed_again_with_a_warning(tmp_path):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    cache = tmp_path / "cache"
    clear_cache()
    reference = snapshot(root, "CUHK-SYSU", cache)
    entries = sorted(cache.iterdir())
    for i, entry in enumerate(entries):  # truncated, empty, or not an npz at all
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2] if i % 3 == 0 else b"" if i % 3 == 1 else b"garbage")
    clear_cache()
    with pytest.warns(ParseCacheWarning, match="unreadable annotation cache entry"):
        assert snapshot(root, "CUHK-SYSU", cache) == reference
    clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParseCacheWarning)  # rewritten: read cleanly now
        assert snapshot(root, "CUHK-SYSU", cache) == reference


class _Exploit:
    def __reduce__(self):
        return (open, (os.environ["EXPLOIT_MARKER"], "w"))


def test_an_entry_holding_a_pickle_is_never_executed(tmp_path, monkeypatch):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    cache = tmp_path / "cache"
    clear_cache()
    reference = snapshot(root, "CUHK-SYSU", cache)
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    for entry in cache.iterdir():  # every entry replaced by an npz holding a pickled object
        with open(entry, "wb") as f:
            np.savez(f, header=np.array([_Exploit()], dtype=object))
    assert pickle.loads(pickle.dumps(_Exploit())) and marker.exists()  # the payload does run...
    marker.unlink()
    clear_cache()
    with pytest.warns(ParseCacheWarning):
        assert snapshot(root, "CUHK-SYSU", cache) == reference
    assert not marker.exists()  # ...but not from the cache


def test_images_are_checked_again_when_they_change(tmp_path, no_file_reads, monkeypatch):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    cache = tmp_path / "cache"
    clear_cache()
    snapshot(root, "CUHK-SYSU", cache)
    image = root / "Image" / "SSM" / "s4.jpg"
    image.write_bytes(b"not an image any more")
    clear_cache()
    with pytest.raises(DatasetError, match=r"unreadable image file .*s4.jpg"):
        build_dataset("CUHK-SYSU", str(root), None, "gallery", cache_dir=str(cache))
    write_jpeg(str(image))
    os.remove(root / "Image" / "SSM" / "s1.jpg")
    with pytest.raises(DatasetError, match=r"missing image file: .*s1.jpg"):
        build_dataset("CUHK-SYSU", str(root), None, "train", cache_dir=str(cache))


def test_warnings_of_the_files_are_repeated_from_the_cache(tmp_path):
    bad = [("s3.jpg", (11, 10, 20, 40), TESTG50[0][2]), TESTG50[1]]
    root = write_cuhk(tmp_path / "CUHK-SYSU", testg50=bad)
    cache = tmp_path / "cache"
    for _ in range(2):
        clear_cache()
        with pytest.warns(DatasetWarning, match=r"query 0: box .* \[11, 10, 20, 40\] is not among"):
            build_dataset("CUHK-SYSU", str(root), None, "gallery", cache_dir=str(cache))


def test_the_cache_folder_does_not_grow_when_files_change(tmp_path):
    root = write_cuhk(tmp_path / "CUHK-SYSU")
    cache = tmp_path / "cache"
    clear_cache()
    snapshot(root, "CUHK-SYSU", cache)
    count = len(os.listdir(cache))
    for _ in range(2):
        for f in (root / "annotation").rglob("*.mat"):
            _touch_later(f)
        clear_cache()
        snapshot(root, "CUHK-SYSU", cache)
    assert len(os.listdir(cache)) == count
    assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]
