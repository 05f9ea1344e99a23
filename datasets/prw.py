"""PRW reader (official release layout, SPEC 3).

Layout under ``root``::

    frames/<name>.jpg                 names like c1s1_000151 (camera = the digit(s) after 'c')
    annotations/<name>.jpg.mat        N x 5 [id, x, y, w, h] under box_new, anno_file or anno_previous
    frame_train.mat                   img_index_train: cell array of names without extension
    frame_test.mat                    img_index_test
    query_info.txt                    one query a line: pid x y w h name (any line ending)

Id -2 marks an unlabeled person and becomes 5555, as in the original; any other id below 1 is an
error naming the file (the original would have kept it as a negative pid).

Boxes, a reproduced quirk of the original (and of every SeqNet-family PRW loader): the four
numbers x, y, w, h of an annotation file are clipped at 0 FIRST and converted after, x2 =
max(x, 0) + max(w, 0), so a box with x = -3, w = 36 becomes [0, 36], not [0, 33]. This defines
the ground truth that published PRW numbers (detection and search) were computed on, so it is
kept. ``query_info.txt`` boxes, by contrast, are converted first and clipped after (x2 = x + w),
as the original does. Coordinates are truncated to integers after the conversion. Like the
original, the gallery keeps every annotated box (even one of no width or height) and the
training split every frame of frame_train.mat (even one without a person); only boxes of no
width or height are left out of the training targets, where the original would have turned
them into infinite regression targets.
Training pids are not contiguous in the release (1..478, 480..483, 932): the training split maps
them to contiguous classes (``pid_to_class``), see ``PersonSearchDataset``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .base import UNLABELED_PID, DatasetError, PersonSearchDataset, require_file
from .matfile import cached_parse, load_mat, mat_strings

__all__ = ["PRW", "BOX_KEYS", "camera_id", "read_query_info", "read_prw_boxes"]

BOX_KEYS = ("box_new", "anno_file", "anno_previous")
_CAM_RE = re.compile(r"c(\d+)")


def camera_id(name: str) -> int:
    """Camera id of a PRW frame name (``c3s2_012345`` -> 3)."""
    match = _CAM_RE.search(os.path.basename(name))
    if match is None:
        raise DatasetError(f"PRW image name {name!r} has no camera id (expected 'c<digit>...')")
    return int(match.group(1))


def _with_ext(name: str) -> str:
    return name if name.lower().endswith(".jpg") else name + ".jpg"


UNLABELED_ID = -2  # the release's id of unlabeled people


def _to_int_boxes(xyxy: np.ndarray) -> tuple:
    """float (n, 4) x1 y1 x2 y2 (>= 0) -> (int32 boxes truncated, mask of the non-empty ones)."""
    xyxy = xyxy.astype(np.int32)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy, keep


def annotation_boxes(xywh: np.ndarray) -> tuple:
    """Annotation-file boxes: clip x, y, w, h at 0, THEN convert (the original's rule, above)."""
    xywh = np.maximum(xywh, 0.0)
    return _to_int_boxes(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))


def query_boxes(xywh: np.ndarray) -> tuple:
    """query_info.txt boxes: convert to x1, y1, x2, y2, THEN clip at 0 (the original's rule)."""
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return _to_int_boxes(np.maximum(xyxy, 0.0))


def read_prw_boxes(path: str) -> tuple:
    """Read one annotation file: ``(boxes int32 (n, 4) xyxy, pids int32 (n,), non-empty mask)``,
    every row of the file in its order."""
    data = load_mat(path, any_of=BOX_KEYS)
    key = next(k for k in BOX_KEYS if k in data)
    arr = data[key]
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise DatasetError(f"{path}: '{key}' expected an N x 5 numeric array [id, x, y, w, h], "
                           f"got {type(arr).__name__} {getattr(arr, 'dtype', '')}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
    if arr.ndim == 1 and arr.size == 5:
        arr = arr.reshape(1, 5)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise DatasetError(
            f"{path}: '{key}' expected an N x 5 array [id, x, y, w, h], got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: '{key}' holds non-finite values")
    pids = arr[:, 0].astype(np.int64)  # truncation, as the original's astype(int32)
    bad = (pids < 1) & (pids != UNLABELED_ID)
    if bad.any():
        raise DatasetError(f"{path}: '{key}' holds person ids {sorted(set(pids[bad].tolist()))}: expected "
                           f"{UNLABELED_ID} (unlabeled) or a positive id")
    pids[pids == UNLABELED_ID] = UNLABELED_PID
    boxes, nonempty = annotation_boxes(arr[:, 1:])
    return boxes, pids.astype(np.int32), nonempty


def read_query_info(path: str) -> List[tuple]:
    """``[(pid, x, y, w, h, name), ...]`` from query_info.txt (LF or CRLF, int or float)."""
    require_file(path, "PRW query file")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", errors="strict")
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise DatasetError(
                f"{path}:{lineno}: expected 'pid x y w h name' (6 fields), got {len(fields)}: {line!r}"
            )
        try:
            pid = int(round(float(fields[0])))
            x, y, w, h = (float(v) for v in fields[1:5])
        except ValueError as exc:
            raise DatasetError(f"{path}:{lineno}: expected numbers in 'pid x y w h name': {line!r}") from exc
        if not np.isfinite([x, y, w, h]).all() or w <= 0 or h <= 0:
            raise DatasetError(f"{path}:{lineno}: invalid query box {x, y, w, h}")
        out.append((pid, x, y, w, h, os.path.splitext(fields[5])[0]))
    return out


def _parse_frame_list(var: str):
    def parse(path: str) -> List[str]:
        names = mat_strings(load_mat(path, keys=[var])[var], f"{path}: {var}")
        return [os.path.splitext(n)[0] if n.lower().endswith(".jpg") else n for n in names]

    parse.__qualname__ = f"_parse_frame_list.{var}"
    return parse


@dataclass
class _SplitBoxes:
    """Every annotation file of a split's frames, read in frame-list order."""

    names: List[str]  # frame names as listed (without extension)
    boxes: np.ndarray  # int32 (M, 4) x1 y1 x2 y2, every row of every file
    pids: np.ndarray  # int32 (M,)
    nonempty: np.ndarray  # bool (M,)
    offsets: np.ndarray  # int64 (N + 1,) rows of frame i: offsets[i]:offsets[i + 1]


def _read_split_boxes(names: List[str], paths: List[str]) -> _SplitBoxes:
    boxes, pids, nonempty = zip(*(read_prw_boxes(p) for p in paths)) if paths else ((), (), ())
    counts = np.fromiter((len(b) for b in boxes), dtype=np.int64, count=len(paths))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cat = (lambda parts, shape, dtype: np.concatenate(parts).astype(dtype).reshape(shape)
           if parts else np.zeros(shape, dtype))
    return _SplitBoxes(list(names), cat(boxes, (-1, 4), np.int32), cat(pids, (-1,), np.int32),
                       cat(nonempty, (-1,), bool), offsets)


class PRW(PersonSearchDataset):
    """PRW person-search dataset (one split)."""

    name = "PRW"

    def _image_dir(self) -> str:
        return os.path.join(self.root, "frames")

    def _frames(self, split: str) -> List[str]:
        fname, var = ("frame_train.mat", "img_index_train") if split == "train" else ("frame_test.mat", "img_index_test")
        return cached_parse(os.path.join(self.root, fname), _parse_frame_list(var), cache_dir=self.cache_dir)

    def _split_boxes(self, split: str) -> _SplitBoxes:
        """The annotation files of the split's frames, parsed once (kept with the frame list)."""
        list_file = os.path.join(self.root, "frame_train.mat" if split == "train" else "frame_test.mat")
        names = self._frames(split)
        paths = [os.path.join(self.root, "annotations", _with_ext(n) + ".mat") for n in names]
        return cached_parse(list_file, lambda _: _read_split_boxes(names, paths), cache_dir=self.cache_dir,
                            result_type=_SplitBoxes, sources=paths, name="PRW.annotation_files")

    def _load_annotations(self) -> List[Dict]:
        if self.split == "query":
            return self._load_queries()
        annos = []
        table = self._split_boxes(self.split)
        for i, name in enumerate(table.names):
            img_name = _with_ext(name)
            lo, hi = table.offsets[i], table.offsets[i + 1]
            boxes, pids = table.boxes[lo:hi].copy(), table.pids[lo:hi].copy()  # the table is shared
            if self.split == "train":
                keep = table.nonempty[lo:hi]
                boxes, pids = boxes[keep], pids[keep]
            annos.append(
                {
                    "img_name": img_name,
                    "img_path": os.path.join(self.img_prefix, img_name),
                    "boxes": boxes,
                    "pids": pids,
                    "cam_id": camera_id(img_name),
                }
            )
        return annos

    def _load_queries(self) -> List[Dict]:
        path = os.path.join(self.root, "query_info.txt")
        queries = read_query_info(path)
        test_names = set(self._frames("gallery"))
        annos = []
        for k, (pid, x, y, w, h, name) in enumerate(queries):
            if name not in test_names:
                raise DatasetError(
                    f"{path}: query {k} ({name}) is not in the test set (frame_test.mat)"
                )
            boxes, keep = query_boxes(np.array([[x, y, w, h]], dtype=np.float64))
            if not keep.all():
                raise DatasetError(f"{path}: query {k} ({name}) has an empty box after clipping")
            img_name = _with_ext(name)
            annos.append(
                {
                    "img_name": img_name,
                    "img_path": os.path.join(self.img_prefix, img_name),
                    "boxes": boxes,
                    "pids": np.array([pid], dtype=np.int32),
                    "cam_id": camera_id(img_name),
                }
            )
        return annos
