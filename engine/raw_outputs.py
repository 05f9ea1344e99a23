"""The raw outputs of a model on the test splits, and their files.

What the protocols consume, one entry per image in dataset order (SPEC 10):
- ``gallery_dets`` / ``gallery_feats``: per gallery image, n x 5 float32 (x1, y1, x2, y2, score)
  and n x 256 embeddings;
- ``query_dets`` / ``query_feats``: per query image used as a gallery (CBGM), the query's own
  box first with score 1;
- ``query_box_feats``: per query, the 1 x 256 embedding of the query box.

Files, in OUTPUT_DIR:
- ``eval_cache.pth``: ``torch.save`` of a dict holding the five lists (as tensors) plus what
  identifies the model and settings behind them (``model_fingerprint``, ``settings``,
  ``checkpoint``): the documented format users read, loadable with ``weights_only=True``;
- ``eval_cache.pth.npz``: the same arrays packed (rows of every image concatenated, and the
  number of rows of each image), written after the ``.pth`` and recording the SHA-256 of its
  bytes. Unpickling tens of thousands of small tensors takes seconds at full
  dataset scale; the packed copy reads in a fraction of that, so EVAL_USE_CACHE reads it when
  it belongs to the ``.pth`` next to it (else the ``.pth``). Both are read without executing code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from utils.misc import atomic_write_bytes

KEYS = ("gallery_dets", "gallery_feats", "query_dets", "query_feats", "query_box_feats")
PACKED_SUFFIX = ".npz"


@dataclass
class RawOutputs:
    """The five per-image lists of numpy arrays (module docstring) and what produced them."""

    gallery_dets: List[np.ndarray]
    gallery_feats: List[np.ndarray]
    query_dets: List[np.ndarray]
    query_feats: List[np.ndarray]
    query_box_feats: List[np.ndarray]
    meta: Dict = field(default_factory=dict)  # model_fingerprint, settings, checkpoint

    def __getitem__(self, key):
        if key not in KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key):
        return key in KEYS

    def lists(self) -> Dict[str, List[np.ndarray]]:
        return {key: getattr(self, key) for key in KEYS}

    @classmethod
    def from_dict(cls, raw: Dict, meta: Optional[Dict] = None) -> "RawOutputs":
        missing = [k for k in KEYS if k not in raw]
        if missing:
            raise KeyError(f"raw outputs without {', '.join(missing)}")
        return cls(**{k: list(raw[k]) for k in KEYS}, meta=dict(meta or {}))

    # files ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write ``path`` (the documented .pth) then its packed copy, each atomically."""
        payload = {key: [torch.from_numpy(np.ascontiguousarray(a)) for a in getattr(self, key)] for key in KEYS}
        payload.update(self.meta)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        atomic_write_bytes(path, data)
        arrays = {}
        for key in KEYS:
            rows, counts = _pack(getattr(self, key))
            arrays[f"{key}.rows"], arrays[f"{key}.counts"] = rows, counts
        header = {"meta": self.meta, "pth_sha256": hashlib.sha256(data).hexdigest()}
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
        atomic_write_bytes(path + PACKED_SUFFIX, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "RawOutputs":
        """Read the outputs saved at ``path``: from the packed copy when it belongs to this very
        file, else from the .pth itself (``weights_only=True``)."""
        packed = _read_packed(path)
        if packed is not None:
            return packed
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(cache, dict):
            raise ValueError(f"{path}: expected a dict of raw outputs, found a {type(cache).__name__}")
        lists = {key: [t.numpy() for t in cache.get(key, [])] for key in KEYS if key in cache}
        meta = {k: v for k, v in cache.items() if k not in KEYS}
        return cls.from_dict(lists, meta)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _pack(arrays: List[np.ndarray]):
    counts = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    width = next((a.shape[1] for a in arrays if a.ndim == 2), 0)
    rows = (np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1, width) for a in arrays])
            if arrays else np.zeros((0, width), np.float32))
    return rows, counts


def _unpack(rows: np.ndarray, counts: np.ndarray) -> List[np.ndarray]:
    cuts = np.cumsum(counts)[:-1]
    return np.split(rows, cuts) if len(counts) else []


def _read_packed(path: str) -> Optional[RawOutputs]:
    """The packed copy of ``path``, or None when absent, unreadable or not of this .pth."""
    packed = path + PACKED_SUFFIX
    if not (os.path.isfile(packed) and os.path.isfile(path)):
        return None
    try:
        with np.load(packed, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("pth_sha256") != _file_sha256(path):
                return None  # the .pth was replaced since (another tool, a copy): trust the .pth
            lists = {key: _unpack(data[f"{key}.rows"], data[f"{key}.counts"]) for key in KEYS}
    except Exception:  # truncated or foreign: the .pth is the reference
        return None
    return RawOutputs.from_dict(lists, header.get("meta"))
