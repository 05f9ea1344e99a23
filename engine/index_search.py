"""Search a person-search index: the top K detections for a query embedding.

Ranking: by similarity (dot product of the query embedding with a row's embedding, the search
protocols' similarity), ties broken by row order, as the protocols break them by gallery order.
Two searchers find the candidates and give the same ranking:
- ``ExactSearcher`` (numpy): one matrix-vector product over all rows;
- ``FaissSearcher`` (faiss-cpu ``IndexFlatIP``, also exact), used from ``FAISS_MIN_ROWS`` rows on.
  The switch point comes from tools/bench_index.py: on a 2-core CPU numpy's one product (BLAS on
  all cores) was faster for one query at every size measured, 1e3 to 3e6 rows (59 vs 86 ms at
  1e6, 168 vs 330 ms at 3e6: faiss scans a single query on one thread), so ``auto`` goes to FAISS
  only beyond that, from 5e6 rows; ``faiss_min_rows`` moves it for a machine where FAISS wins.
Both return every row whose float32 similarity is within ``CANDIDATE_MARGIN`` of the K-th
largest, and the candidates are then ranked by their similarity recomputed in float64, so the
two agree exactly even though their float32 sums round differently.

CBGM re-ranking (optional) applies the protocols' rule (``engine.evaluation``, CBGM): for each
distinct image among the first k1 hits, the query image's people (the query box first, then the
query image's own detections, the first k2) are matched to the image's detections by a
maximum-weight assignment (scipy's linear_sum_assignment); when the query person is matched to
detection j, j's similarity becomes the largest single weight of the matched pairs. The hits are
then ranked again. Weights are computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from engine.person_index import IndexArrays

__all__ = ["CANDIDATE_MARGIN", "FAISS_MIN_ROWS", "ExactSearcher", "FaissSearcher", "Hit", "build_searcher",
           "cbgm_rerank", "rank", "search"]

FAISS_MIN_ROWS = 5_000_000
# float32 similarities of unit-length 256-d vectors are off by ~1e-6 at most; candidates within
# this margin of the K-th largest are re-scored in float64
CANDIDATE_MARGIN = 1e-4


class ExactSearcher:
    """Candidates by one numpy product over all rows."""

    name = "numpy"

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        sims = self.embeddings @ query.astype(np.float32)
        n = len(sims)
        if k >= n:
            return np.arange(n)
        kth = np.partition(sims, n - k)[n - k]
        return np.flatnonzero(sims >= kth - CANDIDATE_MARGIN)


class FaissSearcher:
    """Candidates from faiss's exact inner-product index (asks for more until the margin is covered)."""

    name = "faiss"

    def __init__(self, embeddings: np.ndarray):
        import faiss

        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings)

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        n = self.index.ntotal
        if k >= n:
            return np.arange(n)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        asked = min(n, 2 * k + 16)
        while True:
            sims, rows = self.index.search(q, asked)
            sims, rows = sims[0], rows[0]
            kth = sims[k - 1]
            # all rows within the margin are in when the last one returned is below it
            if asked == n or sims[-1] < kth - CANDIDATE_MARGIN:
                return np.sort(rows[sims >= kth - CANDIDATE_MARGIN])
            asked = min(n, asked * 2)


def build_searcher(embeddings: np.ndarray, kind: str = "auto", faiss_min_rows: int = FAISS_MIN_ROWS):
    """``kind``: "numpy", "faiss" or "auto" (faiss from ``faiss_min_rows`` rows on)."""
    if kind == "auto":
        kind = "faiss" if len(embeddings) >= faiss_min_rows else "numpy"
    if kind == "numpy":
        return ExactSearcher(embeddings)
    if kind == "faiss":
        return FaissSearcher(embeddings)
    raise ValueError(f"searcher must be auto, numpy or faiss, got {kind!r}")


def rank(embeddings: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first k of ``rows`` by float64 similarity, descending, ties by row: (rows, similarities)."""
    rows = np.asarray(rows, dtype=np.int64)
    sims = embeddings[rows].astype(np.float64) @ query.astype(np.float64)
    order = np.lexsort((rows, -sims))[:k]
    return rows[order], sims[order]


def cbgm_rerank(arrays: IndexArrays, rows: np.ndarray, sims: np.ndarray, query_image_feats: np.ndarray,
                k1: int, k2: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, similarities) after CBGM on the first k1 of ``rows`` (ranked, best first). The
    detection an image's matching gives the query person may lie outside ``rows``: it is added
    with its new similarity, as the protocol changes it wherever it is."""
    rows, sims = np.asarray(rows, dtype=np.int64), sims.copy()
    if query_image_feats is None or len(query_image_feats) == 0:
        return rows, sims
    people = np.asarray(query_image_feats, dtype=np.float64)[:k2]
    position = {int(r): i for i, r in enumerate(rows.tolist())}
    extra_rows, extra_sims = [], []
    for image in np.unique(arrays.image[rows[:k1]]):  # every image once, from the original similarities
        span = arrays.image_rows(int(image))
        weights = people @ arrays.embeddings[span].astype(np.float64).T
        matched_people, matched_dets = linear_sum_assignment(weights, maximize=True)
        if matched_people.size and matched_people[0] == 0:  # row 0 is the query person
            target = span.start + int(matched_dets[0])
            # the largest single weight of the matched pairs (the protocol's rule), not their total
            value = weights[matched_people, matched_dets].max()
            if target in position:
                sims[position[target]] = value
            else:
                extra_rows.append(target)
                extra_sims.append(value)
    if extra_rows:
        rows = np.concatenate([rows, np.asarray(extra_rows, dtype=np.int64)])
        sims = np.concatenate([sims, np.asarray(extra_sims)])
    return rows, sims


@dataclass
class Hit:
    rank: int
    row: int
    similarity: float
    source: str
    kind: str
    frame: int          # -1 for a picture
    time: Optional[float]
    box: List[float]
    detection_score: float

    def as_dict(self):
        return dict(self.__dict__)


def search(arrays: IndexArrays, sources: List[dict], query: np.ndarray, k: int, searcher=None,
           query_image_feats: Optional[np.ndarray] = None, cbgm: Optional[Tuple[int, int]] = None) -> List[Hit]:
    """The top ``k`` hits for a query embedding; ``cbgm=(k1, k2)`` re-ranks with the query
    image's detections ``query_image_feats`` (query box first)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(arrays) == 0:
        return []
    searcher = searcher or build_searcher(arrays.embeddings)
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    if query.shape[0] != arrays.embeddings.shape[1]:
        raise ValueError(f"query embedding has {query.shape[0]} values; the index holds "
                         f"{arrays.embeddings.shape[1]}-d embeddings")
    if cbgm is None:
        rows, sims = rank(arrays.embeddings, query, searcher.candidates(query, k), k)
    else:
        # a re-ranked top k comes from the first k1 (changed) and the next k (unchanged) hits
        k1, k2 = cbgm
        depth = k1 + k
        rows, sims = rank(arrays.embeddings, query, searcher.candidates(query, depth), depth)
        rows, sims = cbgm_rerank(arrays, rows, sims, query_image_feats, k1, k2)
        order = np.lexsort((rows, -sims))[:k]
        rows, sims = rows[order], sims[order]
    hits = []
    for position, (row, sim) in enumerate(zip(rows.tolist(), sims.tolist()), start=1):
        src = sources[int(arrays.source[row])]
        t = float(arrays.time[row])
        hits.append(Hit(position, row, float(sim), src["path"], src["kind"], int(arrays.frame[row]),
                        None if np.isnan(t) else t, [float(v) for v in arrays.boxes[row]],
                        float(arrays.scores[row])))
    return hits
