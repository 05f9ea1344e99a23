"""Wall time of the evaluation protocols (engine.evaluation) at full dataset scale.

Builds, in memory, synthetic annotation sets of the real sizes:
- CUHK-SYSU: 6,978 gallery images, 2,900 queries (query k = pid k + 1, seen in 1-4 other gallery
  images), unlabeled people up to ~5 per image, protocol gallery sizes 100, 4000 and -1;
- PRW: 6,112 test images over 6 cameras, 450 identities seen in ~40 images each, 2,057 queries;
then random detections near the ground-truth boxes (some missed, jittered) plus false positives,
and 256-d L2-normalised features correlated with identity. It times each protocol and prints a
markdown table (seconds; the metrics are those of the synthetic features, only a sanity check:
the other people of a synthetic query image never reappear in the gallery, so CBGM can only add
noise there and its mAP is lower than without, unlike on the real datasets).
Inputs are lists of numpy arrays, as in eval_cache.pth; protocol loading is not timed (what a
whole evaluation costs from the files on disk, parsing included, is tools/bench_eval_e2e.py).

    python tools/bench_eval.py [--repeat N] [--seed S] [--json PATH] [--only cuhk|prw|det]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.evaluators import evaluator_for  # noqa: E402
from engine.raw_outputs import RawOutputs  # noqa: E402

from datasets.cuhk_sysu import CUHKProtocol  # noqa: E402


UNLABELED = 5555
DIM = 256


class SynthDataset:
    def __init__(self, name, annotations, protocol_fn=None):
        self.name = name
        self.annotations = annotations
        self._protocol_fn = protocol_fn
        self._protocols = {}

    def load_protocol(self, size=100):
        if size not in self._protocols:
            self._protocols[size] = self._protocol_fn(size)
        return self._protocols[size]


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_boxes(rng, n):
    w = rng.uniform(20, 150, n)
    h = w * rng.uniform(2.0, 3.0, n)
    x = rng.uniform(0, 800, n)
    y = rng.uniform(0, 400, n)
    return np.stack([x, y, x + w, y + h], 1).astype(np.int32)


def _people(rng, n_img, occ_img, occ_pid, mean_people=5.0):
    """Per-image boxes: the given labeled occurrences plus unlabeled people."""
    n_lab = np.bincount(occ_img, minlength=n_img)
    n_unl = np.maximum(rng.poisson(mean_people, n_img) - n_lab, 0)
    n_unl[(n_lab + n_unl) == 0] = 1
    img = np.concatenate([occ_img, np.repeat(np.arange(n_img), n_unl)])
    pid = np.concatenate([occ_pid, np.full(int(n_unl.sum()), UNLABELED)])
    order = np.argsort(img, kind="stable")
    img, pid = img[order], pid[order]
    boxes = _random_boxes(rng, len(img))
    return img, pid, boxes


def synthetic_detections(rng, n_img, b_img, b_pid, b_box, id_vec, noise, fp_rate=1.5):
    """Detections near the people (10% missed) plus false positives; features per identity."""
    hit = rng.random(len(b_img)) < 0.9
    d_img = b_img[hit]
    wh = np.repeat((b_box[hit, 2:] - b_box[hit, :2]).astype(np.float64), 2, axis=0).reshape(-1, 4)
    d_box = b_box[hit] + rng.normal(0, 0.08, (int(hit.sum()), 4)) * wh
    d_score = rng.uniform(0.4, 1.0, len(d_img))
    base = np.where((b_pid[hit] != UNLABELED)[:, None], id_vec[np.minimum(b_pid[hit], len(id_vec) - 1)],
                    rng.standard_normal((len(d_img), DIM)))
    d_feat = base + noise * rng.standard_normal((len(d_img), DIM))
    n_fp = rng.poisson(fp_rate, n_img)
    f_img = np.repeat(np.arange(n_img), n_fp)
    f_box = _random_boxes(rng, len(f_img)).astype(np.float64)
    f_score = rng.uniform(0.01, 0.8, len(f_img))
    f_feat = rng.standard_normal((len(f_img), DIM))
    img = np.concatenate([d_img, f_img])
    box = np.concatenate([d_box, f_box])
    score = np.concatenate([d_score, f_score])
    feat = _normalise(np.concatenate([d_feat, f_feat]))
    order = np.lexsort((-score, img))  # per image, by score
    img, box, score, feat = img[order], box[order], score[order], feat[order]
    cuts = np.searchsorted(img, np.arange(n_img + 1))
    dets = [np.concatenate([box[a:b], score[a:b, None]], 1).astype(np.float32) for a, b in zip(cuts[:-1], cuts[1:])]
    feats = [feat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    return dets, feats


def _annotations(n_img, names, b_img, b_pid, b_box, cams=None):
    cuts = np.searchsorted(b_img, np.arange(n_img + 1))
    annos = []
    for i in range(n_img):
        a = {"img_name": names[i], "img_path": names[i], "boxes": b_box[cuts[i]:cuts[i + 1]],
             "pids": b_pid[cuts[i]:cuts[i + 1]].astype(np.int32)}
        if cams is not None:
            a["cam_id"] = int(cams[i])
        annos.append(a)
    return annos


def synthetic_query_side(rng, q_img, q_box, q_pid, id_vec, noise, gdets, gfeats):
    qf = _normalise(id_vec[q_pid] + noise * rng.standard_normal((len(q_pid), DIM)))
    query_box_feats = [qf[k : k + 1] for k in range(len(q_pid))]
    query_dets, query_feats = [], []
    for k, i in enumerate(q_img.tolist()):
        # the query image as a gallery: the query box first, then the other people detected there
        d = gdets[i]
        qb = q_box[k].astype(np.float64)
        iw = np.clip(np.minimum(d[:, 2], qb[2]) - np.maximum(d[:, 0], qb[0]), 0, None)
        ih = np.clip(np.minimum(d[:, 3], qb[3]) - np.maximum(d[:, 1], qb[1]), 0, None)
        inter = iw * ih
        union = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]) + (qb[2] - qb[0]) * (qb[3] - qb[1]) - inter
        others = inter / union < 0.5
        query_dets.append(np.concatenate([np.append(qb, 1.0)[None].astype(np.float32), d[others]]))
        query_feats.append(np.concatenate([qf[k : k + 1], gfeats[i][others]]))
    return query_box_feats, query_dets, query_feats


def build_cuhk(seed=0, n_img=6978, n_query=2900, noise=1.6):
    rng = np.random.default_rng(seed)
    id_vec = rng.standard_normal((n_query + 2, DIM))
    # each identity: its query image + 1..4 other images (distinct)
    n_occ = 1 + rng.integers(1, 5, n_query)
    occ_pid = np.repeat(np.arange(1, n_query + 1), n_occ)
    occ_img = np.concatenate([rng.choice(n_img, k, replace=False) for k in n_occ.tolist()])
    b_img, b_pid, b_box = _people(rng, n_img, occ_img, occ_pid)
    names = [f"s{i}.jpg" for i in range(n_img)]
    annos = _annotations(n_img, names, b_img, b_pid, b_box)
    gdets, gfeats = synthetic_detections(rng, n_img, b_img, b_pid, b_box, id_vec, noise)

    first = np.searchsorted(occ_pid, np.arange(1, n_query + 1))  # first occurrence = the query
    q_img = occ_img[first]
    # the query box: the box of pid k+1 in its query image
    lab = np.flatnonzero(b_pid != UNLABELED)
    key = b_pid[lab].astype(np.int64) * n_img + b_img[lab]
    order = np.argsort(key)
    q_key = np.arange(1, n_query + 1, dtype=np.int64) * n_img + q_img
    q_box = b_box[lab[order[np.searchsorted(key[order], q_key)]]]
    q_annos = [{"img_name": names[i], "img_path": names[i], "boxes": q_box[k : k + 1],
                "pids": np.array([k + 1], np.int32)} for k, i in enumerate(q_img.tolist())]

    # (query, image, box) for every other occurrence
    occ_q = occ_pid - 1
    other = occ_img != q_img[occ_q]
    p_q, p_img = occ_q[other], occ_img[other]
    p_key = (p_q + 1).astype(np.int64) * n_img + p_img
    p_box = b_box[lab[order[np.searchsorted(key[order], p_key)]]].astype(np.float32)

    def protocol(size):
        if size == -1:
            base = np.broadcast_to(np.arange(n_img - 1, dtype=np.int64), (n_query, n_img - 1))
            qg = np.ascontiguousarray(base + (base >= q_img[:, None]))
            return CUHKProtocol(size, qg, p_q.astype(np.int64), p_img.astype(np.int64), p_box)
        r = np.random.default_rng(seed + size)
        keys = r.random((n_query, n_img), dtype=np.float32)
        keys[p_q, p_img] = -1.0  # the images holding the person come first (as in TestG)
        keys[np.arange(n_query), q_img] = 2.0  # never the query's own image
        qg = np.argpartition(keys, size - 1, axis=1)[:, :size].astype(np.int64)
        return CUHKProtocol(size, qg, p_q.astype(np.int64), p_img.astype(np.int64), p_box)

    gallery = SynthDataset("CUHK-SYSU", annos, protocol)
    query = SynthDataset("CUHK-SYSU", q_annos)
    qbf, qd, qf = synthetic_query_side(rng, q_img, q_box, np.arange(1, n_query + 1), id_vec, noise, gdets, gfeats)
    return gallery, query, gdets, gfeats, qbf, qd, qf


def build_prw(seed=1, n_img=6112, n_query=2057, n_ids=450, n_cams=6, noise=2.2):
    rng = np.random.default_rng(seed)
    id_vec = rng.standard_normal((n_ids + 2, DIM))
    cams = np.sort(rng.integers(1, n_cams + 1, n_img))  # frames listed camera by camera
    names = [f"c{c}s1_{i:06d}" for i, c in enumerate(cams.tolist())]
    n_occ = rng.integers(20, 60, n_ids)
    occ_pid = np.repeat(np.arange(1, n_ids + 1), n_occ)
    occ_img = np.concatenate([rng.choice(n_img, k, replace=False) for k in n_occ.tolist()])
    b_img, b_pid, b_box = _people(rng, n_img, occ_img, occ_pid)
    annos = _annotations(n_img, names, b_img, b_pid, b_box, cams)
    gdets, gfeats = synthetic_detections(rng, n_img, b_img, b_pid, b_box, id_vec, noise)
    lab = np.flatnonzero(b_pid != UNLABELED)
    pick = rng.choice(lab, n_query, replace=False)
    q_img, q_pid, q_box = b_img[pick], b_pid[pick], b_box[pick]
    q_annos = [{"img_name": names[i], "img_path": names[i], "boxes": q_box[k : k + 1],
                "pids": np.array([q_pid[k]], np.int32), "cam_id": int(cams[i])}
               for k, i in enumerate(q_img.tolist())]
    gallery = SynthDataset("PRW", annos)
    query = SynthDataset("PRW", q_annos)
    qbf, qd, qf = synthetic_query_side(rng, q_img, q_box, q_pid, id_vec, noise, gdets, gfeats)
    return gallery, query, gdets, gfeats, qbf, qd, qf


def best_time(fn, repeat):
    """(the best wall time of ``repeat`` calls of fn, its last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def raw_outputs(built):
    """The RawOutputs of a build_cuhk / build_prw result (gallery, query, then the five lists)."""
    _, _, gallery_dets, gallery_feats, query_box_feats, query_dets, query_feats = built
    return RawOutputs(gallery_dets, gallery_feats, query_dets, query_feats, query_box_feats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="runs per protocol (the best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--only", choices=["cuhk", "prw", "det"], default=None)
    args = parser.parse_args(argv)

    rows = []

    def record(dataset, setting, seconds, res, extra=None):
        row = {"dataset": dataset, "setting": setting, "seconds": round(seconds, 4)}
        if isinstance(res, dict):
            row.update(mAP=float(res["mAP"]), top1=float(res["accs"][0]))
        elif res is not None:
            row.update(recall=float(res[0]), ap=float(res[1]))
        rows.append(row)
        print(f"  {dataset:<10} {setting:<28} {seconds:8.3f} s", flush=True)

    data = {}
    if args.only in (None, "cuhk", "det"):
        t = time.perf_counter()
        data["CUHK-SYSU"] = build_cuhk(args.seed)
        g = data["CUHK-SYSU"]
        n_det = sum(len(d) for d in g[2])
        print(f"CUHK-SYSU synthetic: {len(g[0].annotations)} gallery images, {len(g[1].annotations)} queries, "
              f"{n_det} detections ({sum(int((d[:, 4] >= 0.5).sum()) for d in g[2])} >= 0.5), "
              f"built in {time.perf_counter() - t:.1f} s", flush=True)
    if args.only in (None, "prw", "det"):
        t = time.perf_counter()
        data["PRW"] = build_prw(args.seed + 1)
        g = data["PRW"]
        n_det = sum(len(d) for d in g[2])
        print(f"PRW synthetic: {len(g[0].annotations)} gallery images, {len(g[1].annotations)} queries, "
              f"{n_det} detections ({sum(int((d[:, 4] >= 0.5).sum()) for d in g[2])} >= 0.5), "
              f"built in {time.perf_counter() - t:.1f} s", flush=True)

    if args.only in (None, "det"):
        for name, entry in data.items():
            sec, res = best_time(lambda: evaluator_for(name).detection(entry[0], raw_outputs(entry)), args.repeat)
            record(name, "detection (det_thresh 0.01)", sec, res)
    if args.only in (None, "cuhk") and "CUHK-SYSU" in data:
        gallery, query = data["CUHK-SYSU"][:2]
        raw = raw_outputs(data["CUHK-SYSU"])
        for size in (100, 4000, -1):
            gallery.load_protocol(size)  # reading the protocol is the dataset's job: not timed
            for cbgm in (False, True):
                evaluator = evaluator_for("CUHK-SYSU", gallery_size=size, cbgm=cbgm)
                sec, res = best_time(lambda: evaluator.search(gallery, query, raw), args.repeat)
                record("CUHK-SYSU", f"search, gallery {size}{' + CBGM' if cbgm else ''}", sec, res)
    if args.only in (None, "prw") and "PRW" in data:
        gallery, query = data["PRW"][:2]
        raw = raw_outputs(data["PRW"])
        for cross_camera, cbgm in ((False, False), (True, False), (False, True), (True, True)):
            label = ("cross-camera" if cross_camera else "all cameras") + (" + CBGM" if cbgm else "")
            evaluator = evaluator_for("PRW", cross_camera=cross_camera, cbgm=cbgm)
            sec, res = best_time(lambda: evaluator.search(gallery, query, raw), args.repeat)
            record("PRW", f"search, {label}", sec, res)

    print()
    print("| dataset | protocol | time (s) | result |")
    print("|---|---|---:|---|")
    for r in rows:
        result = (f"mAP {r['mAP']:.3f}, top-1 {r['top1']:.3f}" if "mAP" in r
                  else f"recall {r['recall']:.3f}, AP {r['ap']:.3f}")
        print(f"| {r['dataset']} | {r['setting']} | {r['seconds']:.3f} | {result} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "repeat": args.repeat, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
