"""eval_cache.pth and its packed copy (engine/raw_outputs.py): the .pth keeps the documented
format (a dict of per-image tensor lists, weights_only-loadable), the packed copy gives back the
same arrays, and a packed copy that no longer belongs to its .pth is never used."""

import os
import shutil

import numpy as np
import torch

from engine.evaluator import load_cache, save_cache
from engine.raw_outputs import KEYS, PACKED_SUFFIX, RawOutputs


def _raw(seed=0, n_gallery=7, n_query=4):
    rng = np.random.default_rng(seed)
    counts = [0, 3, 1, 0, 5, 2, 1][:n_gallery]
    dets = [rng.random((n, 5), dtype=np.float32) for n in counts]
    feats = [rng.standard_normal((n, 256)).astype(np.float32) for n in counts]
    qd = [rng.random((1 + k % 3, 5), dtype=np.float32) for k in range(n_query)]
    qf = [rng.standard_normal((len(d), 256)).astype(np.float32) for d in qd]
    return {"gallery_dets": dets, "gallery_feats": feats, "query_dets": qd, "query_feats": qf,
            "query_box_feats": [f[:1].copy() for f in qf]}


def _equal(a, b):
    return all(len(a[k]) == len(b[k]) and all(np.array_equal(x, y) and x.shape == y.shape
                                              for x, y in zip(a[k], b[k])) for k in KEYS)


def test_the_pth_keeps_the_documented_format_and_both_files_give_the_same(tmp_path):
    raw = _raw()
    path = str(tmp_path / "eval_cache.pth")
    save_cache(path, raw, "abc", {"min_size": 900, "anchor_sizes": ((32,), (64,))}, "/x/epoch_1.pth")
    plain = torch.load(path, map_location="cpu", weights_only=True)
    assert set(KEYS) <= set(plain) and plain["model_fingerprint"] == "abc"
    assert all(isinstance(t, torch.Tensor) for k in KEYS for t in plain[k])
    assert _equal({k: [t.numpy() for t in plain[k]] for k in KEYS}, raw)
    packed = RawOutputs.load(path)  # from the packed copy
    assert os.path.isfile(path + PACKED_SUFFIX) and _equal(packed, raw)
    # the tuple settings come back as lists from the packed copy: still the same settings
    assert load_cache(path, "abc", {"min_size": 900, "anchor_sizes": ((32,), (64,))}).meta["checkpoint"] == "/x/epoch_1.pth"
    os.remove(path + PACKED_SUFFIX)  # a cache written before the packed copy existed
    assert _equal(RawOutputs.load(path), raw)


def test_a_packed_copy_of_another_pth_is_not_used(tmp_path):
    a, b = str(tmp_path / "a" / "eval_cache.pth"), str(tmp_path / "b" / "eval_cache.pth")
    save_cache(a, _raw(1), "one", {}, None)
    save_cache(b, _raw(2), "two", {}, None)
    shutil.copy(b, a)  # the .pth replaced by another run's, its old packed copy left behind
    got = RawOutputs.load(a)
    assert got.meta["model_fingerprint"] == "two" and _equal(got, _raw(2))
    with open(a + PACKED_SUFFIX, "wb") as f:  # and a damaged packed copy falls back to the .pth
        f.write(b"broken")
    assert _equal(RawOutputs.load(b), _raw(2)) and _equal(RawOutputs.load(a), _raw(2))
