"""The README's main job: the whole story on the bundled synthetic data, on the CPU.

Stages (each prints what it does and writes its results under --out):
1. data: write the synthetic world in both official layouts (tools/make_synthetic.py) and print
   the statistics of every split;
2. protocols: evaluate a training-free baseline (ground-truth boxes + colour-histogram
   embeddings) with the real protocol code, so the data and evaluation path is shown end to end.
3. teacher: train a ResNet-18 teacher from random weights (configs/synthetic/quickstart/teacher.yaml);
4. student alone: train a ResNet-18 x0.5 student with the same data, steps and schedule;
5. student + DDPS: distill the same student from the teacher with DFD, LD and CD;
6. table: mAP, top-1, detection recall/AP, parameters and time per image of the three models,
   all evaluated with the real protocol code (CUHK-SYSU layout, gallery 100);
7. demo: run demo.py with the distilled student;
8. search: index the gallery pictures with the distilled student (tools/index_gallery.py) and
   search them (tools/search.py) for the query whose identity is in the most gallery pictures;
   the hits of the query's identity are marked from the ground truth.
A finished training run is not redone (pass --retrain to redo it). Everything lands in --out.

The numbers are a deterministic function of the seed, the number of threads (--threads) and the
CPU's kind: run again on the same kind of machine they come out the same, bit for bit. Another
thread count or another CPU (its vector instructions decide the rounding of float sums) gives
other roundings, which training amplifies into different numbers.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)

import numpy as np  # noqa: E402

from datasets import build_dataset  # noqa: E402
from datasets.stats import format_statistics_table  # noqa: E402
from engine.output_dir import earlier_run_files  # noqa: E402
from engine.evaluators import evaluator_for  # noqa: E402
import demo  # noqa: E402
import train_ddps  # noqa: E402
from engine.person_index import ModelMismatchError  # noqa: E402
from tools import index_gallery, make_synthetic  # noqa: E402
from tools import search as search_tool  # noqa: E402
from tools.histogram_baseline import raw_outputs  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402
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
        cbgm = lambda c: " +CBGM" if c else ""  # noqa: E731
        if name == "CUHK-SYSU":
            evaluators = [(f"gallery {g}{cbgm(c)}", evaluator_for(name, gallery_size=g, cbgm=c))
                          for g in (50, 100) for c in (False, True)]
        else:
            evaluators = [(f"{'cross' if x else 'all'}-camera{cbgm(c)}", evaluator_for(name, cross_camera=x, cbgm=c))
                          for x in (False, True) for c in (False, True)]
        for label, evaluator in evaluators:
            rows.append({"dataset": name, "setting": label, **evaluator.evaluate(gallery, query, raw)})
        print(f"{name}: features and protocols in {time.time() - start:.1f} s")
    header = f"{'dataset':<10} {'setting':<22} {'det rec':>8} {'det AP':>8} {'mAP':>7} {'top-1':>7} {'top-5':>7} {'top-10':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dataset']:<10} {r['setting']:<22} {r['det_recall']:>8.3f} {r['det_ap']:>8.3f} "
              f"{r['mAP']:>7.3f} {r['top1']:>7.3f} {r['top5']:>7.3f} {r['top10']:>7.3f}")
    atomic_write_json(os.path.join(out_dir, "histogram_baseline.json"), rows)
    return rows


QUICKSTART_CONFIGS = os.path.join("configs", "synthetic", "quickstart")
RUNS = (
    ("teacher ResNet-18", "teacher.yaml", "teacher"),
    ("student ResNet-18 x0.5", "student.yaml", "student"),
    ("student ResNet-18 x0.5 + DDPS", "ddps.yaml", "ddps"),
)


# --quick: the same stages with two iterations per model, to check the pipeline in seconds
QUICK_OPTS = ["SOLVER.MAX_EPOCHS", "1", "SOLVER.MAX_ITERS_PER_EPOCH", "2", "SOLVER.LR_DECAY_MILESTONES", "[5]"]


def _run_args(args, cfg_name, run_dir, teacher_ckpt=None):
    opts = ["INPUT.DATA_ROOT", os.path.join(args.data, "CUHK-SYSU"), "OUTPUT_DIR", run_dir, "SEED", str(args.seed)]
    if teacher_ckpt:
        opts += ["DISTILLER.TEACHER.CKPT", teacher_ckpt]
    if args.quick:
        opts += QUICK_OPTS
    return ["--cfg", os.path.join(QUICKSTART_CONFIGS, cfg_name)] + opts


def _last_checkpoint(cfg):
    return os.path.join(cfg.OUTPUT_DIR, f"epoch_{cfg.SOLVER.MAX_EPOCHS - 1}.pth")


def stage_training(args):
    """Train (or reuse) the three models; return {key: (label, config, train seconds)}."""
    from configs import load_config

    results = {}
    teacher_ckpt = None
    for step, (label, cfg_name, key) in enumerate(RUNS, start=3):
        run_dir = os.path.join(args.out, key)
        argv = _run_args(args, cfg_name, run_dir, teacher_ckpt if key == "ddps" else None)
        cfg = load_config(argv[1], argv[2:])
        ckpt = _last_checkpoint(cfg)
        timing_file = os.path.join(run_dir, "train_seconds.json")
        print(f"\n== {step}. {label} ==")
        if os.path.isfile(ckpt) and os.path.isfile(os.path.join(run_dir, "metrics.json")) and not args.retrain:
            print(f"already trained: {ckpt} (pass --retrain to redo it)")
        else:
            if earlier_run_files(run_dir):  # the quickstart's own, unfinished or to be redone
                argv = argv + ["--overwrite"]
            print("python train_ddps.py " + " ".join(argv))
            start = time.time()
            train_ddps.main(argv)
            atomic_write_json(timing_file, {"train_seconds": time.time() - start})
        seconds = float("nan")  # unknown when the run was trained outside the quickstart
        if os.path.isfile(timing_file):
            with open(timing_file) as f:
                seconds = json.load(f)["train_seconds"]
        results[key] = (label, cfg, seconds)
        if key == "teacher":
            teacher_ckpt = ckpt
    return results


def _count_parameters(cfg):
    import torch

    from engine.build import build_eval_model

    model, _ = build_eval_model(cfg, _last_checkpoint(cfg), torch.device("cpu"), log=lambda *a: None)
    return sum(p.numel() for p in model.parameters())


# what the table shows: the metrics.json of an evaluation of the run's last checkpoint under these
TABLE_SETTINGS = {"dataset": "CUHK-SYSU", "gallery_size": 100, "cbgm": False, "use_gt": False}
TABLE_EVAL_OPTS = ["EVAL_GALLERY_SIZE", "100", "EVAL_USE_CBGM", "False", "EVAL_USE_GT", "False"]


def table_metrics(key, cfg, out_dir):
    """The run's metrics under TABLE_SETTINGS: its own metrics.json when that is an evaluation of
    its last checkpoint with exactly these settings (a later --eval with other settings, e.g.
    CBGM, replaces that file), else a new evaluation into out_dir/table_eval/<key>."""
    ckpt = os.path.abspath(_last_checkpoint(cfg))
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    eval_dir = os.path.join(out_dir, "table_eval", key)
    for candidate in (path, os.path.join(eval_dir, "metrics.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                metrics = json.load(f)
            if metrics.get("checkpoint") == ckpt and all(metrics.get(k) == v for k, v in TABLE_SETTINGS.items()):
                return metrics
    print(f"{path} is not an evaluation of {ckpt} with the table's settings: evaluating it into {eval_dir}")
    return train_ddps.main(["--cfg", os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "--eval", "--ckpt", ckpt,
                            "OUTPUT_DIR", eval_dir, *TABLE_EVAL_OPTS])


def stage_table(runs, out_dir):
    print("\n== 6. the three models, evaluated with the real protocols (CUHK-SYSU layout, gallery 100, no CBGM, "
          "detected boxes) ==")
    rows = []
    for key, (label, cfg, seconds) in runs.items():
        m = table_metrics(key, cfg, out_dir)
        images = m["num_gallery_images"] + m["num_queries"]
        rows.append({
            "model": label, "mAP": m["mAP"], "top1": m["top1"], "det_recall": m["det_recall"],
            "det_ap": m["det_ap"], "parameters": _count_parameters(cfg),
            "ms_per_image": 1000.0 * m["inference_seconds"] / max(images, 1),
            "train_minutes": seconds / 60.0, "checkpoint": _last_checkpoint(cfg),
        })
    header = (f"{'model':<30} {'mAP':>6} {'top-1':>6} {'det rec':>8} {'det AP':>7} "
              f"{'params (M)':>10} {'ms/image':>9} {'train min':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<30} {r['mAP']:>6.3f} {r['top1']:>6.3f} {r['det_recall']:>8.3f} "
                     f"{r['det_ap']:>7.3f} {r['parameters'] / 1e6:>10.2f} {r['ms_per_image']:>9.1f} "
                     f"{r['train_minutes']:>9.1f}")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(os.path.join(out_dir, "table.json"), rows)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    return rows


def stage_demo(runs, out_dir):
    print("\n== 7. demo with the distilled student ==")
    _, cfg, _ = runs["ddps"]
    return demo.main(["--cfg", os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "--ckpt", _last_checkpoint(cfg),
                      "--out", os.path.join(out_dir, "demo")])


SEARCH_TOPK = 10
QUICK_INDEX_PICTURES = 20  # --quick indexes these first gallery pictures and the query identity's


def _same_identity(hits, gallery, pid):
    """Per hit: does its box overlap a box of identity ``pid`` in its picture by IoU >= 0.5?"""
    import torch
    from torchvision.ops import box_iou

    truth = {os.path.abspath(a["img_path"]): np.asarray(a["boxes"], np.float32)[np.asarray(a["pids"]) == pid]
             for a in gallery.annotations}
    marks = []
    for hit in hits:
        boxes = truth.get(hit.source, np.zeros((0, 4), np.float32))
        marks.append(bool(len(boxes)) and float(box_iou(torch.tensor([hit.box]), torch.from_numpy(boxes)).max()) >= 0.5)
    return marks


def search_query(gallery, query):
    """The query whose identity appears in the most other gallery pictures (the first of them in
    dataset order): the person a search has the most chances to find, chosen from the ground
    truth alone, before any search."""
    def pictures_of(q):
        pid = q["pids"][0]
        return sum(pid in a["pids"] for a in gallery.annotations if a["img_name"] != q["img_name"])

    return max(query.annotations, key=pictures_of)  # max keeps the first of equal ones


def stage_search(runs, splits, out_dir, quick=False):
    print("\n== 8. index the gallery with the distilled student, then search it for a person ==")
    from engine.hit_sheet import draw_hit_sheet
    from engine.index_search import Hit
    from engine.indexing import read_picture

    _, cfg, _ = runs["ddps"]
    gallery, query = splits[("CUHK-SYSU", "gallery")], splits[("CUHK-SYSU", "query")]
    chosen = search_query(gallery, query)
    pid = int(chosen["pids"][0])
    # as the protocol, the query's own picture is not among those searched
    others = [a for a in gallery.annotations if a["img_name"] != chosen["img_name"]]
    if quick:  # checking the pipeline only: the identity's pictures and a few more
        others = [a for i, a in enumerate(others) if i < QUICK_INDEX_PICTURES or pid in a["pids"]]
    files = [os.path.abspath(a["img_path"]) for a in others]
    folder = os.path.join(out_dir, "search")
    list_file = os.path.join(folder, "gallery_files.txt")
    atomic_write_bytes(list_file, "".join(f + "\n" for f in files).encode())
    index_dir = os.path.join(folder, "index")
    argv = ["--cfg", os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "--ckpt", _last_checkpoint(cfg), "--index", index_dir,
            "--list", list_file]
    print("python tools/index_gallery.py " + " ".join(argv))
    try:
        index_gallery.main(argv)
    except ModelMismatchError:  # the student was trained again: its old index is the quickstart's own
        print(f"{index_dir} was made by an earlier student: indexing anew")
        shutil.rmtree(index_dir)
        index_gallery.main(argv)
    box = [f"{float(v):g}" for v in chosen["boxes"][0]]
    argv = ["--index", index_dir, "--query", chosen["img_path"], "--box", *box, "--topk", str(SEARCH_TOPK),
            "--out", folder, "--name", "query", "--force"]
    print("python tools/search.py " + " ".join(argv))
    result = search_tool.main(argv)
    hits = [Hit(**h) for h in result["hits"]]
    marks = _same_identity(hits, gallery, pid)
    holding = sum(pid in a["pids"] for a in others)
    found = [h.rank for h, m in zip(hits, marks) if m]
    verdict = (f"the query's identity (pid {pid}, in {holding} of the {len(files)} indexed pictures) is found at "
               f"rank{'s' if len(found) > 1 else ''} {', '.join(map(str, found))} of the top {len(hits)}"
               if found else f"the query's identity (pid {pid}, in {holding} of the {len(files)} indexed pictures) "
               f"is not among the top {len(hits)}")
    print(verdict)
    sheet = draw_hit_sheet(read_picture(chosen["img_path"]), chosen["boxes"][0], hits,
                           os.path.join(folder, "query_ground_truth.jpg"), marks, notes=[verdict])
    atomic_write_json(os.path.join(folder, "query_ground_truth.json"),
                      {"pid": pid, "pictures_holding_it": holding, "indexed_pictures": len(files),
                       "ranks_of_the_identity": found, "same_identity": marks, "sheet": sheet})
    print(f"wrote {sheet} (hits of the query's identity in green)")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="where the synthetic datasets go (%(default)s)")
    parser.add_argument("--out", default="output/quickstart", help="where results go (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every run (%(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; the numbers depend on it (%(default)s, as in the README)")
    parser.add_argument("--regenerate", action="store_true", help="write the synthetic data anew")
    parser.add_argument("--retrain", action="store_true", help="train again even if a run finished")
    parser.add_argument("--skip-training", action="store_true", help="stop after the protocol stage")
    parser.add_argument("--quick", action="store_true",
                        help="two iterations per model and a 20-picture index: checks the pipeline only")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    splits = stage_data(args)
    stage_protocols(splits, args.out)
    if not args.skip_training:
        runs = stage_training(args)
        stage_table(runs, args.out)
        stage_demo(runs, args.out)
        stage_search(runs, splits, args.out, args.quick)
    print(f"\nquickstart finished in {(time.time() - start) / 60:.1f} min; results in {args.out}")


if __name__ == "__main__":
    run_main(main)
