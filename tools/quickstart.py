"""The README's main job: the whole story on the bundled synthetic data, on the CPU.

Stages (each prints what it does and writes its results under --out):
1. data: write the synthetic world in both official layouts (tools/make_synthetic.py) and print
   the statistics of every split;
2. protocols: evaluate a training-free baseline (ground-truth boxes + colour-histogram
   embeddings) with the real protocol code, so the data and evaluation path is shown end to end.
Later stages (training, distillation, demo) are added as the project grows.

Usage: python tools/quickstart.py [--data data/synthetic] [--out output/quickstart] [--seed 0]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import build_dataset  # noqa: E402
from datasets.stats import format_statistics_table  # noqa: E402
from engine.evaluation import eval_detection, eval_search_cuhk, eval_search_prw  # noqa: E402
from tools import make_synthetic  # noqa: E402
from tools.histogram_baseline import raw_outputs  # noqa: E402
from utils.misc import atomic_write_json  # noqa: E402


def stage_data(args):
    print("== 1. synthetic data ==")
    start = time.time()
    roots = {
        "CUHK-SYSU": os.path.join(args.data, "CUHK-SYSU"),
        "PRW": os.path.join(args.data, "PRW"),
    }
    if args.regenerate or not all(os.path.isdir(r) for r in roots.values()):
        make_synthetic.generate(args.data, seed=args.seed)
        print(f"wrote {args.data} in {time.time() - start:.1f} s")
    else:
        print(f"using the existing {args.data} (pass --regenerate to write it anew)")
    splits = {}
    for name, root in roots.items():
        for split in ("train", "gallery", "query"):
            splits[(name, split)] = build_dataset(name, root, None, split)
    print(format_statistics_table(list(splits.values())))
    return splits


def stage_protocols(splits, out_dir):
    print("\n== 2. protocols on a training-free baseline (GT boxes + colour histograms) ==")
    rows = []
    for name in ("CUHK-SYSU", "PRW"):
        gallery, query = splits[(name, "gallery")], splits[(name, "query")]
        start = time.time()
        raw = raw_outputs(gallery, query)
        recall, ap = eval_detection(gallery, raw["gallery_dets"], det_thresh=0.01)
        common = dict(
            gallery_dataset=gallery, query_dataset=query, gallery_dets=raw["gallery_dets"],
            gallery_feats=raw["gallery_feats"], query_box_feats=raw["query_box_feats"],
            query_dets=raw["query_dets"], query_feats=raw["query_feats"],
        )
        if name == "CUHK-SYSU":
            settings = [(f"gallery {g}{' +CBGM' if c else ''}", dict(gallery_size=g, cbgm=c))
                        for g in (50, 100) for c in (False, True)]
            fn = eval_search_cuhk
        else:
            settings = [(f"{'cross' if not ic else 'all'}-camera{' +CBGM' if c else ''}",
                         dict(ignore_cam_id=ic, cbgm=c)) for ic in (True, False) for c in (False, True)]
            fn = eval_search_prw
        for label, kwargs in settings:
            res = fn(**common, **kwargs)
            rows.append({"dataset": name, "setting": label, "det_recall": recall, "det_ap": ap,
                         "mAP": float(res["mAP"]), "top1": float(res["accs"][0]),
                         "top5": float(res["accs"][1]), "top10": float(res["accs"][2])})
        print(f"{name}: features and protocols in {time.time() - start:.1f} s")
    header = f"{'dataset':<10} {'setting':<22} {'det rec':>8} {'det AP':>8} {'mAP':>7} {'top-1':>7} {'top-5':>7} {'top-10':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dataset']:<10} {r['setting']:<22} {r['det_recall']:>8.3f} {r['det_ap']:>8.3f} "
              f"{r['mAP']:>7.3f} {r['top1']:>7.3f} {r['top5']:>7.3f} {r['top10']:>7.3f}")
    atomic_write_json(os.path.join(out_dir, "histogram_baseline.json"), rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="where the synthetic datasets go")
    parser.add_argument("--out", default="output/quickstart", help="where results go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regenerate", action="store_true", help="write the synthetic data anew")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    splits = stage_data(args)
    stage_protocols(splits, args.out)
    print(f"\nresults in {args.out}")


if __name__ == "__main__":
    main()
