"""Tests of engine.evaluation: hand-computed cases and a slow reference implementation of SPEC 7.

The reference (`ref_search`) follows the protocol text literally: per query, per gallery image
Python loops, sklearn's average_precision_score, scipy's assignment for CBGM. The fast code must
agree with it on random worlds (ties included: the "dyadic" worlds use features whose dot
products are exact in float32, so many similarities are exactly equal).
"""


import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import average_precision_score

from engine import evaluation as ev

from datasets.cuhk_sysu import CUHKProtocol


class FakeDataset:
    def __init__(self, name, annotations, protocols=None):
        self.name = name
        self.annotations = annotations
        self._protocols = protocols or {}

    def load_protocol(self, size=100):
        return self._protocols[size]


def anno(name, boxes, pids, cam=None):
    a = {
        "img_name": name,
        "img_path": name + ".jpg",
        "boxes": np.asarray(boxes, dtype=np.int32).reshape(-1, 4),
        "pids": np.asarray(pids, dtype=np.int32).reshape(-1),
    }
    if cam is not None:
        a["cam_id"] = cam
    return a


def dets(*rows):
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def feats(*rows, dim=2):
    return np.asarray(rows, dtype=np.float32).reshape(-1, dim)


def protocol(size, query_gallery, gt_rows):
    """gt_rows: list of (query, gallery index, box)."""
    gt_rows = list(gt_rows)
    return CUHKProtocol(
        size,
        np.asarray(query_gallery, dtype=np.int64),
        np.asarray([r[0] for r in gt_rows], dtype=np.int64),
        np.asarray([r[1] for r in gt_rows], dtype=np.int64),
        np.asarray([r[2] for r in gt_rows], dtype=np.float32).reshape(-1, 4),
    )


# ----------------------------------------------------------------------------------------------
# average precision


@pytest.mark.parametrize("seed", range(8))
def test_average_precision_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y = rng.random(n) < rng.uniform(0.1, 0.7)
    y[rng.integers(n)] = True
    score = np.round(rng.random(n), int(rng.integers(0, 3))).astype(np.float32)  # many ties
    assert ev.average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_sorting_path(monkeypatch, seed):
    monkeypatch.setattr(ev, "_COUNT_BY_COMPARE_MAX", 0)  # count by sorting instead of comparisons
    rng = np.random.default_rng(100 + seed)
    y = rng.random(200) < 0.3
    score = np.round(rng.random(200), 1)
    assert ev.average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_topk_stable_matches_stable_argsort(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([5, 300, 5000]))
    s = np.round(rng.standard_normal(n), int(rng.integers(0, 3))).astype(np.float32)
    s[rng.random(n) < 0.3] = -np.inf  # outside the gallery
    n_valid = int(np.isfinite(s).sum())
    for pieces in (256, 8):
        monkeypatch.setattr(ev, "_TOPK_PIECES", pieces)
        for k in (1, 4, 10, 30, 300):
            k = min(k, n_valid)
            if k == 0:
                continue
            expected = np.argsort(-s, kind="stable")[:k]
            assert sorted(ev._topk_stable(s, k).tolist()) == sorted(expected.tolist())


def test_average_precision_no_positive():
    assert ev.average_precision([0, 0, 0], [0.3, 0.2, 0.1]) == 0.0


def test_search_iou_threshold_rule():
    thr = ev.search_iou_threshold([[0, 0, 10, 10], [5, 5, 105, 205], [0, 0, 20, 40]])
    assert thr[0] == pytest.approx(100 / 400)  # tiny person: 10x10 -> 0.25
    assert thr[1] == 0.5  # large person: capped at 0.5
    assert thr[2] == pytest.approx(min(0.5, 800 / (30 * 50)))


# ----------------------------------------------------------------------------------------------
# detection


def _detection_world():
    annos = [
        anno("a", [[0, 0, 100, 100], [50, 0, 150, 100]], [1, 2]),
        anno("b", [[0, 0, 50, 50]], [3]),
        anno("c", [[0, 0, 50, 50]], [5555]),
    ]
    d = [
        dets(
            [10, 0, 110, 100, 0.9],  # a: IoU 0.818 with gt1, 0.43 with gt2
            [40, 0, 140, 100, 0.8],  # b: IoU 0.43 with gt1, 0.818 with gt2
            [0, 0, 100, 100, 0.7],  # c: IoU 1 with gt1, 0.33 with gt2
            [0, 0, 100, 100, 0.2],  # below det_thresh
        ),
        [],  # no detection at all (the original's `det != []` crash)
        dets([0, 0, 50, 50, 0.95]),
    ]
    return FakeDataset("CUHK-SYSU", annos), d


def test_detection_one_to_one():
    ds, d = _detection_world()
    recall, ap = ev.eval_detection(ds, d, det_thresh=0.5)
    # a's best gt is gt1 but gt1's best detection is c (IoU 1): a is a FP; b <-> gt2, c <-> gt1.
    # sorted by score: d TP, a FP, b TP, c TP -> sklearn AP = 1/3 (1 + 2/3 + 3/4)
    assert recall == pytest.approx(3 / 4)
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 4) / 3 * 3 / 4)


def test_detection_labeled_only_and_threshold():
    ds, d = _detection_world()
    recall, ap = ev.eval_detection(ds, d, det_thresh=0.5, labeled_only=True)
    # image c (only an unlabeled person) is left out: a FP, b TP, c TP over 3 gts
    assert recall == pytest.approx(2 / 3)
    assert ap == pytest.approx((1 / 2 + 2 / 3) / 2 * 2 / 3)
    # with a low threshold the 0.2 duplicate of c joins as a FP at the end
    recall2, ap2 = ev.eval_detection(ds, d, det_thresh=0.1)
    assert recall2 == pytest.approx(3 / 4)
    assert ap2 == pytest.approx((1 + 2 / 3 + 3 / 4) / 3 * 3 / 4)


def test_detection_iou_threshold_and_empty():
    ds, d = _detection_world()
    recall, ap = ev.eval_detection(ds, d, det_thresh=0.5, iou_thresh=0.9)
    assert recall == pytest.approx(2 / 4)  # only the exact boxes c and d
    empty = [np.zeros((0, 5), np.float32), None, []]
    assert ev.eval_detection(ds, empty) == (0.0, 0.0)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_detection_matches_bruteforce_original_rule(seed):
    rng = np.random.default_rng(seed)
    annos, d = [], []
    for i in range(60):
        n = int(rng.integers(0, 5))
        xy = rng.integers(0, 60, (n, 2))
        wh = rng.integers(10, 40, (n, 2))
        annos.append(anno(f"im{i}", np.concatenate([xy, xy + wh], 1), rng.choice([1, 5555], n)))
        m = int(rng.integers(0, 7))
        dxy = rng.integers(0, 60, (m, 2))
        dwh = rng.integers(10, 40, (m, 2))
        # plus jittered copies of the gts: duplicates and near misses that stress the matching
        near = np.repeat(annos[-1]["boxes"].astype(float), 2, axis=0)
        near = near + rng.normal(0, 4, near.shape)
        boxes = np.concatenate([np.concatenate([dxy, dxy + dwh], 1), near])
        d.append(np.concatenate([boxes, rng.random((len(boxes), 1))], 1))
    for labeled_only in (False, True):
        y_true, y_score, n_gt = [], [], 0
        for a, det in zip(annos, d):
            gts = a["boxes"].astype(float)
            if labeled_only:
                gts = gts[a["pids"] != 5555]
                if len(gts) == 0:
                    continue
            n_gt += len(gts)
            det = det[det[:, 4] >= 0.5]
            iou = np.array([[_iou(g, x[:4]) for x in det] for g in gts]).reshape(len(gts), len(det))
            # the original's rule, literally: keep a pair only if it is its column's and its
            # row's first maximum and reaches the threshold
            tfmat = iou >= 0.5
            for j in range(len(det)):
                largest = np.argmax(iou[:, j]) if len(gts) else -1
                for i in range(len(gts)):
                    if i != largest:
                        tfmat[i, j] = False
            for i in range(len(gts)):
                largest = np.argmax(iou[i, :]) if len(det) else -1
                for j in range(len(det)):
                    if j != largest:
                        tfmat[i, j] = False
            tp = tfmat.any(axis=0) if len(gts) else np.zeros(len(det), bool)
            y_true += tp.tolist()
            y_score += det[:, 4].tolist()
        rec = sum(y_true) / n_gt
        ap = average_precision_score(y_true, y_score) * rec if sum(y_true) else 0.0
        got = ev.eval_detection(FakeDataset("PRW", annos), d, labeled_only=labeled_only)
        assert got[0] == pytest.approx(rec) and got[1] == pytest.approx(ap)


# ----------------------------------------------------------------------------------------------
# search: hand-computed cases

BOX = [0, 0, 100, 200]


def _hand_world():
    annos = [
        anno("im0", [BOX, [300, 0, 400, 200]], [1, 5555]),
        anno("im1", [BOX], [2]),
        anno("im2", [BOX], [1]),
        anno("im3", [BOX], [3]),
    ]
    gdets = [
        dets([0, 0, 100, 200, 0.9], [300, 0, 400, 200, 0.9]),
        dets([0, 0, 100, 200, 0.9]),
        dets(),  # holds person 1 but has no detection
        dets([0, 0, 100, 200, 0.3]),  # below the threshold: no candidate
    ]
    gfeats = [feats([0.9, 0.1], [0.3, 1.0]), feats([0.5, 0.5]), feats(), feats([1.0, 0.0])]
    qbox = [feats([1.0, 0.0]), feats([0.0, 1.0]), feats([1.0, 0.0]), feats([1.0, 0.0])]
    prot = protocol(
        3,
        [[2, 0, 1], [0, 1, 2], [2, 3, 1], [3, 1, 0]],
        [(0, 0, BOX), (0, 2, BOX), (1, 1, BOX), (2, 2, BOX)],
    )
    gallery = FakeDataset("CUHK-SYSU", annos, {3: prot})
    query = FakeDataset("CUHK-SYSU", [anno(f"q{k}", [BOX], [k + 1]) for k in range(4)])
    return gallery, query, gdets, gfeats, qbox


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_search_hand_cases(monkeypatch, mode):
    monkeypatch.setattr(ev, "_SPARSE_MAX_FRACTION", 1.0 if mode == "sparse" else 0.0)
    gallery, query, gdets, gfeats, qbox = _hand_world()
    res = ev.eval_search_cuhk(gallery, query, gdets, gfeats, qbox, None, None, gallery_size=3)
    # q0: candidates 0.9 (hit in im0), 0.5, 0.3; person also in im2 (no detection) -> 1 * 1/2
    # q1: 1.0 (not the person), 0.5 (hit in im1), 0.1 -> 1/2, top-1 miss
    # q2: its positive image has no detection -> 0, no crash
    # q3: no image holds the person -> 0
    np.testing.assert_allclose(res["aps"], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(res["topk"], [[1, 1, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(res["count_gt"], [2, 1, 1, 0])
    np.testing.assert_array_equal(res["count_tp"], [1, 1, 0, 0])
    assert res["mAP"] == pytest.approx(0.25)
    np.testing.assert_allclose(res["accs"], [0.25, 0.5, 0.5])


def test_search_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    gallery, query, gdets, gfeats, qbox = _hand_world()
    to_t = lambda xs: [torch.from_numpy(np.asarray(x)) for x in xs]  # noqa: E731
    res = ev.eval_search_cuhk(gallery, query, to_t(gdets), to_t(gfeats), to_t(qbox), None, None, gallery_size=3)
    np.testing.assert_allclose(res["aps"], [0.5, 0.5, 0.0, 0.0])
    res2 = ev.eval_search_cuhk(gallery, query, gdets, gfeats, torch.from_numpy(np.concatenate(qbox)), None, None,
                               gallery_size=3)
    np.testing.assert_allclose(res2["aps"], [0.5, 0.5, 0.0, 0.0])


def _one_query_world(person_box, det_rows, det_feats, other_sim=0.6):
    """Image 0 holds the person (pid 1); image 1 has one distractor of similarity other_sim."""
    annos = [anno("im0", [person_box], [1]), anno("im1", [[500, 0, 600, 200]], [5555])]
    gdets = [dets(*det_rows), dets([500, 0, 600, 200, 0.9])]
    gfeats = [feats(*det_feats), feats([other_sim, 0.0])]
    prot = protocol(2, [[1, 0]], [(0, 0, person_box)])
    gallery = FakeDataset("CUHK-SYSU", annos, {2: prot})
    query = FakeDataset("CUHK-SYSU", [anno("q", [person_box], [1])])
    return ev.eval_search_cuhk(gallery, query, gdets, gfeats, [feats([1.0, 0.0])], None, None, gallery_size=2)


def test_search_best_ranked_qualifying_detection_is_the_hit():
    # A: IoU 0.75, similarity 0.7; B: IoU 1.0, similarity 0.5 -> A is the hit, B a negative
    res = _one_query_world(BOX, [[0, 0, 100, 150, 0.9], [0, 0, 100, 200, 0.9]], [[0.7, 0], [0.5, 0]])
    assert res["aps"][0] == pytest.approx(1.0) and res["topk"][0].tolist() == [1, 1, 1]
    # A below the IoU bar (0.45): B is the hit, ranked third of 0.7, 0.6, 0.5
    res = _one_query_world(BOX, [[0, 0, 100, 90, 0.9], [0, 0, 100, 200, 0.9]], [[0.7, 0], [0.5, 0]])
    assert res["aps"][0] == pytest.approx(1 / 3) and res["topk"][0].tolist() == [0, 1, 1]


def test_search_tiny_person_iou_threshold():
    # 10x10 person, detection 10x30 over it: IoU 1/3, enough for a tiny person (bar 0.25)
    res = _one_query_world([0, 0, 10, 10], [[0, 0, 10, 30, 0.9]], [[0.9, 0]])
    assert res["aps"][0] == pytest.approx(1.0)
    # the same geometry at 10x scale: IoU 1/3 < 0.5, no hit
    res = _one_query_world([0, 0, 100, 100], [[0, 0, 100, 300, 0.9]], [[0.9, 0]])
    assert res["aps"][0] == 0.0 and res["count_gt"][0] == 1 and res["count_tp"][0] == 0


def test_search_ties_use_stable_order():
    # hit and distractor have equal similarity: the distractor's image (index 0) comes first
    annos = [anno("im0", [[500, 0, 600, 200]], [5555]), anno("im1", [BOX], [1])]
    gdets = [dets([500, 0, 600, 200, 0.9]), dets([0, 0, 100, 200, 0.9])]
    gfeats = [feats([0.5, 0.0]), feats([0.5, 0.0])]
    prot = protocol(2, [[1, 0]], [(0, 1, BOX)])
    gallery = FakeDataset("CUHK-SYSU", annos, {2: prot})
    query = FakeDataset("CUHK-SYSU", [anno("q", [BOX], [1])])
    res = ev.eval_search_cuhk(gallery, query, gdets, gfeats, [feats([1.0, 0.0])], None, None, gallery_size=2)
    assert res["topk"][0].tolist() == [0, 1, 1]
    assert res["aps"][0] == pytest.approx(average_precision_score([0, 1], [0.5, 0.5]))  # 0.5


def test_a_gallery_image_listed_twice_counts_twice_in_count_gt():
    """The original counts every protocol entry holding the person (`count_gt += gt.size > 0`
    before it skips an image it has already scored): an image listed twice halves the recall
    of a query whose only hit is there, and its detections are still scored once."""
    annos = [anno("im0", [BOX], [1]), anno("im1", [[500, 0, 600, 200]], [5555])]
    gdets = [dets([0, 0, 100, 200, 0.9]), dets([500, 0, 600, 200, 0.9])]
    gfeats = [feats([0.9, 0.0]), feats([0.5, 0.0])]
    once = protocol(2, [[0, 1]], [(0, 0, BOX)])
    twice = protocol(3, [[0, 1, 0]], [(0, 0, BOX), (0, 0, BOX)])
    gallery = FakeDataset("CUHK-SYSU", annos, {2: once, 3: twice})
    query = FakeDataset("CUHK-SYSU", [anno("q", [BOX], [1])])
    args = (gallery, query, gdets, gfeats, [feats([1.0, 0.0])], None, None)
    assert ev.eval_search_cuhk(*args, gallery_size=2)["aps"][0] == pytest.approx(1.0)
    res = ev.eval_search_cuhk(*args, gallery_size=3)
    assert res["count_gt"][0] == 2 and res["count_tp"][0] == 1
    assert res["aps"][0] == pytest.approx(0.5) and res["topk"][0, 0] == 1


def test_cbgm_hand_case():
    # query image: the query person q=(1,0,0) and a companion o=(0,1,0).
    # gallery image: x0 (the companion, sim 0.6 to q, 0.9 to o) and x1 (the person, 0.5, 0.1).
    # matching: q-x1 + o-x0 = 1.4 beats q-x0 + o-x1 = 0.7 -> x1's similarity becomes the largest
    # matched weight, o-x0 = 0.9 (the original's max_val; the total 1.4 would rank the same here).
    annos = [anno("im0", [[0, 0, 100, 200], [200, 0, 300, 200]], [5555, 1])]
    gdets = [dets([0, 0, 100, 200, 0.9], [200, 0, 300, 200, 0.9])]
    gfeats = [feats([0.6, 0.9, 0], [0.5, 0.1, 0], dim=3)]
    prot = protocol(1, [[0]], [(0, 0, [200, 0, 300, 200])])
    gallery = FakeDataset("CUHK-SYSU", annos, {1: prot})
    query = FakeDataset("CUHK-SYSU", [anno("q", BOX, [1])])
    qbox = [feats([1, 0, 0], dim=3)]
    qimg_feats = [feats([1, 0, 0], [0, 1, 0], dim=3)]
    qimg_dets = [dets([0, 0, 100, 200, 1.0], [200, 0, 300, 200, 0.9])]
    args = (gallery, query, gdets, gfeats, qbox, qimg_dets, qimg_feats)
    plain = ev.eval_search_cuhk(*args, gallery_size=1)
    assert plain["aps"][0] == pytest.approx(0.5) and plain["topk"][0, 0] == 0
    with_cbgm = ev.eval_search_cuhk(*args, gallery_size=1, cbgm=True, k2=2)
    assert with_cbgm["aps"][0] == pytest.approx(1.0) and with_cbgm["topk"][0, 0] == 1
    # k2=1: only the query person is matched, to its best detection x0 -> nothing changes order
    only_q = ev.eval_search_cuhk(*args, gallery_size=1, cbgm=True, k2=1)
    assert only_q["aps"][0] == pytest.approx(0.5)


def _cbgm_world(annos, gdets, gfeats):
    """Two gallery images (the person's box [200, 0, 300, 200] in image 0), query q = (1, 0, 0)
    and one companion o = (0, 1, 0) in the query image: the eval_search_cuhk arguments."""
    prot = protocol(2, [[0, 1]], [(0, 0, [200, 0, 300, 200])])
    gallery = FakeDataset("CUHK-SYSU", annos, {2: prot})
    query = FakeDataset("CUHK-SYSU", [anno("q", BOX, [1])])
    qimg_feats = [feats([1, 0, 0], [0, 1, 0], dim=3)]
    qimg_dets = [dets([0, 0, 100, 200, 1.0], [200, 0, 300, 200, 1.0])]
    return gallery, query, gdets, gfeats, [feats([1, 0, 0], dim=3)], qimg_dets, qimg_feats


def test_cbgm_takes_the_largest_matched_weight_not_the_total():
    # gallery image 0 holds the person (x1) and a companion (x0); image 1 a distractor y (0.7).
    # matching of image 0: q-x1 (0.5) + o-x0 (0.6) = 1.1 beats q-x0 (0.3) + o-x1 (0.0) = 0.3, so
    # x1 becomes max(0.5, 0.6) = 0.6 < 0.7: the distractor stays first. The total (1.1) would
    # put the person first: top-1 tells the two rules apart.
    args = _cbgm_world(
        [anno("im0", [[0, 0, 100, 200], [200, 0, 300, 200]], [5555, 1]), anno("im1", [[0, 0, 100, 200]], [5555])],
        [dets([0, 0, 100, 200, 0.9], [200, 0, 300, 200, 0.9]), dets([0, 0, 100, 200, 0.9])],
        [feats([0.3, 0.6, 0], [0.5, 0.0, 0], dim=3), feats([0.7, 0.0, 0], dim=3)])
    res = ev.eval_search_cuhk(*args, gallery_size=2, cbgm=True, k2=2)
    # ranking 0.7 (y), 0.6 (x1, hit), 0.3 (x0): AP = 1/2, not top-1
    assert res["aps"][0] == pytest.approx(0.5) and res["topk"][0].tolist() == [0, 1, 1]


def test_cbgm_leaves_an_unmatched_query_person_alone():
    # one detection x (the person, 0.5 to q) and two query-image people: the companion o is more
    # similar to x (0.9), so the matching pairs o-x and leaves q unmatched: x keeps 0.5.
    args = _cbgm_world([anno("im0", [[200, 0, 300, 200]], [1]), anno("im1", [[0, 0, 100, 200]], [5555])],
                       [dets([200, 0, 300, 200, 0.9]), dets([0, 0, 100, 200, 0.9])],
                       [feats([0.5, 0.9, 0], dim=3), feats([0.7, 0.0, 0], dim=3)])
    plain = ev.eval_search_cuhk(*args, gallery_size=2)
    res = ev.eval_search_cuhk(*args, gallery_size=2, cbgm=True, k2=2)
    assert res["aps"][0] == pytest.approx(plain["aps"][0]) == pytest.approx(0.5)
    assert res["topk"][0, 0] == 0


def test_prw_cross_camera_hand_case():
    annos = [
        anno("c1s1_000001", [BOX], [7], cam=1),  # the query's own image
        anno("c1s1_000002", [BOX], [7], cam=1),
        anno("c2s1_000001", [BOX], [7], cam=2),
        anno("c2s1_000002", [BOX], [5555], cam=2),
    ]
    gdets = [dets([0, 0, 100, 200, 0.9]) for _ in range(4)]
    gfeats = [feats([1.0, 0]), feats([0.9, 0]), feats([0.4, 0]), feats([0.6, 0])]
    gallery = FakeDataset("PRW", annos)
    query = FakeDataset("PRW", [anno("c1s1_000001", [BOX], [7], cam=1)])
    args = (gallery, query, gdets, gfeats, [feats([1.0, 0])], None, None)
    res = ev.eval_search_prw(*args)  # 0.9 hit, 0.6, 0.4 hit (own image excluded)
    assert res["aps"][0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and res["topk"][0, 0] == 1
    res = ev.eval_search_prw(*args, ignore_cam_id=False)  # 0.6, 0.4 hit
    assert res["aps"][0] == pytest.approx(0.5) and res["topk"][0].tolist() == [0, 1, 1]
    assert res["count_gt"][0] == 1


def test_eval_search_dispatch():
    gallery, query, gdets, gfeats, qbox = _hand_world()
    res = ev.eval_search(gallery, query, gdets, gfeats, qbox, gallery_size=3)
    assert res["mAP"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------
# slow reference implementation, straight from SPEC 7


def _iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_search(gdets, gfeats, qbox, qimg_feats, galleries, positives, k1, k2, det_thresh, cbgm):
    """galleries[q]: gallery image indices; positives[q]: {image: person box} within them."""
    aps, accs = [], []
    for q in range(len(galleries)):
        fq = np.asarray(qbox[q]).ravel()
        imgs = sorted(galleries[q])  # canonical order: gallery index, then detection index
        det, feat, sims = {}, {}, {}
        for g in imgs:
            keep = gdets[g][:, 4] >= det_thresh
            det[g], feat[g] = gdets[g][keep], gfeats[g][keep]
            sims[g] = feat[g] @ fq
        if cbgm:
            cands = [(sims[g][j], g) for g in imgs for j in range(len(sims[g]))]
            order = sorted(range(len(cands)), key=lambda i: -cands[i][0])  # Python sort is stable
            for g in {cands[i][1] for i in order[:k1]}:
                w = np.asarray(qimg_feats[q])[:k2] @ feat[g].T
                rows, cols = linear_sum_assignment(w, maximize=True)
                new = sims[g].copy()
                for r, c in zip(rows, cols):
                    if r == 0:
                        new[c] = w[rows, cols].max()  # the largest matched weight (max_val)
                sims[g] = new
        y_true, y_score, count_gt, count_tp = [], [], 0, 0
        for g in imgs:
            label = np.zeros(len(sims[g]), dtype=int)
            if g in positives[q]:
                count_gt += 1
                box = positives[q][g]
                w, h = box[2] - box[0], box[3] - box[1]
                thr = min(0.5, w * h / ((w + 10) * (h + 10)))
                for j in np.argsort(-sims[g], kind="stable"):
                    if _iou(det[g][j, :4], box) >= thr:
                        label[j] = 1
                        count_tp += 1
                        break
            y_true.extend(label.tolist())
            y_score.extend(sims[g].tolist())
        y_true = np.asarray(y_true)
        y_score = np.asarray(y_score, dtype=np.result_type(*[s.dtype for s in sims.values()], np.float32))
        aps.append(0.0 if count_tp == 0 else average_precision_score(y_true, y_score) * count_tp / count_gt)
        order = np.argsort(-y_score, kind="stable")
        accs.append([int(y_true[order][:k].sum() > 0) for k in (1, 5, 10)])
    return np.asarray(aps), np.asarray(accs)


def ref_cuhk(world, size, **kw):
    prot = world["gallery"].load_protocol(size)
    galleries = [row.tolist() for row in prot.query_gallery]
    positives = [dict() for _ in galleries]
    for q, g, box in zip(prot.gt_query, prot.gt_gallery, prot.gt_boxes):
        if g in galleries[q]:
            positives[q].setdefault(int(g), box.astype(float))
    return ref_search(world["gdets"], world["gfeats"], world["qbox"], world["qimg_feats"], galleries, positives, **kw)


def ref_prw(world, ignore_cam_id, **kw):
    g_annos, q_annos = world["gallery"].annotations, world["query"].annotations
    galleries, positives = [], []
    for qa in q_annos:
        pid = int(qa["pids"][0])
        gal = [i for i, a in enumerate(g_annos)
               if a["img_name"] != qa["img_name"] and (ignore_cam_id or a["cam_id"] != qa["cam_id"])]
        galleries.append(gal)
        positives.append({i: g_annos[i]["boxes"][g_annos[i]["pids"] == pid][0].astype(float)
                          for i in gal if pid in g_annos[i]["pids"]})
    return ref_search(world["gdets"], world["gfeats"], world["qbox"], world["qimg_feats"], galleries, positives, **kw)


def make_world(seed, n_img=26, n_ids=6, n_query=14, dim=6, dyadic=True, sizes=(4, 10, -1)):
    """A small random world in both layouts: people, detections near them plus false positives,
    identity-correlated features, some images without detections, tiny people, repeated ids."""
    rng = np.random.default_rng(seed)
    id_vec = rng.integers(-2, 3, (n_ids + 1, dim)).astype(float)

    def feature(pid):
        base = id_vec[pid] if pid != 5555 else rng.integers(-2, 3, dim).astype(float)
        if dyadic:
            return (base + rng.integers(-1, 2, dim)) / 2  # exact products in float32: many ties
        return base + 0.5 * rng.standard_normal(dim)

    ftype = np.float32 if dyadic else np.float64
    annos, gdets, gfeats = [], [], []
    for i in range(n_img):
        cam = int(rng.integers(1, 4))
        n_p = int(rng.integers(1, 5))
        pids = np.where(rng.random(n_p) < 0.75, rng.integers(1, n_ids + 1, n_p), 5555)
        w = rng.choice([6, 12, 40, 80], n_p)
        h = w * rng.choice([1, 2, 3], n_p)
        xy = rng.integers(0, 200, (n_p, 2))
        boxes = np.concatenate([xy, xy + np.stack([w, h], 1)], 1)
        annos.append(anno(f"c{cam}s1_{i:06d}", boxes, pids, cam=cam))
        rows, frows = [], []
        if rng.random() > 0.15:
            for b, p in zip(boxes, pids):
                for _ in range(int(rng.integers(0, 3))):
                    jit = rng.integers(-1, 2, 4) * np.array([b[2] - b[0], b[3] - b[1]] * 2) // 4
                    rows.append(list(b + jit) + [rng.choice([0.2, 0.4, 0.5, 0.7, 0.9])])
                    frows.append(feature(int(p)))
            for _ in range(int(rng.integers(0, 3))):
                fx = rng.integers(0, 250, 2)
                rows.append([fx[0], fx[1], fx[0] + 30, fx[1] + 60, rng.choice([0.3, 0.6, 0.8])])
                frows.append(feature(5555))
        order = rng.permutation(len(rows))
        gdets.append(np.asarray(rows, dtype=ftype).reshape(-1, 5)[order])
        gfeats.append(np.asarray(frows, dtype=ftype).reshape(-1, dim)[order])

    labeled = [(i, k) for i, a in enumerate(annos) for k in range(len(a["pids"])) if a["pids"][k] != 5555]
    picks = [labeled[j] for j in rng.choice(len(labeled), size=min(n_query, len(labeled)), replace=False)]
    q_annos, qbox, qimg_feats, qimg_dets = [], [], [], []
    for i, k in picks:
        a = annos[i]
        pid = int(a["pids"][k])
        q_annos.append(anno(a["img_name"], a["boxes"][k], [pid], cam=a["cam_id"]))
        fq = feature(pid)
        qbox.append(np.asarray(fq, dtype=ftype).reshape(1, dim))
        extra = gfeats[i][: int(rng.integers(0, 4))]
        qimg_feats.append(np.concatenate([qbox[-1], extra]).astype(ftype))
        qimg_dets.append(np.concatenate([[list(a["boxes"][k]) + [1.0]], gdets[i][: len(extra)]]).astype(ftype))

    protocols = {}
    for size in sizes:
        rows, gt = [], []
        for q, (own, k) in enumerate(picks):
            pid = q_annos[q]["pids"][0]
            others = [g for g in range(n_img) if g != own]
            if size == -1:
                row = others
            else:
                holders = [g for g in others if pid in annos[g]["pids"]]
                rest = [g for g in rng.permutation(others).tolist() if g not in holders]
                row = (holders + rest)[:size]
                row = rng.permutation(row).tolist()
            rows.append(row)
            for g in others:  # includes pairs outside the gallery: they must be ignored
                if pid in annos[g]["pids"]:  # one row per image, as a TestG entry: its first box
                    gt.append((q, g, annos[g]["boxes"][annos[g]["pids"] == pid][0]))
        perm = rng.permutation(len(gt))
        protocols[size] = protocol(size, rows, [gt[j] for j in perm])
    return {
        "gallery": FakeDataset("CUHK-SYSU", annos, protocols),
        "query": FakeDataset("CUHK-SYSU", q_annos),
        "gdets": gdets,
        "gfeats": gfeats,
        "qbox": qbox,
        "qimg_feats": qimg_feats,
        "qimg_dets": qimg_dets,
    }


def _args(world):
    return (world["gallery"], world["query"], world["gdets"], world["gfeats"], world["qbox"],
            world["qimg_dets"], world["qimg_feats"])


def _check(res, ref_aps, ref_accs):
    np.testing.assert_allclose(res["aps"], ref_aps, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(res["topk"], ref_accs)
    assert res["mAP"] == pytest.approx(float(np.mean(ref_aps)), abs=1e-9)
    np.testing.assert_allclose(res["accs"], ref_accs.mean(axis=0), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dyadic", [True, False])
@pytest.mark.parametrize("cbgm", [False, True])
def test_cuhk_matches_reference(monkeypatch, seed, dyadic, cbgm):
    world = make_world(seed, dyadic=dyadic)
    det_thresh = 0.5 if seed != 1 else 0.3
    k1, k2 = (10, 3) if seed != 2 else (4, 2)
    for size in (4, 10, -1):
        ref_aps, ref_accs = ref_cuhk(world, size, k1=k1, k2=k2, det_thresh=det_thresh, cbgm=cbgm)
        for mode, chunk in (("sparse", None), ("dense", None), ("dense", 3)):
            monkeypatch.setattr(ev, "_SPARSE_MAX_FRACTION", 1.0 if mode == "sparse" else 0.0)
            monkeypatch.setattr(ev, "_CHUNK_ROWS", chunk)
            monkeypatch.setattr(ev, "_TOPK_PIECES", 8 if chunk else 256)  # CBGM's top-k1 pre-filter
            monkeypatch.setattr(ev, "_COUNT_BY_COMPARE_MAX", 0 if chunk else 1 << 22)  # AP by sorting
            res = ev.eval_search_cuhk(*_args(world), k1=k1, k2=k2, det_thresh=det_thresh, cbgm=cbgm,
                                      gallery_size=size)
            _check(res, ref_aps, ref_accs)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dyadic", [True, False])
@pytest.mark.parametrize("cbgm", [False, True])
def test_prw_matches_reference(monkeypatch, seed, dyadic, cbgm):
    world = make_world(seed + 10, dyadic=dyadic, sizes=())
    world["gallery"].name = world["query"].name = "PRW"
    det_thresh = 0.5 if seed != 1 else 0.3
    k1, k2 = (30, 4) if seed != 2 else (5, 2)
    for ignore_cam_id in (True, False):
        ref_aps, ref_accs = ref_prw(world, ignore_cam_id, k1=k1, k2=k2, det_thresh=det_thresh, cbgm=cbgm)
        for chunk in (None, 4):
            monkeypatch.setattr(ev, "_CHUNK_ROWS", chunk)
            monkeypatch.setattr(ev, "_TOPK_PIECES", 8 if chunk else 256)
            monkeypatch.setattr(ev, "_COUNT_BY_COMPARE_MAX", 0 if chunk else 1 << 22)
            res = ev.eval_search_prw(*_args(world), k1=k1, k2=k2, det_thresh=det_thresh, cbgm=cbgm,
                                     ignore_cam_id=ignore_cam_id)
            _check(res, ref_aps, ref_accs)


def test_reference_worlds_are_not_trivial():
    """The random worlds exercise hits, misses, top-1 hits and misses, and CBGM changes."""
    aps, accs, changed = [], [], 0
    for seed in (0, 1):
        world = make_world(seed)
        for size in (4, 10):
            a, c = ref_cuhk(world, size, k1=10, k2=3, det_thresh=0.5, cbgm=False)
            a_c, _ = ref_cuhk(world, size, k1=10, k2=3, det_thresh=0.5, cbgm=True)
            aps.append(a)
            accs.append(c)
            changed += int((~np.isclose(a, a_c)).sum())
    aps, accs = np.concatenate(aps), np.concatenate(accs)
    assert (aps > 0).any() and (aps == 0).any() and 0 < accs[:, 0].mean() < 1 and changed > 0
