"""Evaluation protocols of person search: detection, CUHK-SYSU search, PRW search (SPEC 7, 10).

Inputs (what `engine.inference` produces and `eval_cache.pth` stores)
--------------------------------------------------------------------
- ``gallery_dets``: one entry per gallery image, in the order of ``gallery_dataset.annotations``:
  an (n, 5) array ``x1, y1, x2, y2, score`` (n may be 0; ``[]`` and ``None`` also mean "none").
- ``gallery_feats``: one (n, D) array per gallery image, row i the embedding of detection i.
- ``query_box_feats``: one (1, D) (or (D,)) array per query, the embedding of the query box;
  a single (Q, D) array is accepted too.
- ``query_dets`` / ``query_feats``: per query, the detections of the query image used as a
  gallery, the query box first (only needed for CBGM).
numpy arrays or torch tensors (any device); everything is converted once, up front.

Detection (`eval_detection`)
----------------------------
Per gallery image, the detections with ``score >= det_thresh`` are matched to the ground-truth
boxes as the original protocol does (one detection per gt and one gt per detection, by largest
IoU): detection d is a true positive when some gt g has IoU(g, d) >= ``iou_thresh``, g is d's
largest-IoU gt and d is g's largest-IoU detection (ties: the first index, as ``np.argmax``).
Every other detection is a false positive.
recall = TP / number of gt boxes; AP = sklearn ``average_precision_score`` over the detections
(label TP/FP, score = detection score) x recall, 0 when there is no TP. An image without
detections only adds its gt boxes. ``labeled_only``: only boxes with pid != 5555 are ground
truth and, as in the original code, images with no labeled box are left out entirely (their
detections are not counted as false positives). IoU is the plain continuous one
(no "+1"): inter / (area_a + area_b - inter).

Search, common to both datasets
-------------------------------
Gallery detections are those with ``score >= det_thresh``. For a query q with embedding f_q:

- candidates: every kept detection of every image in q's gallery, in *canonical order*:
  gallery images by increasing index in ``gallery_dataset.annotations``, then detections in
  their order within the image. similarity = dot(f_q, f_det) (float32 when the features are
  float32, as in the original).
- images holding the person: for CUHK-SYSU the (query, image) pairs of the protocol that lie
  in q's gallery; for PRW the gallery images whose annotation contains q's pid. The person's
  box there (the first box with that pid if the annotation has several) gives the IoU
  threshold min(0.5, w*h / ((w + 10) * (h + 10))).
- hit: in each image holding the person, the image's detections sorted by similarity
  (descending, stable, so equal similarities keep detection order): the first one whose IoU
  with the person's box reaches the threshold is the hit (label 1); every other candidate has
  label 0. count_gt = number of images holding the person in q's gallery (whether or not they
  have detections), count_tp = number of hits.
- AP(q) = average_precision_score(labels, similarities) * count_tp / count_gt over all of q's
  candidates; 0 when there is no hit (no candidate, no detection on the person, or count_gt
  = 0). AP is computed in closed form instead of calling sklearn (identical, including its
  handling of ties: all candidates with equal similarity form one threshold):
  AP * count_tp = sum over the distinct hit similarities v of
  #hits(= v) * #hits(>= v) / #candidates(>= v).
- top-k (k = 1, 5, 10): the candidates sorted by similarity descending with a *stable* sort
  of the canonical order (``np.argsort(-sims, kind="stable")``); top-k(q) = 1 when a hit is
  among the first k. Ties are therefore broken by gallery image index, then detection index
  (independent of whether an image holds the person; the original used a non-stable reversed
  argsort, whose tie order is arbitrary).
- mAP and top-k are the means over all queries (queries with no hit count as 0).

CBGM (``cbgm=True``), applied to each query before the hits are determined
--------------------------------------------------------------------------
1. take the k1 candidates of largest (original) similarity (the first k1 of the stable sort
   above; fewer when there are fewer candidates);
2. for every distinct gallery image those lie in: the query image's people
   ``query_feats[q][:k2]`` (the query box first, then the query image's other detections in
   their stored order, no score threshold) and the gallery image's kept detections; weight
   matrix W = query-image feats x gallery-image feats^T (k2' x n); maximum-weight assignment
   ``scipy.optimize.linear_sum_assignment(W, maximize=True)`` (min(k2', n) pairs);
3. if row 0 (the query person) is assigned to detection j, the similarity of detection j
   becomes the LARGEST single weight among the assigned pairs of that assignment (the
   original's ``max_val``: max over the matched (query-image person, detection) pairs of their
   dot product), not the assignment's total weight. When row 0 is left unassigned (the gallery
   image has fewer detections than k2'), nothing changes. No other similarity changes; all
   images are processed from the original similarities. This rule defines the published CBGM
   numbers (SeqNet's and DDPS's), odd as it looks: it is reproduced exactly.
The hits, AP and top-k then use the modified similarities.

CUHK-SYSU (`eval_search_cuhk`)
------------------------------
``protocol = gallery_dataset.load_protocol(gallery_size)`` (`datasets.cuhk_sysu.CUHKProtocol`):
q's gallery = ``protocol.query_gallery[q]`` (G images; -1 = all gallery images but the query's
own), the images holding the person = the rows of ``gt_query == q`` (a pair outside q's gallery
is ignored). An image listed twice in a gallery is searched once, with its first box, but
count_gt counts every entry that holds the person, as the original does. k1 = 10, k2 = 3.

PRW (`eval_search_prw`)
-----------------------
q's gallery = every gallery (test) image except the query's own image (matched by
``img_name``); with ``ignore_cam_id=False`` only the images of other cameras. The images
holding the person are the gallery images (of that gallery) whose annotation contains q's pid.
k1 = 30, k2 = 4.

Implementation
--------------
All kept detections are concatenated once (boxes, features, image index, per-image offsets).
The IoU tests of the images holding each query's person do not depend on the similarities and
are done for all queries at once; the hit of an image is then a segmented maximum of the
similarities over its qualifying detections. Similarities are computed either densely (a block
of queries x all detections per matrix product, non-candidates set to -inf; used for PRW and
large CUHK-SYSU galleries) or sparsely (small CUHK-SYSU galleries: one small product per
gallery image with the queries whose gallery holds it, written into per-query candidate rows).
Per query, AP needs only #candidates >= each distinct hit similarity: one vectorised comparison
pass per value over the candidates at or above the lowest hit (a sort when there are many).
CBGM's k1 best candidates are found with a pre-filter (the k1-th largest of 256 piece maxima is
a lower bound of the k1-th largest similarity) and a partition, ties resolved as stated above.

Returned dict (both datasets): ``mAP`` (float), ``accs`` (array: top-1, top-5, top-10),
``top1``/``top5``/``top10`` (floats), per query ``aps``, ``topk`` (Q x 3, 0/1), ``count_gt``,
``count_tp`` and ``first_hit_rank`` (0-based position of the first hit in the sorted candidate
list when it is < 10; otherwise the number of candidates strictly more similar than the best
hit; int64 max when there is no hit).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import average_precision_score

__all__ = [
    "eval_detection",
    "eval_search_cuhk",
    "eval_search_prw",
    "eval_search",
    "average_precision",
    "search_iou_threshold",
]

UNLABELED_PID = 5555
TOPK = (1, 5, 10)

# Tuning knobs (module level so tests can force either code path).
_SPARSE_MAX_FRACTION = 0.2  # CUHK: sparse similarities when G <= this fraction of the gallery
_DENSE_BLOCK_BYTES = 32 << 20  # size of one block of dense similarities (~256 rows)
_CHUNK_ROWS = None  # fixed number of queries per dense block (None: from _DENSE_BLOCK_BYTES)
_PAIR_BLOCK_ELEMS = 1 << 20  # gallery entries compared per block in membership tests
_COUNT_BY_COMPARE_MAX = 1 << 22  # AP counts by comparisons up to this many, else by sorting
_TOPK_PIECES = 256  # pieces for the lower bound of the k1-th largest similarity (CBGM)


# ----------------------------------------------------------------------------------------------
# conversion helpers


def _to_numpy(x, dtype=None) -> np.ndarray:
    """numpy view/copy of an array, a torch tensor (any device), a list or None."""
    if x is None:
        arr = np.zeros((0,), dtype=dtype or np.float64)
    elif hasattr(x, "detach"):  # torch.Tensor
        arr = x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _float_dtype(*dtypes) -> np.dtype:
    """Common float dtype of feature arrays, at least float32."""
    kinds = [d for d in dtypes if d is not None]
    out = np.result_type(np.float32, *kinds) if kinds else np.dtype(np.float32)
    if not np.issubdtype(out, np.floating):
        out = np.dtype(np.float64)
    return out


def _stack_rows(items, width=None, dtype=None) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate a list of (n_i, width) arrays; returns (matrix, counts)."""
    arrays = [_to_numpy(x) for x in items]
    if width is None:
        width = next((a.size // max(a.shape[0], 1) for a in arrays if a.ndim == 2 and a.size), 0)
        if width == 0:
            width = next((a.size for a in arrays if a.ndim == 1 and a.size), 0)
    shaped = []
    for a in arrays:
        if a.size == 0:
            shaped.append(np.zeros((0, width), dtype=a.dtype if a.dtype.kind == "f" else np.float64))
        else:
            shaped.append(a.reshape(-1, width) if a.ndim != 2 else a)
    counts = np.fromiter((a.shape[0] for a in shaped), dtype=np.int64, count=len(shaped))
    if dtype is None:
        dtype = _float_dtype(*(a.dtype for a in shaped if a.size)) if shaped else np.float32
    mat = np.concatenate(shaped, axis=0).astype(dtype, copy=False) if shaped else np.zeros((0, width), dtype)
    return np.ascontiguousarray(mat), counts


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) and the owner i of each."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    excl = np.cumsum(lengths) - lengths
    idx = np.repeat(starts - excl, lengths) + np.arange(total, dtype=np.int64)
    return idx, owner


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i] for (n, 4) xyxy arrays (no +1 convention)."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def search_iou_threshold(boxes) -> np.ndarray:
    """min(0.5, w*h / ((w+10)(h+10))) for (n, 4) xyxy person boxes (tiny people get a lower bar)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))


# ----------------------------------------------------------------------------------------------
# average precision


def _ap_times_npos(hit_scores: np.ndarray, pool: np.ndarray) -> Tuple[float, int]:
    """sum over the distinct hit scores v of #hits(= v) * #hits(>= v) / #items(>= v).

    ``pool``: the scores of all items at or above min(hit_scores), in any order (hits
    included). The sum equals sklearn's average_precision_score x the number of positives.
    Returns (sum, #items >= max(hit_scores)).
    """
    if hit_scores.size == 1:
        uv, n_at = hit_scores, np.ones(1, dtype=np.int64)
    else:  # ascending distinct hit scores and their multiplicities
        hs = np.sort(hit_scores)
        last = np.flatnonzero(np.append(hs[1:] != hs[:-1], True))
        uv, n_at = hs[last], np.diff(last, prepend=-1)
    tp_ge = np.cumsum(n_at[::-1])[::-1]
    if uv.size * pool.size <= _COUNT_BY_COMPARE_MAX:
        n_ge = np.count_nonzero(pool[None, :] >= uv[:, None], axis=1)  # one vector pass per value
    else:
        srt = np.sort(pool)
        n_ge = srt.size - np.searchsorted(srt, uv, side="left")
    return float(np.sum(n_at * tp_ge / n_ge)), int(n_ge[-1])


def average_precision(y_true, y_score) -> float:
    """Binary average precision, identical to sklearn's ``average_precision_score``.

    sklearn: AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (all items with
    equal scores enter together). 0.0 when there is no positive.
    """
    y_true = np.asarray(y_true).ravel() > 0
    y_score = np.asarray(y_score).ravel()
    npos = int(y_true.sum())
    if npos == 0:
        return 0.0
    hits = y_score[y_true]
    return _ap_times_npos(hits, y_score[y_score >= hits.min()])[0] / npos


# ----------------------------------------------------------------------------------------------
# detection


def eval_detection(gallery_dataset, gallery_dets, det_thresh=0.5, iou_thresh=0.5, labeled_only=False):
    """Detection recall and AP on the gallery split (module docstring). Returns (recall, ap)."""
    annos = gallery_dataset.annotations
    if len(gallery_dets) != len(annos):
        raise ValueError(f"{len(gallery_dets)} detection entries for {len(annos)} gallery images")
    n_img = len(annos)
    det_all, det_counts = _stack_rows(gallery_dets, width=5, dtype=np.float64)
    det_img = np.repeat(np.arange(n_img, dtype=np.int64), det_counts)

    gt_boxes, gt_counts = _stack_rows([a["boxes"] for a in annos], width=4, dtype=np.float64)
    gt_pids = np.concatenate([np.asarray(a["pids"]).reshape(-1) for a in annos]) if n_img else np.zeros(0)
    gt_img = np.repeat(np.arange(n_img, dtype=np.int64), gt_counts)
    if labeled_only:
        keep_gt = gt_pids != UNLABELED_PID
        gt_boxes, gt_img = gt_boxes[keep_gt], gt_img[keep_gt]
        used_img = np.bincount(gt_img, minlength=n_img) > 0  # images with >= 1 labeled box
    else:
        used_img = np.ones(n_img, dtype=bool)

    keep = (det_all[:, 4] >= det_thresh) & used_img[det_img]
    det_all, det_img = det_all[keep], det_img[keep]
    n_gt, n_det = len(gt_img), len(det_img)
    if n_gt == 0:
        return 0.0, 0.0

    # all (gt, det) pairs of the same image, in (image, gt, det) order
    gt_start = _offsets(np.bincount(gt_img, minlength=n_img))
    det_start = _offsets(np.bincount(det_img, minlength=n_img))
    ng = np.diff(gt_start)
    nd = np.diff(det_start)
    pair_k, pair_img = _ranges(np.zeros(n_img, dtype=np.int64), ng * nd)
    pair_gt = gt_start[pair_img] + pair_k // np.maximum(nd[pair_img], 1)
    pair_det = det_start[pair_img] + pair_k % np.maximum(nd[pair_img], 1)
    iou = _pairwise_iou(gt_boxes[pair_gt], det_all[pair_det, :4])
    # mutual best: each detection's largest-IoU gt and each gt's largest-IoU detection (first
    # index on ties, like np.argmax); pairs are in (image, gt, det) order
    by_det = np.lexsort((pair_gt, -iou, pair_det))
    head = by_det[np.r_[True, pair_det[by_det][1:] != pair_det[by_det][:-1]]] if len(by_det) else by_det
    best_gt = np.full(n_det, -1, dtype=np.int64)
    best_gt[pair_det[head]] = pair_gt[head]
    by_gt = np.lexsort((pair_det, -iou, pair_gt))
    head = by_gt[np.r_[True, pair_gt[by_gt][1:] != pair_gt[by_gt][:-1]]] if len(by_gt) else by_gt
    best_det = np.full(n_gt, -1, dtype=np.int64)
    best_det[pair_gt[head]] = pair_det[head]
    mutual = (iou >= iou_thresh) & (best_gt[pair_det] == pair_gt) & (best_det[pair_gt] == pair_det)
    tp = np.zeros(n_det, dtype=bool)
    tp[pair_det[mutual]] = True
    n_tp = int(tp.sum())
    recall = n_tp / n_gt
    if n_tp == 0:
        return recall, 0.0
    ap = float(average_precision_score(tp, det_all[:, 4])) * recall
    return recall, ap


# ----------------------------------------------------------------------------------------------
# search: shared machinery


class _Gallery:
    """All kept gallery detections, concatenated in (image, detection) order."""

    def __init__(self, gallery_dets, gallery_feats, det_thresh, n_img):
        if len(gallery_dets) != n_img or len(gallery_feats) != n_img:
            raise ValueError(
                f"{len(gallery_dets)} detection / {len(gallery_feats)} feature entries for {n_img} gallery images"
            )
        dets, counts = _stack_rows(gallery_dets, width=5, dtype=np.float64)
        feats, fcounts = _stack_rows(gallery_feats)
        if not np.array_equal(counts, fcounts):
            bad = int(np.flatnonzero(counts != fcounts)[0])
            raise ValueError(f"gallery image {bad}: {counts[bad]} detections but {fcounts[bad]} features")
        img = np.repeat(np.arange(n_img, dtype=np.int64), counts)
        keep = dets[:, 4] >= det_thresh
        self.boxes = np.ascontiguousarray(dets[keep, :4])
        self.feats = np.ascontiguousarray(feats[keep])
        self.img = img[keep]
        self.count = np.bincount(self.img, minlength=n_img).astype(np.int64)
        self.start = _offsets(self.count)
        self.n_img = n_img

    @property
    def n(self) -> int:
        return len(self.img)


def _query_matrix(query_box_feats, n_query, dtype) -> np.ndarray:
    if hasattr(query_box_feats, "shape") and not isinstance(query_box_feats, (list, tuple)):
        mat = _to_numpy(query_box_feats).reshape(n_query, -1)
    else:
        if len(query_box_feats) != n_query:
            raise ValueError(f"{len(query_box_feats)} query features for {n_query} queries")
        mat = np.stack([_to_numpy(x).ravel() for x in query_box_feats]) if n_query else np.zeros((0, 0))
    return np.ascontiguousarray(mat.astype(dtype, copy=False))


class _Positives:
    """The (query, image, box) pairs where the query person appears inside the query's gallery,
    sorted by (query, image), and the detections of those images that pass the IoU test."""

    def __init__(self, gal: _Gallery, p_q, p_img, p_box, n_query, count_gt=None):
        self.p_q, self.p_img = p_q, p_img
        if count_gt is None:
            count_gt = np.bincount(p_q, minlength=n_query)
        self.count_gt = np.asarray(count_gt, dtype=np.int64)
        # every detection of every pair's image, in (pair, detection) order
        e_det, e_pair = _ranges(gal.start[p_img], gal.count[p_img])
        iou = _pairwise_iou(gal.boxes[e_det], p_box[e_pair])
        ok = iou >= search_iou_threshold(p_box)[e_pair]
        self.e_det, self.e_pair = e_det[ok], e_pair[ok]
        self.e_q = p_q[self.e_pair]
        # queries that can score at all (at least one qualifying detection)
        self.active = np.unique(self.e_q)


def _dedupe_pairs(q, img, box, n_img):
    """Unique (query, image) pairs sorted by (query, image), keeping the first box of each."""
    key = q.astype(np.int64) * max(n_img, 1) + img.astype(np.int64)
    _, first = np.unique(key, return_index=True)
    return q[first], img[first], box[first]


def _topk_stable(s: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first k items of the stable descending order of ``s`` (as a set):
    all items above the k-th largest value, then the equal ones in position order."""
    n = s.size
    if k >= n:
        return np.arange(n)
    cand = None
    if n >= 8 * _TOPK_PIECES and k <= _TOPK_PIECES:
        # the k-th largest of the pieces' maxima is <= the k-th largest item: a cheap pre-filter
        piece_max = s[: n - n % _TOPK_PIECES].reshape(_TOPK_PIECES, -1).max(axis=1)
        bound = np.partition(piece_max, _TOPK_PIECES - k)[_TOPK_PIECES - k]
        cand = np.flatnonzero(s >= bound)
    if cand is None:
        cand = np.arange(n)
    vals = s[cand]
    m = vals.size
    t = np.partition(vals, m - k)[m - k] if k < m else vals.min()  # k-th largest
    above = vals > t
    sel = cand[above]
    if sel.size < k:
        sel = np.concatenate([sel, cand[vals == t][: k - sel.size]])
    return sel


def _cbgm_inplace(s, n_valid, k1, k2, qimg_feats, local_to_det, gal: _Gallery):
    """Context bipartite graph matching on one query's similarity row ``s`` (see module doc)."""
    k = min(int(k1), int(n_valid))
    if k <= 0 or qimg_feats is None or len(qimg_feats) == 0:
        return
    sel = _topk_stable(s, k)
    dets = local_to_det(sel)
    imgs, first = np.unique(gal.img[dets], return_index=True)
    base = sel[first] - (dets[first] - gal.start[imgs])  # row position of each image's first det
    counts = gal.count[imgs]
    cols_all, _ = _ranges(gal.start[imgs], counts)
    weights = qimg_feats[:k2] @ gal.feats[cols_all].T  # (k2', detections of those images)
    col0 = np.cumsum(counts) - counts
    targets, seg_rows, seg_cols, seg_len = [], [], [], []
    for b, c0, n in zip(base.tolist(), col0.tolist(), counts.tolist()):
        rows, cols = linear_sum_assignment(weights[:, c0 : c0 + n], maximize=True)
        if rows.size and rows[0] == 0:  # rows come sorted: row 0 is the query person
            targets.append(b + int(cols[0]))
            seg_rows.append(rows)
            seg_cols.append(cols + c0)
            seg_len.append(rows.size)
    if targets:
        matched = weights[np.concatenate(seg_rows), np.concatenate(seg_cols)]
        starts = np.cumsum(seg_len) - np.asarray(seg_len)
        # the largest matched weight of each matching (the original's max_val), not its total
        s[np.asarray(targets)] = np.maximum.reduceat(matched, starts)


def _score_block(flat, row_start, rows_q, e_pos, e_q, e_pair, count_gt, aps, ranks, tps, kmax):
    """AP and first-hit rank of the queries ``rows_q`` whose similarity rows are
    ``flat[row_start[i]:row_start[i+1]]``; ``e_*``: their qualifying detections (flat positions,
    query, pair), sorted by (query, pair)."""
    if e_pos.size == 0:
        return
    e_val = flat[e_pos]
    seg = np.flatnonzero(np.concatenate(([True], e_pair[1:] != e_pair[:-1])))
    hv_all = np.maximum.reduceat(e_val, seg)  # hit similarity of every image holding the person
    hv_q = e_q[seg]
    h_bounds = np.searchsorted(hv_q, rows_q, side="left"), np.searchsorted(hv_q, rows_q, side="right")
    e_bounds = np.searchsorted(e_q, rows_q, side="left"), np.searchsorted(e_q, rows_q, side="right")
    for i, q in enumerate(rows_q.tolist()):
        h0, h1 = h_bounds[0][i], h_bounds[1][i]
        if h1 == h0:
            continue
        a, z = row_start[i], row_start[i + 1]
        s = flat[a:z]
        hv = hv_all[h0:h1]
        top = s[s >= hv.min()]  # the candidates that rank with or above some hit
        ap_sum, n_ge_max = _ap_times_npos(hv, top)
        aps[q] = ap_sum / count_gt[q]
        tps[q] = h1 - h0
        smax = hv.max()
        rank = int(np.count_nonzero(top > smax)) if n_ge_max > 1 else 0
        if rank < kmax:
            n_eq = n_ge_max - rank
            if n_eq > 1:  # ties with the best hit: stable order decides
                ev = e_val[e_bounds[0][i] : e_bounds[1][i]]
                ep = e_pos[e_bounds[0][i] : e_bounds[1][i]]
                pos_h = int(ep[ev == smax].min()) - a
                rank += int(np.count_nonzero(s[:pos_h] == smax))
        ranks[q] = rank


def _dense_rows(qf_rows, gal: _Gallery):
    """Rows per dense block."""
    if _CHUNK_ROWS is not None:
        return max(1, int(_CHUNK_ROWS))
    per_row = max(gal.n, 1) * max(np.dtype(qf_rows.dtype).itemsize, 4)
    return int(max(1, min(len(qf_rows) or 1, _DENSE_BLOCK_BYTES // per_row)))


def _run_dense(qf, gal, pos, exclude, cbgm_args, aps, ranks, tps, kmax):
    """Dense similarities for the active queries, one block of rows at a time.

    ``exclude(block, qs)`` sets the similarities of the detections outside each query's
    gallery to -inf and returns the number of candidates of each row.
    """
    act = pos.active
    if act.size == 0:
        return
    feats_t = gal.feats.T
    step = _dense_rows(qf, gal)
    ident = lambda sel: sel  # noqa: E731  (dense rows are indexed by detection)
    for c0 in range(0, act.size, step):
        qs = act[c0 : c0 + step]
        block = qf[qs] @ feats_t  # (B, n_det)
        n_valid = exclude(block, qs)
        if cbgm_args is not None:
            k1, k2, qimg = cbgm_args
            for i, q in enumerate(qs.tolist()):
                _cbgm_inplace(block[i], n_valid[i], k1, k2, qimg(q), ident, gal)
        e0 = np.searchsorted(pos.e_q, qs[0], side="left")
        e1 = np.searchsorted(pos.e_q, qs[-1], side="right")
        e_q = pos.e_q[e0:e1]
        row_of_q = np.searchsorted(qs, e_q)
        e_pos = row_of_q * gal.n + pos.e_det[e0:e1]
        row_start = np.arange(qs.size + 1, dtype=np.int64) * gal.n
        _score_block(block.ravel(), row_start, qs, e_pos, e_q, pos.e_pair[e0:e1], pos.count_gt, aps, ranks, tps, kmax)


def _exclude_images(gal: _Gallery, block, rows, images):
    """Set to -inf the similarities of the detections of images[i] in block[rows[i]]."""
    for r, g in zip(rows.tolist(), images.tolist()):
        block[r, gal.start[g] : gal.start[g + 1]] = -np.inf


def _find_in_rows(matrix, rows, values):
    """For each k: is values[k] in matrix[rows[k]], and the first column where it is."""
    found = np.zeros(len(rows), dtype=bool)
    col = np.zeros(len(rows), dtype=np.int64)
    step = max(1, _PAIR_BLOCK_ELEMS // max(matrix.shape[1], 1))
    for a in range(0, len(rows), step):
        eq = matrix[rows[a : a + step]] == values[a : a + step, None]
        found[a : a + step] = eq.any(axis=1)
        col[a : a + step] = eq.argmax(axis=1)
    return found, col


def _run_sparse(qf, gal, pos, qg_sorted_act, cbgm_args, aps, ranks, tps, kmax):
    """Sparse similarities: row i holds the candidates of query act[i] (its G images, sorted)."""
    act = pos.active
    if act.size == 0:
        return
    n_rows, G = qg_sorted_act.shape
    pair_img = qg_sorted_act.ravel()
    pair_n = gal.count[pair_img]
    pair_off = np.cumsum(pair_n) - pair_n  # flat offset of each (row, image) pair's detections
    row_start = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(pair_n.reshape(n_rows, G).sum(axis=1), out=row_start[1:])
    total = int(row_start[-1])

    # similarities, one product per gallery image with all rows whose gallery holds it
    pair_row = np.repeat(np.arange(n_rows, dtype=np.int64), G)
    order = np.argsort(pair_img, kind="stable")
    img_sorted = pair_img[order]
    bounds = np.searchsorted(img_sorted, np.arange(gal.n_img + 1))
    blocks = []
    for g in np.flatnonzero((np.diff(bounds) > 0) & (gal.count > 0)).tolist():
        rows = pair_row[order[bounds[g] : bounds[g + 1]]]
        blocks.append((qf[act[rows]] @ gal.feats[gal.start[g] : gal.start[g + 1]].T).ravel())
    dtype = _float_dtype(qf.dtype, gal.feats.dtype)
    flat = np.empty(total, dtype=dtype)
    if blocks:
        target, _ = _ranges(pair_off[order], pair_n[order])  # blocks are in `order` pair order
        flat[target] = np.concatenate(blocks)

    if cbgm_args is not None:
        k1, k2, qimg = cbgm_args
        cand_det, _ = _ranges(gal.start[pair_img], pair_n)  # detection index of each flat position
        for i, q in enumerate(act.tolist()):
            a, z = row_start[i], row_start[i + 1]
            _cbgm_inplace(flat[a:z], z - a, k1, k2, qimg(q), lambda sel, a=a: cand_det[a + sel], gal)

    # flat positions of the qualifying detections
    e_row = np.searchsorted(act, pos.e_q)
    p_of_e_img = pos.p_img[pos.e_pair]
    found, col = _find_in_rows(qg_sorted_act, e_row, p_of_e_img)
    assert found.all(), "a positive image outside the query's gallery"
    e_pos = pair_off[e_row * G + col] + (pos.e_det - gal.start[p_of_e_img])
    _score_block(flat, row_start, act, e_pos, pos.e_q, pos.e_pair, pos.count_gt, aps, ranks, tps, kmax)


def _query_image_feats(query_feats, n_query, dim, dtype):
    """Accessor q -> (m, dim) features of query image q (query box first)."""
    if query_feats is None:
        raise ValueError("CBGM needs query_feats (the query images' detections, query box first)")
    if len(query_feats) != n_query:
        raise ValueError(f"{len(query_feats)} query-image entries for {n_query} queries")

    def get(q):
        a = _to_numpy(query_feats[q])
        return np.ascontiguousarray(a.reshape(-1, dim).astype(dtype, copy=False))

    return get


def _finish(aps, ranks, tps, count_gt) -> Dict:
    topk = np.stack([ranks < k for k in TOPK], axis=1).astype(np.float64) if len(aps) else np.zeros((0, len(TOPK)))
    accs = topk.mean(axis=0) if len(aps) else np.zeros(len(TOPK))
    m_ap = float(aps.mean()) if len(aps) else 0.0
    return {
        "mAP": m_ap,
        "accs": accs,
        "top1": float(accs[0]),
        "top5": float(accs[1]),
        "top10": float(accs[2]),
        "aps": aps,
        "topk": topk,
        "first_hit_rank": ranks,
        "count_gt": count_gt,
        "count_tp": tps,
    }


def _search(qf, gal, pos, mode, exclude, qg_sorted_act, cbgm, k1, k2, query_feats, n_query):
    aps = np.zeros(n_query, dtype=np.float64)
    ranks = np.full(n_query, np.iinfo(np.int64).max, dtype=np.int64)
    tps = np.zeros(n_query, dtype=np.int64)
    cbgm_args = None
    if cbgm:
        cbgm_args = (k1, k2, _query_image_feats(query_feats, n_query, qf.shape[1], qf.dtype))
    kmax = max(TOPK)
    if mode == "sparse":
        _run_sparse(qf, gal, pos, qg_sorted_act, cbgm_args, aps, ranks, tps, kmax)
    else:
        _run_dense(qf, gal, pos, exclude, cbgm_args, aps, ranks, tps, kmax)
    return _finish(aps, ranks, tps, pos.count_gt)


def _prepare(gallery_dataset, gallery_dets, gallery_feats, query_box_feats, n_query, det_thresh):
    gal = _Gallery(gallery_dets, gallery_feats, det_thresh, len(gallery_dataset.annotations))
    probe = _to_numpy(query_box_feats if hasattr(query_box_feats, "shape") else (query_box_feats[0] if n_query else None))
    dtype = _float_dtype(gal.feats.dtype if gal.n else None, probe.dtype if probe.size else None)
    qf = _query_matrix(query_box_feats, n_query, dtype)
    gal.feats = gal.feats.astype(dtype, copy=False)
    if gal.n and qf.size and qf.shape[1] != gal.feats.shape[1]:
        raise ValueError(f"query features have {qf.shape[1]} dims, gallery features {gal.feats.shape[1]}")
    if gal.n == 0 and qf.ndim == 2:
        gal.feats = np.zeros((0, qf.shape[1]), dtype=dtype)
    return gal, qf


# ----------------------------------------------------------------------------------------------
# public protocols


def eval_search_cuhk(
    gallery_dataset,
    query_dataset,
    gallery_dets,
    gallery_feats,
    query_box_feats,
    query_dets,
    query_feats,
    k1=10,
    k2=3,
    det_thresh=0.5,
    cbgm=False,
    gallery_size=100,
):
    """CUHK-SYSU search protocol (module docstring). Returns a dict with ``mAP`` (float),
    ``accs`` (top-1, top-5, top-10) and per-query details (see the module docstring).

    ``query_dets`` is accepted for interface compatibility (CBGM uses ``query_feats``)."""
    protocol = gallery_dataset.load_protocol(gallery_size)
    query_gallery = _to_numpy(protocol.query_gallery).astype(np.int64, copy=False)
    n_query = len(query_dataset.annotations) if query_dataset is not None else len(query_gallery)
    if query_gallery.shape[0] != n_query:
        raise ValueError(f"protocol has {query_gallery.shape[0]} queries, the query set {n_query}")
    gal, qf = _prepare(gallery_dataset, gallery_dets, gallery_feats, query_box_feats, n_query, det_thresh)
    n_img = gal.n_img
    G = query_gallery.shape[1] if query_gallery.ndim == 2 else 0
    if query_gallery.size and (query_gallery.min() < 0 or query_gallery.max() >= n_img):
        raise ValueError("protocol gallery indices out of range of the gallery dataset")

    gt_q = _to_numpy(protocol.gt_query).astype(np.int64).ravel()
    gt_g = _to_numpy(protocol.gt_gallery).astype(np.int64).ravel()
    gt_b = _to_numpy(protocol.gt_boxes).astype(np.float64).reshape(-1, 4)
    inside, _ = _find_in_rows(query_gallery, gt_q, gt_g)
    gt_q, gt_g, gt_b = gt_q[inside], gt_g[inside], gt_b[inside]
    # the original counts every protocol entry holding the person, a repeated image each time,
    # while an image's detections are scored once, against its first box
    count_gt = np.bincount(gt_q, minlength=n_query)
    p_q, p_img, p_box = _dedupe_pairs(gt_q, gt_g, gt_b, n_img)
    pos = _Positives(gal, p_q, p_img, p_box, n_query, count_gt=count_gt)

    mode = "sparse" if 0 < G <= _SPARSE_MAX_FRACTION * n_img else "dense"
    qg_sorted_act = None
    if mode == "sparse":
        qg_sorted_act = np.sort(query_gallery[pos.active], axis=1)
        if G > 1 and np.any(qg_sorted_act[:, 1:] == qg_sorted_act[:, :-1]):
            mode = "dense"  # repeated images in a gallery: the dense mask ignores repeats

    def exclude(block, qs):
        rows = query_gallery[qs]
        outside = np.ones((len(qs), n_img), dtype=bool)
        outside[np.arange(len(qs))[:, None], rows] = False
        if G == n_img - 1 and np.count_nonzero(outside) == len(qs):  # "all but one image" (-1)
            r, g = np.nonzero(outside)
            _exclude_images(gal, block, r, g)
        else:
            np.copyto(block, -np.inf, where=np.repeat(outside, gal.count, axis=1))
        return gal.n - (outside * gal.count).sum(axis=1)

    return _search(qf, gal, pos, mode, exclude, qg_sorted_act, cbgm, k1, k2, query_feats, n_query)


def _cam_of(anno) -> int:
    if "cam_id" in anno:
        return int(anno["cam_id"])
    name = str(anno["img_name"])
    return int(name[1]) if len(name) > 1 and name[0] == "c" and name[1].isdigit() else -1


def eval_search_prw(
    gallery_dataset,
    query_dataset,
    gallery_dets,
    gallery_feats,
    query_box_feats,
    query_dets,
    query_feats,
    k1=30,
    k2=4,
    det_thresh=0.5,
    cbgm=False,
    ignore_cam_id=True,
):
    """PRW search protocol (module docstring). Returns a dict like `eval_search_cuhk`."""
    g_annos = gallery_dataset.annotations
    q_annos = query_dataset.annotations
    n_img, n_query = len(g_annos), len(q_annos)
    gal, qf = _prepare(gallery_dataset, gallery_dets, gallery_feats, query_box_feats, n_query, det_thresh)

    name_to_idx = {a["img_name"]: i for i, a in enumerate(g_annos)}
    img_cam = np.fromiter((_cam_of(a) for a in g_annos), dtype=np.int64, count=n_img)
    q_pid = np.fromiter((int(np.asarray(a["pids"]).ravel()[0]) for a in q_annos), dtype=np.int64, count=n_query)
    q_own = np.fromiter((name_to_idx.get(a["img_name"], -1) for a in q_annos), dtype=np.int64, count=n_query)
    q_cam = np.fromiter((_cam_of(a) for a in q_annos), dtype=np.int64, count=n_query)

    # (pid, image) occurrences in the gallery, first box of each, sorted by (pid, image)
    b_box, b_counts = _stack_rows([a["boxes"] for a in g_annos], width=4, dtype=np.float64)
    b_pid = np.concatenate([np.asarray(a["pids"]).reshape(-1) for a in g_annos]).astype(np.int64) if n_img else np.zeros(0, np.int64)
    b_img = np.repeat(np.arange(n_img, dtype=np.int64), b_counts)
    u_pid, u_img, u_box = _dedupe_pairs(b_pid, b_img, b_box, n_img)
    lo = np.searchsorted(u_pid, q_pid, side="left")
    hi = np.searchsorted(u_pid, q_pid, side="right")
    idx, p_q = _ranges(lo, hi - lo)
    p_img, p_box = u_img[idx], u_box[idx]
    keep = p_img != q_own[p_q]
    if not ignore_cam_id:
        keep &= img_cam[p_img] != q_cam[p_q]
    pos = _Positives(gal, p_q[keep], p_img[keep], p_box[keep], n_query)

    cams, cam_idx = np.unique(np.concatenate([img_cam, q_cam]), return_inverse=True)
    img_cam_idx, q_cam_idx = cam_idx[:n_img], cam_idx[n_img:]
    same_cam_det = None
    if not ignore_cam_id:  # (n_cams, n_det): detection lies in an image of that camera
        same_cam_det = img_cam_idx[gal.img][None, :] == np.arange(len(cams))[:, None]
    own_count = np.where(q_own >= 0, gal.count[np.maximum(q_own, 0)], 0)

    def exclude(block, qs):
        own = q_own[qs]
        if ignore_cam_id:
            rows = np.flatnonzero(own >= 0)
            _exclude_images(gal, block, rows, own[rows])
            return gal.n - own_count[qs]
        np.copyto(block, -np.inf, where=same_cam_det[q_cam_idx[qs]])
        rows = np.flatnonzero((own >= 0) & (img_cam_idx[np.maximum(own, 0)] != q_cam_idx[qs]))
        _exclude_images(gal, block, rows, own[rows])  # own image in another camera (odd data)
        n_same = same_cam_det.sum(axis=1)[q_cam_idx[qs]]
        return gal.n - n_same - np.where(np.isin(np.arange(len(qs)), rows), own_count[qs], 0)

    return _search(qf, gal, pos, "dense", exclude, None, cbgm, k1, k2, query_feats, n_query)


def eval_search(gallery_dataset, query_dataset, gallery_dets, gallery_feats, query_box_feats,
                query_dets=None, query_feats=None, cbgm=False, det_thresh=0.5, gallery_size=100,
                ignore_cam_id=True, k1=None, k2=None):
    """Dispatch on ``gallery_dataset.name`` ("CUHK-SYSU" or "PRW") with each dataset's k1/k2."""
    common = dict(
        gallery_dataset=gallery_dataset, query_dataset=query_dataset, gallery_dets=gallery_dets,
        gallery_feats=gallery_feats, query_box_feats=query_box_feats, query_dets=query_dets,
        query_feats=query_feats, det_thresh=det_thresh, cbgm=cbgm,
    )
    name = getattr(gallery_dataset, "name", None)
    if name == "CUHK-SYSU":
        return eval_search_cuhk(k1=10 if k1 is None else k1, k2=3 if k2 is None else k2,
                                gallery_size=gallery_size, **common)
    if name == "PRW":
        return eval_search_prw(k1=30 if k1 is None else k1, k2=4 if k2 is None else k2,
                               ignore_cam_id=ignore_cam_id, **common)
    raise ValueError(f"unknown dataset {name!r} (expected 'CUHK-SYSU' or 'PRW')")
