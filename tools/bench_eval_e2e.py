"""End-to-end wall time of an evaluation from files on disk: what `--eval` costs besides inference.

A full-size synthetic release is written once into --data (CUHK-SYSU: 18,184 images of which
6,978 form the gallery, 2,900 queries, TestG50/TestG100; PRW: 11,816 frames of which 6,112 are
test frames, 450 test identities with up to 5 queries each (about 2,250, the
release has 2,057); small 160 x 120 images, the readers do not care), with raw outputs in
the eval_cache.pth format next to it: detections near the ground-truth boxes plus false
positives, features correlated with identity (as tools/bench_eval.py). Then, for every setting,
two fresh processes run one after the other with an empty annotation cache at first:

- first run: the annotation files are parsed and the images' headers checked;
- second run: both come from the annotation cache (INPUT.ANNOTATION_CACHE_DIR); run --repeat
  times, the median is reported.

Each process builds the test splits as `--eval` does (datasets.loaders.build_test_loaders),
reads the raw outputs (engine.evaluator.read_cache) and computes every metric
(engine.evaluator.compute_metrics: detection, then search). Reported: the evaluation (from
building the datasets to the metrics) and the whole process (with the interpreter start and
the imports), both in seconds.

    python tools/bench_eval_e2e.py [--data output/bench_eval_data] [--json PATH] [--only cuhk|prw] [--repeat 5]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL_SIZE = {
    "CUHK-SYSU": dict(train_images=11206, test_images=6978, train_ids=5532, test_ids=2900,
                      gallery_sizes=(50, 100)),
    "PRW": dict(train_images=5704, test_images=6112, train_ids=483, test_ids=450, queries_per_id=5,
                test_appearances=(10, 30), max_persons=6),
}
IMAGE_SIZE = dict(image_width=160, image_height=120)
SETTINGS = {
    "CUHK-SYSU": [("gallery 100", ["EVAL_GALLERY_SIZE", "100"]),
                  ("gallery 100 + CBGM", ["EVAL_GALLERY_SIZE", "100", "EVAL_USE_CBGM", "True"])],
    "PRW": [("all cameras", ["EVAL_CROSS_CAMERA", "False"]), ("cross-camera", ["EVAL_CROSS_CAMERA", "True"])],
}
RAW_NAME = "raw_outputs.pth"


def write_world(data_dir, name, seed=0):
    """The full-size release of `name` and its raw outputs, written once (kept for later runs)."""
    import numpy as np

    from datasets import build_dataset
    from engine.evaluator import save_cache
    from tools import bench_eval
    from tools.make_synthetic import generate

    root = os.path.join(data_dir, name)
    raw_path = os.path.join(root, RAW_NAME)
    if os.path.isfile(raw_path + ".npz"):
        return root, raw_path
    written = os.path.join(root, ".release_written")
    if not os.path.isfile(written):
        print(f"writing a full-size synthetic {name} into {root} (once; a minute or two)", flush=True)
        generate(data_dir, seed, datasets=[name], **FULL_SIZE[name], **IMAGE_SIZE)
        open(written, "w").close()
    gallery = build_dataset(name, root, None, "gallery", cache_dir="none", check_images=False)
    query = build_dataset(name, root, None, "query", cache_dir="none", check_images=False)
    annos = gallery.annotations
    rng = np.random.default_rng(seed)
    counts = [len(a["boxes"]) for a in annos]
    b_img = np.repeat(np.arange(len(annos)), counts)
    b_pid = np.concatenate([a["pids"] for a in annos]).astype(np.int64)
    b_box = np.concatenate([a["boxes"] for a in annos]).reshape(-1, 4)
    id_vec = rng.standard_normal((int(b_pid[b_pid != bench_eval.UNLABELED].max(initial=0)) + 2, bench_eval.DIM))
    noise = 1.6 if name == "CUHK-SYSU" else 2.2
    gdets, gfeats = bench_eval.synthetic_detections(rng, len(annos), b_img, b_pid, b_box, id_vec, noise)
    position = {a["img_name"]: i for i, a in enumerate(annos)}
    q_img = np.array([position[a["img_name"]] for a in query.annotations])
    q_box = np.concatenate([a["boxes"] for a in query.annotations]).reshape(-1, 4)
    q_pid = np.concatenate([a["pids"] for a in query.annotations]).astype(np.int64)
    qbf, qd, qf = bench_eval.synthetic_query_side(rng, q_img, q_box, q_pid, id_vec, noise, gdets, gfeats)
    raw = {"gallery_dets": gdets, "gallery_feats": gfeats, "query_dets": qd, "query_feats": qf,
           "query_box_feats": qbf}
    save_cache(raw_path, raw, fingerprint="synthetic", settings={}, checkpoint=None)
    return root, raw_path


def child(args):
    """One evaluation in this (fresh) process; prints its phases as JSON on the last line."""
    start = time.perf_counter()
    from configs import load_config
    from datasets.loaders import build_test_loaders
    from engine.evaluator import compute_metrics, read_cache

    imported = time.perf_counter()
    cfg = load_config(None, ["INPUT.DATASET", args.dataset, "INPUT.DATA_ROOT", args.root,
                             "INPUT.ANNOTATION_CACHE_DIR", args.cache_dir, "INPUT.NUM_WORKERS_TEST", "0",
                             *args.opts])
    gallery_loader, query_loader = build_test_loaders(cfg)
    built = time.perf_counter()
    raw = read_cache(args.raw)
    read = time.perf_counter()
    metrics = compute_metrics(cfg, gallery_loader.dataset, query_loader.dataset, raw)
    done = time.perf_counter()
    print(json.dumps({"imports": imported - start, "datasets": built - imported, "raw_outputs": read - built,
                      "metrics": done - read, "evaluation": done - imported, **metrics}))


def run_child(dataset, root, raw, cache_dir, opts):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dataset", dataset, "--root", root,
           "--raw", raw, "--cache-dir", cache_dir, "--", *opts]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    process = time.perf_counter() - start
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), process=process)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "output", "bench_eval_data"),
                   help="folder of the full-size synthetic releases (written once, then re-used)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--only", choices=["cuhk", "prw"])
    p.add_argument("--repeat", type=int, default=5, help="later runs per setting (their median is reported)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    names = {"cuhk": ["CUHK-SYSU"], "prw": ["PRW"]}.get(args.only, ["CUHK-SYSU", "PRW"])
    rows = []
    for name in names:
        root, raw = write_world(args.data, name)
        for label, opts in SETTINGS[name]:
            cache_dir = tempfile.mkdtemp(prefix="ddps_annotation_cache_")
            try:
                first = run_child(name, root, raw, cache_dir, opts)
                later = sorted((run_child(name, root, raw, cache_dir, opts) for _ in range(args.repeat)),
                               key=lambda r: r["evaluation"])
                for run, r in (("first", first), ("second", later[len(later) // 2])):  # the median
                    rows.append(dict(dataset=name, setting=label, run=run, **r))
                    print(f"  {name:<10} {label:<20} {run:<6} evaluation {r['evaluation']:6.2f} s "
                          f"(datasets {r['datasets']:.2f}, raw outputs {r['raw_outputs']:.2f}, "
                          f"metrics {r['metrics']:.2f}), process {r['process']:6.2f} s", flush=True)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    print()
    print("| dataset | setting | run | evaluation (s) | datasets | raw outputs | metrics | process (s) | mAP |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['setting']} | {r['run']} | {r['evaluation']:.2f} | {r['datasets']:.2f} | "
              f"{r['raw_outputs']:.2f} | {r['metrics']:.2f} | {r['process']:.2f} | {r['mAP']:.3f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
