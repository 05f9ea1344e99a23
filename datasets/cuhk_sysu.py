"""CUHK-SYSU reader (official release layout, SPEC 3).

Layout under ``root``::

    Image/SSM/<name>.jpg
    annotation/Images.mat                      Img: struct array (imname, nAppear, box.idlocate)
    annotation/pool.mat                        pool: cell array of the gallery (test) image names
    annotation/test/train_test/Train.mat       Train: one cell per training identity
    annotation/test/train_test/TestG<N>.mat    TestG<N>: one struct per query (Query, Gallery)

Splits: ``train`` = Images.mat minus pool (sorted by name, as the original; identity k of Train.mat gets pid k+1
on the box equal to its idlocate, the other boxes 5555); ``gallery`` = pool (pool order; query k
of TestG50 gets pid k+1 on its query box and on the gallery boxes where it appears); ``query`` =
the TestG50 queries in file order (query k has pid k+1).

Boxes of zero width or height in Images.mat are dropped. Training images left without any box
are dropped from the training split (they carry no supervision). Boxes are matched to the
Images.mat boxes by their integer (x, y, w, h); a protocol box or image name that cannot be
found is an error naming the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from .base import (
    UNLABELED_PID,
    DatasetError,
    DatasetWarning,
    PersonSearchDataset,
    match_rows,
    xywh_to_xyxy,
)
from .matfile import (
    cached_parse,
    check_fields,
    load_mat,
    mat_string,
    mat_strings,
    records,
    xywh_rows,
)

__all__ = ["CUHKSYSU", "CUHKProtocol", "GALLERY_SIZES"]

GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)


@dataclass
class CUHKProtocol:
    """Search protocol of CUHK-SYSU for one gallery size (docs/ARCHITECTURE.md).

    ``query_gallery[q]``: indices into the gallery dataset's annotations forming query q's
    gallery; ``gt_query``, ``gt_gallery``, ``gt_boxes``: one row per gallery entry where the
    query person appears, with its box there (x1, y1, x2, y2). An image listed twice in a TestG
    gallery has two rows (the original counts both); the whole gallery (-1) lists each image once.
    """

    gallery_size: int
    query_gallery: np.ndarray  # int64 (Q, G)
    gt_query: np.ndarray  # int64 (P,)
    gt_gallery: np.ndarray  # int64 (P,)
    gt_boxes: np.ndarray  # float32 (P, 4)


# --------------------------------------------------------------------------------------------
# parsed files (cached: several splits read the same files)


@dataclass
class _ImagesTable:
    path: str
    names: List[str]
    xywh: np.ndarray  # int64 (M, 4), zero-size boxes dropped
    owner: np.ndarray  # int64 (M,) image index of each box
    offsets: np.ndarray  # int64 (N + 1,) boxes of image i: offsets[i]:offsets[i+1]
    index: Dict[str, int] = field(init=False)  # image name -> position (names are distinct)

    def __post_init__(self):
        self.index = {name: i for i, name in enumerate(self.names)}

    def keys(self) -> np.ndarray:
        """(M, 5) rows (image index, x, y, w, h) used to match protocol boxes."""
        return np.concatenate([self.owner[:, None], self.xywh], axis=1)


def _to_int(xywh: np.ndarray) -> np.ndarray:
    """Truncate to integers, as the original reader did (the released values are integral)."""
    return xywh.astype(np.int64)


def _parse_images(path: str) -> _ImagesTable:
    img = load_mat(path, keys=["Img"])["Img"]
    check_fields(img, ["imname", "box"], f"{path}: Img")
    recs = records(img, f"{path}: Img")
    names = [mat_string(r["imname"], f"{path}: Img[{i}].imname") for i, r in enumerate(recs)]
    index: Dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise DatasetError(f"{path}: image name {name!r} appears twice in Img")
        index[name] = i
    counts = np.zeros(len(recs), dtype=np.int64)
    locs = []
    for i, r in enumerate(recs):
        box = r["box"]
        if box.size == 0:
            continue
        check_fields(box, ["idlocate"], f"{path}: Img[{i}] ({names[i]}).box")
        loc = box["idlocate"].ravel()
        counts[i] = len(loc)
        locs.extend(loc)
    owner = np.repeat(np.arange(len(recs), dtype=np.int64), counts)
    xywh, _ = xywh_rows(
        locs,
        f"{path}: Img",
        describe=lambda j: f"{path}: Img[{owner[j]}] ({names[owner[j]]}) box {j - counts[: owner[j]].sum()}",
    )
    xywh = _to_int(xywh)
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    xywh, owner = xywh[keep], owner[keep]
    offsets = np.zeros(len(recs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(owner, minlength=len(recs)))
    return _ImagesTable(path, names, xywh, owner, offsets)


def _parse_pool(path: str) -> List[str]:
    pool = load_mat(path, keys=["pool"])["pool"]
    return mat_strings(pool, f"{path}: pool")


@dataclass
class _TrainTable:
    path: str
    num_ids: int
    ident: np.ndarray  # int64 (S,) identity index (0-based, file order) of each scene entry
    names: List[str]  # (S,) image names
    xywh: np.ndarray  # int64 (S, 4)


def _parse_train(path: str) -> _TrainTable:
    train = load_mat(path, keys=["Train"])["Train"]
    recs = records(train, f"{path}: Train")
    ident, names, locs = [], [], []
    for k, rec in enumerate(recs):
        where = f"{path}: Train[{k}]"
        check_fields(rec, ["scene"], where)
        scene = rec["scene"]
        if scene.size == 0:
            continue
        check_fields(scene, ["imname", "idlocate"], f"{where}.scene")
        names.extend(mat_string(v, f"{where}.scene.imname") for v in scene["imname"].ravel())
        loc = scene["idlocate"].ravel()
        locs.extend(loc)
        ident.extend([k] * len(loc))
    xywh, _ = xywh_rows(locs, f"{path}: Train", describe=lambda j: f"{path}: Train[{ident[j]}] scene entry ({names[j]})")
    return _TrainTable(path, len(recs), np.asarray(ident, dtype=np.int64), names, _to_int(xywh))


@dataclass
class _TestGTable:
    path: str
    size: int
    q_names: List[str]  # (Q,)
    q_xywh: np.ndarray  # int64 (Q, 4)
    names: np.ndarray  # str (U,) distinct gallery image names
    g_codes: np.ndarray  # int64 (Q, G) gallery entries as indices into ``names``
    g_xywh: np.ndarray  # int64 (Q, G, 4), zeros where absent
    g_present: np.ndarray  # bool (Q, G)


def _parse_testg(path: str) -> _TestGTable:
    var = os.path.splitext(os.path.basename(path))[0]
    table = load_mat(path, keys=[var])[var]
    check_fields(table, ["Query", "Gallery"], f"{path}: {var}")
    recs = records(table, f"{path}: {var}")
    q_names, q_locs, g_codes, g_locs = [], [], [], []
    code_of: Dict[str, int] = {}
    for k, rec in enumerate(recs):
        where = f"{path}: {var}[{k}]"
        query = records(rec["Query"], f"{where}.Query")
        if len(query) != 1:
            raise DatasetError(f"{where}.Query: expected one struct, got {len(query)}")
        check_fields(query[0], ["imname", "idlocate"], f"{where}.Query")
        q_names.append(mat_string(query[0]["imname"], f"{where}.Query.imname"))
        q_locs.append(query[0]["idlocate"])
        gallery = rec["Gallery"]
        check_fields(gallery, ["imname", "idlocate"], f"{where}.Gallery")
        names = [mat_string(v, f"{where}.Gallery.imname") for v in gallery["imname"].ravel()]
        if g_codes and len(names) != len(g_codes[0]):
            raise DatasetError(
                f"{where}.Gallery: expected {len(g_codes[0])} gallery entries like the first "
                f"query, got {len(names)}"
            )
        g_codes.append([code_of.setdefault(n, len(code_of)) for n in names])
        g_locs.extend(gallery["idlocate"].ravel())
    num_q = len(recs)
    size = len(g_codes[0]) if g_codes else 0
    q_xywh, _ = xywh_rows(q_locs, f"{path}: {var}", describe=lambda j: f"{path}: {var}[{j}].Query")
    g_xywh, present = xywh_rows(
        g_locs,
        f"{path}: {var}",
        allow_empty=True,
        describe=lambda j: f"{path}: {var}[{j // max(size, 1)}].Gallery[{j % max(size, 1)}]",
    )
    g_xywh = np.where(present[:, None], g_xywh, 0.0)
    return _TestGTable(
        path=path,
        size=size,
        q_names=q_names,
        q_xywh=_to_int(q_xywh),
        names=np.asarray(list(code_of), dtype=str),
        g_codes=np.asarray(g_codes, dtype=np.int64).reshape(num_q, size),
        g_xywh=_to_int(g_xywh).reshape(num_q, size, 4),
        g_present=present.reshape(num_q, size),
    )


@dataclass
class _SplitTable:
    """One split's annotations as the reader builds them (what the annotation cache keeps)."""

    names: List[str]  # image names in split order
    boxes: np.ndarray  # int32 (M, 4) x1 y1 x2 y2
    pids: np.ndarray  # int32 (M,)
    offsets: np.ndarray  # int64 (N + 1,) boxes of image i: offsets[i]:offsets[i + 1]
    query_image: np.ndarray  # gallery split: gallery index of each query's image (else empty)
    notes: List[str]  # DatasetWarnings of the build, repeated on every build from the cache

    @classmethod
    def pack(cls, annos: List[Dict], query_image, notes) -> "_SplitTable":
        counts = np.fromiter((len(a["pids"]) for a in annos), dtype=np.int64, count=len(annos))
        boxes = np.concatenate([a["boxes"] for a in annos]) if annos else np.zeros((0, 4), np.int32)
        pids = np.concatenate([a["pids"] for a in annos]) if annos else np.zeros(0, np.int32)
        return cls([a["img_name"] for a in annos], boxes.astype(np.int32).reshape(-1, 4), pids.astype(np.int32),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.asarray(query_image, dtype=np.int64).reshape(-1), list(notes))


# --------------------------------------------------------------------------------------------


class CUHKSYSU(PersonSearchDataset):
    """CUHK-SYSU person-search dataset (one split)."""

    name = "CUHK-SYSU"

    def __init__(self, root, transforms=None, split="train", check_images=True, cache_dir=None):
        self._protocols: Dict[int, CUHKProtocol] = {}
        super().__init__(root, transforms, split, check_images=check_images, cache_dir=cache_dir)

    # paths --------------------------------------------------------------------------------
    def _image_dir(self) -> str:
        return os.path.join(self.root, "Image", "SSM")

    def _anno_path(self, *parts: str) -> str:
        return os.path.join(self.root, "annotation", *parts)

    def testg_path(self, gallery_size: int) -> str:
        return self._anno_path("test", "train_test", f"TestG{int(gallery_size)}.mat")

    def _parsed(self, path: str, parser, result_type=None):
        return cached_parse(path, parser, cache_dir=self.cache_dir, result_type=result_type)

    def _images(self) -> _ImagesTable:
        return self._parsed(self._anno_path("Images.mat"), _parse_images, _ImagesTable)

    def _pool(self) -> List[str]:
        return self._parsed(self._anno_path("pool.mat"), _parse_pool)

    def _testg(self, gallery_size: int) -> _TestGTable:
        return self._parsed(self.testg_path(gallery_size), _parse_testg, _TestGTable)

    # annotations --------------------------------------------------------------------------
    def _make_anno(self, name: str, xywh: np.ndarray, pids: np.ndarray) -> Dict:
        return {
            "img_name": name,
            "img_path": os.path.join(self.img_prefix, name),
            "boxes": xywh_to_xyxy(xywh).astype(np.int32).reshape(-1, 4),
            "pids": np.asarray(pids, dtype=np.int32).reshape(-1),
        }

    def _load_annotations(self) -> List[Dict]:
        """The split's annotations, built once per version of the files (annotation cache)."""
        testg50 = self.testg_path(50)
        if self.split == "query":
            primary, sources = testg50, []
        else:
            primary = self._anno_path("Images.mat")
            other = self._anno_path("test", "train_test", "Train.mat") if self.split == "train" else testg50
            sources = [self._anno_path("pool.mat"), other]
        table = cached_parse(primary, lambda _: self._build_split_table(), cache_dir=self.cache_dir,
                             result_type=_SplitTable, sources=sources, name=f"CUHK-SYSU.{self.split}")
        for note in table.notes:
            warnings.warn(note, DatasetWarning, stacklevel=4)
        if self.split == "gallery":
            self._query_image = table.query_image
            self._pool_names = table.names
        return [
            {
                "img_name": name,
                "img_path": os.path.join(self.img_prefix, name),
                "boxes": table.boxes[table.offsets[i] : table.offsets[i + 1]].copy(),
                "pids": table.pids[table.offsets[i] : table.offsets[i + 1]].copy(),
            }
            for i, name in enumerate(table.names)
        ]

    def _build_split_table(self) -> _SplitTable:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DatasetWarning)
            annos = self._build_annotations()
        notes = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
        for w in caught:  # anything else goes on as it came
            if not issubclass(w.category, DatasetWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        query_image = getattr(self, "_query_image", np.zeros(0, np.int64)) if self.split == "gallery" else []
        return _SplitTable.pack(annos, query_image, notes)

    def _build_annotations(self) -> List[Dict]:
        if self.split == "query":
            return self._load_queries()
        images = self._images()
        pool_path = self._anno_path("pool.mat")
        pool = self._pool()
        missing = [n for n in pool if n not in images.index]
        if missing:
            raise DatasetError(
                f"{pool_path}: image {missing[0]!r} is not in {images.path} "
                f"({len(missing)} pool name(s) unknown)"
            )
        pids = np.full(len(images.xywh), UNLABELED_PID, dtype=np.int64)
        if self.split == "train":
            pool_set = set(pool)
            # sorted by name, as the original (sorted(set(all images) - set(pool)))
            order = [images.index[n] for n in sorted(set(images.names) - pool_set)]
            self._label_train(images, pool_set, pids)
        else:
            order = [images.index[n] for n in pool]
            self._label_gallery(images, pool, pids)
        annos = []
        for i in order:
            lo, hi = images.offsets[i], images.offsets[i + 1]
            if self.split == "train" and hi == lo:
                continue
            annos.append(self._make_anno(images.names[i], images.xywh[lo:hi], pids[lo:hi]))
        return annos

    def _locate(self, images: _ImagesTable, names, xywh: np.ndarray, allowed, where) -> np.ndarray:
        """Rows of Images.mat boxes equal to the given (image name, x, y, w, h) entries."""
        img_idx = np.fromiter(
            (images.index.get(n, -1) for n in names), dtype=np.int64, count=len(names)
        )
        bad = np.flatnonzero(img_idx < 0)
        if bad.size:
            j = int(bad[0])
            raise DatasetError(f"{where(j)}: image {names[j]!r} is not in {images.path}")
        bad = [j for j, n in enumerate(names) if n not in allowed]
        if bad:
            j = bad[0]
            raise DatasetError(f"{where(j)}: image {names[j]!r} is not in the {self._split_word()}")
        rows = match_rows(images.keys(), np.concatenate([img_idx[:, None], xywh], axis=1))
        bad = np.flatnonzero(rows < 0)
        if bad.size:
            # SeqNet labels a box only when its coordinates equal one of the image's boxes and
            # skips the others; we skip them too (the real files are what they are) but say so.
            j = int(bad[0])
            warnings.warn(
                f"{bad.size} identity box(es) match no box of their image in {images.path} and "
                f"stay unlabeled; first: {where(j)}: box (x, y, w, h) = {xywh[j].tolist()} is not "
                f"among the boxes of {names[j]!r}",
                DatasetWarning,
                stacklevel=3,
            )
        return rows

    def _split_word(self) -> str:
        return "training set (Images.mat minus pool.mat)" if self.split == "train" else "gallery set (pool.mat)"

    def _label_train(self, images: _ImagesTable, pool_set, pids: np.ndarray) -> None:
        train = self._parsed(self._anno_path("test", "train_test", "Train.mat"), _parse_train, _TrainTable)
        allowed = _NotIn(pool_set)
        rows = self._locate(
            images,
            train.names,
            train.xywh,
            allowed,
            lambda j: f"{train.path}: Train[{train.ident[j]}] scene entry",
        )
        ok = rows >= 0
        pids[rows[ok]] = train.ident[ok] + 1

    def _label_gallery(self, images: _ImagesTable, pool: List[str], pids: np.ndarray) -> None:
        testg = self._testg(50)
        pool_set = set(pool)
        q_rows = self._locate(
            images, testg.q_names, testg.q_xywh, pool_set, lambda j: f"{testg.path}: query {j}"
        )
        known = np.isin(testg.names, np.asarray(pool, dtype=str))[testg.g_codes]
        if not known.all():
            qk, gk = (int(v[0]) for v in np.nonzero(~known))
            name = str(testg.names[testg.g_codes[qk, gk]])
            where = "in" if name in images.index else f"in {images.path} nor in"
            raise DatasetError(
                f"{testg.path}: query {qk} gallery entry {gk}: image {name!r} is not {where} "
                f"the gallery set (pool.mat)"
            )
        qi, gi = np.nonzero(testg.g_present)
        g_names = testg.names[testg.g_codes[qi, gi]].tolist()
        g_rows = self._locate(
            images,
            g_names,
            testg.g_xywh[qi, gi],
            pool_set,
            lambda j: f"{testg.path}: query {qi[j]} gallery entry {gi[j]}",
        )
        num_q = len(testg.q_names)
        q_ok, g_ok = q_rows >= 0, g_rows >= 0
        pids[q_rows[q_ok]] = np.arange(num_q)[q_ok] + 1
        pids[g_rows[g_ok]] = qi[g_ok] + 1
        # gallery index of every query image, kept for the protocols
        pos = {n: i for i, n in enumerate(pool)}
        self._query_image = np.array([pos[n] for n in testg.q_names], dtype=np.int64)
        self._pool_names = list(pool)

    def _load_queries(self) -> List[Dict]:
        testg = self._testg(50)
        return [
            self._make_anno(name, testg.q_xywh[k : k + 1], [k + 1])
            for k, name in enumerate(testg.q_names)
        ]

    # protocol -----------------------------------------------------------------------------
    def load_protocol(self, gallery_size: int = 100, query_dataset=None) -> CUHKProtocol:
        """The search protocol for ``gallery_size`` (50..4000 from TestG<size>.mat, or -1).

        Cached per size. When ``query_dataset`` is given, its order is checked against the
        TestG50 queries that define the query split.
        """
        if self.split != "gallery":
            raise ValueError(f"load_protocol needs the gallery split, this is {self.split!r}")
        size = int(gallery_size)
        if size <= 0 and size != -1:
            raise ValueError(f"gallery size must be positive or -1, got {size}")
        if size not in self._protocols and size == -1:
            self._protocols[size] = self._build_protocol(size)  # cheap to build, large to keep
        elif size not in self._protocols:
            self._protocols[size] = cached_parse(
                self.testg_path(size), lambda _: self._build_protocol(size), cache_dir=self.cache_dir,
                result_type=CUHKProtocol, name="CUHK-SYSU.protocol",
                sources=[self._anno_path("Images.mat"), self._anno_path("pool.mat"), self.testg_path(50)])
        if query_dataset is not None:
            self.check_query_order(query_dataset)
        return self._protocols[size]

    def check_query_order(self, query_dataset) -> None:
        """Check that ``query_dataset`` lists the TestG50 queries in file order."""
        testg = self._testg(50)
        annos = query_dataset.annotations
        if len(annos) != len(testg.q_names):
            raise DatasetError(
                f"query dataset has {len(annos)} queries, {testg.path} has {len(testg.q_names)}"
            )
        for k, anno in enumerate(annos):
            box = xywh_to_xyxy(testg.q_xywh[k : k + 1]).reshape(4)
            if anno["img_name"] != testg.q_names[k] or not np.array_equal(
                np.asarray(anno["boxes"]).reshape(-1)[:4], box
            ):
                raise DatasetError(
                    f"query dataset entry {k} ({anno['img_name']}) differs from query {k} of "
                    f"{testg.path} ({testg.q_names[k]}, box {box.tolist()})"
                )

    def _build_protocol(self, size: int) -> CUHKProtocol:
        num_gallery = len(self.annotations)
        own = self._query_image
        num_q = len(own)
        if size == -1:
            base = np.broadcast_to(np.arange(num_gallery - 1, dtype=np.int64), (num_q, num_gallery - 1))
            query_gallery = base + (base >= own[:, None])
            pids = np.concatenate([a["pids"] for a in self.annotations]).astype(np.int64)
            counts = np.fromiter((len(a["pids"]) for a in self.annotations), dtype=np.int64, count=num_gallery)
            owner = np.repeat(np.arange(num_gallery, dtype=np.int64), counts)
            boxes = np.concatenate([a["boxes"] for a in self.annotations]).reshape(-1, 4)
            sel = (pids >= 1) & (pids <= num_q) & (pids != UNLABELED_PID)
            gt_query = pids[sel] - 1
            gt_gallery = owner[sel]
            gt_boxes = boxes[sel].astype(np.float32)
            not_own = gt_gallery != own[gt_query]
            gt_query, gt_gallery, gt_boxes = gt_query[not_own], gt_gallery[not_own], gt_boxes[not_own]
            # one entry per image: a person annotated twice in an image keeps the first box
            _, first = np.unique(gt_query * max(num_gallery, 1) + gt_gallery, return_index=True)
            gt_query, gt_gallery, gt_boxes = gt_query[first], gt_gallery[first], gt_boxes[first]
            order = np.lexsort((gt_gallery, gt_query))
            return CUHKProtocol(
                size,
                np.ascontiguousarray(query_gallery),
                gt_query[order].astype(np.int64),
                gt_gallery[order].astype(np.int64),
                gt_boxes[order].reshape(-1, 4),
            )
        if size <= 0:
            raise ValueError(f"gallery size must be positive or -1, got {size}")
        testg = self._testg(size)
        ref = self._testg(50)
        if testg.q_names != ref.q_names or not np.array_equal(testg.q_xywh, ref.q_xywh):
            k = _first_difference(testg, ref)
            raise DatasetError(
                f"{testg.path}: query {k} differs from query {k} of {ref.path}, which defines "
                f"the query split (the query order must be the same in every TestG file)"
            )
        names = np.asarray(self._pool_names, dtype=str)
        order = np.argsort(names, kind="stable")
        sorted_names = names[order]
        pos = np.clip(np.searchsorted(sorted_names, testg.names), 0, max(len(names) - 1, 0))
        found = sorted_names[pos] == testg.names if len(names) else np.zeros(len(testg.names), bool)
        if not found.all():
            qk, gk = (int(v[0]) for v in np.nonzero(~found[testg.g_codes]))
            raise DatasetError(
                f"{testg.path}: query {qk} gallery entry {gk}: image "
                f"{str(testg.names[testg.g_codes[qk, gk]])!r} is not in the gallery set (pool.mat)"
            )
        query_gallery = order[pos][testg.g_codes].astype(np.int64)
        gt_query, gt_col = np.nonzero(testg.g_present)
        gt_boxes = xywh_to_xyxy(testg.g_xywh[gt_query, gt_col]).astype(np.float32).reshape(-1, 4)
        return CUHKProtocol(
            size,
            query_gallery,
            gt_query.astype(np.int64),
            query_gallery[gt_query, gt_col].astype(np.int64),
            gt_boxes,
        )


class _NotIn:
    """Membership test ``x in _NotIn(s)`` == ``x not in s``."""

    def __init__(self, excluded):
        self.excluded = excluded

    def __contains__(self, item) -> bool:
        return item not in self.excluded


def _first_difference(a: _TestGTable, b: _TestGTable) -> int:
    n = min(len(a.q_names), len(b.q_names))
    for k in range(n):
        if a.q_names[k] != b.q_names[k] or not np.array_equal(a.q_xywh[k], b.q_xywh[k]):
            return k
    return n
