"""A person-search index on disk: every detection a model made on image files and video frames.

An index folder holds
    index.json      the manifest: format version, the model that made the index (weights
                    fingerprint, checkpoint, settings), the sources (one per picture or video) and
                    the parts, in order;
    config.yaml     the config of that model (search rebuilds the model from it);
    part-NNNNNN.npz arrays of consecutive rows (PART_ARRAYS).

One row per detection: its source (position in the manifest's sources), image number (a counter
over every indexed picture and video frame that grows with the row, so one image's detections are
consecutive rows), frame number and time in seconds (videos; -1 and NaN for pictures), box x1 y1
x2 y2 in the source's pixels, detection score, and embedding: the search protocols' gallery
embedding (the L2-normalised embedding times the detection score), so that a dot product with a
query embedding is the protocols' similarity.

Safe to interrupt: a part is written (atomically) before the manifest that lists it, and the
manifest is replaced atomically, so the folder always holds the valid index its last manifest
describes; a part file no manifest lists is debris of an interrupted run and is replaced by the
next one. Parts are read with ``allow_pickle=False``: opening an index never runs code.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from utils.errors import UserError
from utils.fileio import atomic_write, atomic_write_bytes, remove_stale_temp_files

__all__ = ["IndexArrays", "IndexFormatError", "ModelStamp", "ModelMismatchError", "PersonIndex",
           "PersonIndexError", "MANIFEST", "PART_ARRAYS"]

FORMAT_VERSION = 1
MANIFEST = "index.json"
CONFIG = "config.yaml"
# name: (dtype, number of dimensions)
PART_ARRAYS = {
    "boxes": (np.float32, 2), "scores": (np.float32, 1), "embeddings": (np.float32, 2),
    "source": (np.int32, 1), "image": (np.int64, 1), "frame": (np.int64, 1), "time": (np.float64, 1),
}


class PersonIndexError(UserError):
    """An index folder that cannot be used as asked."""


class IndexFormatError(PersonIndexError):
    """An index file that is not what this code writes (damaged, or from another program)."""


class ModelMismatchError(PersonIndexError):
    """The index was made by another model or with other settings: their rows do not mix."""


@dataclass(frozen=True)
class ModelStamp:
    """What made an index: the model's weights (``engine.inference.model_fingerprint``), the
    checkpoint they came from, and the settings that change the rows (detection score threshold,
    input sizes)."""

    fingerprint: str
    checkpoint: str
    settings: Dict

    def to_json(self) -> Dict:
        return {"fingerprint": self.fingerprint, "checkpoint": self.checkpoint, "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, data: Dict) -> "ModelStamp":
        return cls(str(data["fingerprint"]), str(data["checkpoint"]), dict(data["settings"]))

    def differences(self, other: "ModelStamp") -> List[str]:
        """What differs between the two stamps, in words (the checkpoint path alone does not count:
        a moved checkpoint with the same weights makes the same rows)."""
        out = []
        if self.fingerprint != other.fingerprint:
            out.append(f"model weights {self.fingerprint[:12]} (from {self.checkpoint}) vs "
                       f"{other.fingerprint[:12]} (from {other.checkpoint})")
        for key in sorted(set(self.settings) | set(other.settings)):
            if self.settings.get(key) != other.settings.get(key):
                out.append(f"{key} {self.settings.get(key)!r} vs {other.settings.get(key)!r}")
        return out


@dataclass
class IndexArrays:
    """All searchable rows of an index, concatenated in row order (superseded sources left out)."""

    boxes: np.ndarray       # n x 4 float32
    scores: np.ndarray      # n float32
    embeddings: np.ndarray  # n x D float32
    source: np.ndarray      # n int32: position in the manifest's sources
    image: np.ndarray       # n int64, non-decreasing
    frame: np.ndarray       # n int64 (-1: a picture)
    time: np.ndarray        # n float64 seconds (NaN: a picture)

    def __len__(self) -> int:
        return len(self.scores)

    def image_rows(self, image_id: int) -> slice:
        """The rows of one image (they are consecutive)."""
        start, stop = np.searchsorted(self.image, [image_id, image_id + 1])
        return slice(int(start), int(stop))


def _part_name(number: int) -> str:
    return f"part-{number:06d}.npz"


def _empty_rows(dim: int) -> Dict[str, np.ndarray]:
    return {name: np.zeros((0, 4) if name == "boxes" else (0, dim) if name == "embeddings" else (0,), dtype)
            for name, (dtype, _) in PART_ARRAYS.items()}


class PersonIndex:
    """An index folder: its manifest in memory, parts appended by ``commit``."""

    def __init__(self, folder: str, manifest: Dict):
        self.folder = folder
        self.manifest = manifest

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str) -> "PersonIndex":
        """An existing index; a clear error when ``folder`` is not one."""
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.exists(folder) else f"holds no {MANIFEST}"
            raise PersonIndexError(f"{folder} is not a person-search index: it {what} "
                                   f"(make one with tools/index_gallery.py)")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            raise IndexFormatError(f"{path}: cannot read the index manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "ddps-person-index":
            raise IndexFormatError(f"{path} is not a manifest of a person-search index")
        if manifest.get("version") != FORMAT_VERSION:
            raise IndexFormatError(f"{path}: index format version {manifest.get('version')!r}; this code reads "
                                   f"version {FORMAT_VERSION}")
        return cls(folder, manifest)

    @classmethod
    def open_or_create(cls, folder: str, stamp: ModelStamp, config_text: str, embedding_dim: int) -> "PersonIndex":
        """The index in ``folder`` if there is one (refused when another model or other settings
        made it), else a new empty index there. A folder that holds other files is not used."""
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            index = cls.open(folder)
            differences = index.stamp.differences(stamp)
            if differences:
                raise ModelMismatchError(
                    f"{folder} was made by another model or with other settings, and rows of two models cannot be "
                    f"searched together: {'; '.join(differences)}. Index into a new folder, or use the index's "
                    f"model (its checkpoint {index.stamp.checkpoint})")
            remove_stale_temp_files(folder)
            return index
        if os.path.isdir(folder) and os.listdir(folder):
            raise PersonIndexError(f"{folder} holds files but no {MANIFEST}: choose a new or empty folder for an index")
        os.makedirs(folder, exist_ok=True)
        index = cls(folder, {"format": "ddps-person-index", "version": FORMAT_VERSION, "model": stamp.to_json(),
                             "embedding_dim": int(embedding_dim), "sources": [], "parts": [], "rows": 0,
                             "images": 0})
        atomic_write_bytes(os.path.join(folder, CONFIG), config_text.encode())
        index._write_manifest()
        return index

    # -- what is in it -------------------------------------------------------------------
    @property
    def stamp(self) -> ModelStamp:
        return ModelStamp.from_json(self.manifest["model"])

    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, CONFIG)

    @property
    def sources(self) -> List[Dict]:
        return self.manifest["sources"]

    @property
    def num_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def next_image_id(self) -> int:
        return int(self.manifest["images"])

    def latest_source(self, path: str) -> Optional[int]:
        """Position of the current (not superseded) entry of a source file, or None."""
        for i in range(len(self.sources) - 1, -1, -1):
            if self.sources[i]["path"] == path and not self.sources[i].get("superseded"):
                return i
        return None

    # -- writing -------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(self.folder, MANIFEST), text.encode())

    def commit(self, rows: Dict[str, np.ndarray], sources: List[Dict], next_image_id: int) -> None:
        """Append ``rows`` as a new part and make ``sources`` (the full, updated source list) and
        the image counter the manifest's: part first, then the manifest."""
        n = len(rows["scores"]) if rows else 0
        manifest = dict(self.manifest, sources=sources, images=int(next_image_id))
        if n:
            arrays = {name: np.ascontiguousarray(rows[name], dtype=dtype) for name, (dtype, _) in PART_ARRAYS.items()}
            _check_part(arrays, self.embedding_dim, "rows to commit")
            name = _part_name(len(self.manifest["parts"]))
            atomic_write(os.path.join(self.folder, name), lambda f: np.savez(f, **arrays))
            manifest["parts"] = self.manifest["parts"] + [{"file": name, "rows": n}]
            manifest["rows"] = self.num_rows + n
        self.manifest = manifest
        self._write_manifest()

    # -- reading -------------------------------------------------------------------------
    def load(self) -> IndexArrays:
        """Every row of the current sources, checked against the manifest."""
        parts = []
        for part in self.manifest["parts"]:
            path = os.path.join(self.folder, part["file"])
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in PART_ARRAYS if name in data.files}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise IndexFormatError(f"{path}: cannot read this part of the index ({err})") from None
            _check_part(arrays, self.embedding_dim, path)
            if len(arrays["scores"]) != part["rows"]:
                raise IndexFormatError(f"{path} holds {len(arrays['scores'])} rows; the manifest says {part['rows']}")
            parts.append(arrays)
        merged = {name: np.concatenate([p[name] for p in parts]) if parts else _empty_rows(self.embedding_dim)[name]
                  for name in PART_ARRAYS}
        current = np.array([not s.get("superseded") for s in self.sources] or [True], dtype=bool)
        if len(merged["source"]) and merged["source"].max() >= len(self.sources):
            raise IndexFormatError(f"{self.folder}: rows name a source the manifest does not list")
        keep = current[merged["source"]]
        if not keep.all():
            merged = {name: a[keep] for name, a in merged.items()}
        if np.any(np.diff(merged["image"]) < 0):
            raise IndexFormatError(f"{self.folder}: image numbers decrease along the rows")
        return IndexArrays(**merged)


def _check_part(arrays: Dict[str, np.ndarray], dim: int, where: str) -> None:
    missing = [name for name in PART_ARRAYS if name not in arrays]
    if missing:
        raise IndexFormatError(f"{where}: arrays {', '.join(missing)} missing")
    n = len(arrays["scores"])
    for name, (dtype, ndim) in PART_ARRAYS.items():
        a = arrays[name]
        if a.dtype != dtype or a.ndim != ndim or len(a) != n:
            raise IndexFormatError(f"{where}: {name} is {a.dtype} of shape {a.shape}; expected {np.dtype(dtype)} "
                                   f"with {ndim} dimension(s) and {n} rows")
    if arrays["boxes"].shape[1] != 4 or arrays["embeddings"].shape[1] != dim:
        raise IndexFormatError(f"{where}: boxes {arrays['boxes'].shape}, embeddings {arrays['embeddings'].shape}; "
                               f"expected n x 4 and n x {dim}")
