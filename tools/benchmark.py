"""Model sizes, FLOPs and speed of the DDPS teacher and students ("Scale and speed").

For the teacher (resnet50) and each student (resnet18, resnet18_x05, mobilenet_v2), built from
the real CUHK-SYSU configs (configs/cuhk_sysu/<backbone>/base.yaml for the single models,
.../ddps.yaml for the distillation step) with ImageNet weights off (BACKBONE_PRETRAIN False;
FROZENBN2d as in each config), random weights and synthetic inputs, it measures:

- parameters: total and per part (backbone.body, backbone.fpn, rpn, roi_heads), trainable and
  total, checked against the parameter counts of the original models;
- FLOPs (torch.utils.flop_counter.FlopCounterMode; FLOPs = 2 x multiply-accumulates, counted
  for convolutions and matrix products only: RoIAlign, NMS, element-wise ops and softmax are
  not counted) of one inference forward of one image at the original input size (3 x 900 x
  1500, which the model's transform keeps and pads to 928 x 1504), in eval mode. The whole
  forward depends on the weights (the number of proposals kept and of detections): with random
  weights it is only indicative. Backbone + FPN FLOPs depend on the input size only: they are
  the deterministic figure;
- inference time per image (eval mode, torch.no_grad, warm-up runs then the median of N runs;
  CUDA timings with torch.cuda.synchronize);
- training step time of each model alone (forward + backward + gradient clipping + SGD step on
  a batch of B synthetic images with a few random person boxes, labels within the OIM table);
- the DDPS step of each student with a freshly built resnet50 teacher (the Distiller of the
  ddps.yaml config, no checkpoint), next to the student's own step (the same student module)
  and the teacher's forward alone (no grad, on the student's transformed batch: the outputs the
  DDPS terms declare: FPN maps, logits on the proposals, embeddings and OIM logits on the boxes);
  overhead = DDPS step - (student step + teacher forward), in % of (student step + teacher
  forward). The three are measured in interleaved rounds, so that
  load from other processes hits them alike. A breakdown of the distillation terms (DFD per
  level, LD, CD with the teacher's OIM logits; forward + backward each, on the same batch) is
  always given; a torch.profiler profile of the student step and the DDPS step (labelled regions
  and the top operators) is added when the overhead exceeds 10%, or with --profile;
- the evaluation protocols' wall time (engine.evaluation, on tools/bench_eval.py's full-scale
  synthetic CUHK-SYSU (gallery 100) and PRW sets), or the figures of a bench_eval.py --json file.

Training inputs: the model's transform resizes every image so that its shorter side is
INPUT.MIN_SIZE (900); to train at another size, INPUT.MIN_SIZE / INPUT.MAX_SIZE are set to the
requested size, so the transform keeps the images as they are (the RPN / RoI settings stay those
of the config). The SGD learning rate is the config's first warm-up one (BASE_LR x
WARMUP_FACTOR), which keeps random-weight training finite without changing the cost of a step.

    python tools/benchmark.py [--models resnet50 resnet18 ...] [--device cpu|cuda]
        [--train-size H W] [--infer-size H W] [--batch B] [--repeats N] [--warmup N]
        [--parts params flops inference train ddps eval] [--profile] [--eval-from JSON]
        [--threads N] [--quick] [--out DIR]

writes DIR/benchmark.md (markdown tables with the machine) and DIR/benchmark.json.

On the CPU, glibc returns large freed blocks to the system, and the page faults of the next large
allocations show up as system time; the DDPS step, which holds the student's graph while the
teacher and DFD allocate their maps, pays more of it. Every entry point (this one included) keeps
freed memory in the process instead (utils/runtime_env.py: glibc mallopt, like
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=1073741824;
DDPS_KEEP_FREED_MEMORY=0 measures glibc's defaults). The allocator environment (MALLOC_*,
LD_PRELOAD, OMP_*, what runtime_env applied) is recorded in the report.
Defaults: CPU: train 450 x 750, batch 2, 3 repeats after 1 warm-up; CUDA: train 900 x 1500,
batch 4, 10 repeats after 3 warm-ups. --quick: tiny sizes and settings for tests (sizes and
timings are then meaningless; parameter counts are still those of the real models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.runtime_env as runtime_env  # noqa: E402  (before torch: passive OpenMP waits, freed memory kept)

import torch  # noqa: E402

from configs import load_config  # noqa: E402
from engine.costs import (PARTS, count, flop_report, get_part, inference_report, make_optimizer,  # noqa: E402
                          make_step, norm_kind, synthetic_batch, train_report)
from engine.ddps_costs import component_report, profile_steps, time_ddps_step  # noqa: E402
from models import build_model  # noqa: E402
from tools.benchmark_report import OVERHEAD_TARGET_PCT, format_gflops, format_ms, markdown  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402
from utils.misc import atomic_write_json  # noqa: E402
from utils.timing import machine_info, release  # noqa: E402

TEACHER = "resnet50"
STUDENTS = ("resnet18", "resnet18_x05", "mobilenet_v2")
MODELS = (TEACHER,) + STUDENTS
CONFIG_DIRS = {"resnet50": "resnet50", "resnet18": "resnet18", "resnet18_x05": "resnet18x05",
               "mobilenet_v2": "mobilenetV2"}
ALIASES = {"resnet18x05": "resnet18_x05", "mobilenetv2": "mobilenet_v2", "mobilenetV2": "mobilenet_v2"}
SECTIONS = ("params", "flops", "inference", "train", "ddps", "eval")
# SPEC 4.2: parameter counts of the original definitions (total, body, fpn, rpn, roi_heads)
SPEC_PARAMS = {
    "resnet50": (56_993_651, 23_508_032, 3_344_384, 593_935, 29_547_300),
    "resnet18": (43_915_251, 11_166_912, 2_607_104, 593_935, 29_547_300),
    "resnet18_x05": (35_424_339, 2_798_880, 2_484_224, 593_935, 29_547_300),
    "mobilenet_v2": (34_435_123, 1_811_712, 2_482_176, 593_935, 29_547_300),
}
ORIGINAL_SIZE = (900, 1500)

# --quick: CPU-sized RPN / RoI settings (tests); the real configs' values otherwise
QUICK_OPTS = (
    "MODEL.RPN.PRE_NMS_TOPN_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPN_TRAIN", "100",
    "MODEL.RPN.PRE_NMS_TOPN_TEST", "100", "MODEL.RPN.POST_NMS_TOPN_TEST", "50",
    "MODEL.RPN.BATCH_SIZE_TRAIN", "64", "MODEL.ROI_HEAD.BATCH_SIZE_TRAIN", "32",
    "MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST", "20",
)
QUICK_SIZE = (128, 192)


# ------------------------------------------------------------------------------------ configs


def canonical(name):
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return name


def config_path(name, kind):
    return os.path.join(ROOT, "configs", "cuhk_sysu", CONFIG_DIRS[name], f"{kind}.yaml")


def size_opts(size):
    """INPUT.MIN_SIZE / MAX_SIZE so that the transform keeps an image of `size` (H, W) as is."""
    h, w = size
    return ["INPUT.MIN_SIZE", str(min(h, w)), "INPUT.MAX_SIZE", str(max(h, w))]


def base_cfg(name, size, quick=False):
    """The model's own CUHK-SYSU config (base.yaml), ImageNet weights off, input size `size`."""
    opts = ["BASELINE.BACKBONE_PRETRAIN", "False"] + size_opts(size) + (list(QUICK_OPTS) if quick else [])
    return load_config(config_path(name, "base"), opts)


def ddps_cfg(student, size, quick=False):
    """The student's CUHK-SYSU DDPS config (ddps.yaml), ImageNet weights off for both models."""
    opts = ["DISTILLER.STUDENT.BACKBONE_PRETRAIN", "False", "DISTILLER.TEACHER.BACKBONE_PRETRAIN", "False"]
    opts += size_opts(size) + (list(QUICK_OPTS) if quick else [])
    return load_config(config_path(student, "ddps"), opts)


def build(cfg, role, device, seed):
    torch.manual_seed(seed)
    return build_model(cfg, role).to(device)


def parameter_report(name, model, cfg_file):
    res = count(model)
    res["parts"] = {p: count(get_part(model, p)) for p in PARTS}
    res["config"] = os.path.relpath(cfg_file, ROOT)
    res["norm"] = norm_kind(model.backbone.body)
    spec = SPEC_PARAMS[name]
    res["spec_total"] = spec[0]
    got = (res["total"],) + tuple(res["parts"][p]["total"] for p in PARTS)
    res["matches_spec"] = got == spec
    return res


# ------------------------------------------------------------------------------------ DDPS


def ddps_report(student_name, size, batch, device, warmup, repeats, seed, quick, profile):
    """The DDPS step of the student's ddps.yaml config (a freshly built teacher, no checkpoint)
    against the student's own step and the teacher's forward, its terms one by one, and a
    profile when asked or when the overhead is above the target."""
    from models.distill import Distiller, build_terms, term_names

    cfg = ddps_cfg(student_name, size, quick)
    teacher = build(cfg, "teacher", device, seed)
    student = build(cfg, "student", device, seed + 1)
    terms = build_terms(cfg, term_names(cfg), student.backbone.out_channels, teacher.backbone.out_channels)
    distiller = Distiller(student, teacher, terms).to(device)
    distiller.train()
    images, targets = synthetic_batch(batch, size, int(cfg.MODEL.LOSS.LUT_SIZE), device, seed)
    optimizer = make_optimizer(cfg, distiller)  # student + DFD parts (the teacher is frozen)
    student_step = make_step(student, optimizer, cfg, images, targets)
    ddps_step = make_step(distiller, optimizer, cfg, images, targets)
    with torch.no_grad():
        _, rec = student.forward_train(images, targets)
    res = time_ddps_step(distiller, student_step, ddps_step, rec, device, warmup, repeats)
    res["target_met"] = res["overhead_pct"] <= OVERHEAD_TARGET_PCT
    res.update(config=os.path.relpath(config_path(student_name, "ddps"), ROOT), size=list(size), batch=batch,
               student_norm=norm_kind(student.backbone.body), teacher_norm=norm_kind(teacher.backbone.body),
               proposals=int(sum(len(p) for p in rec.proposals)), reid_boxes=int(sum(len(b) for b in rec.reid_boxes)))
    res["components_s"], res["components_cpu_s"], notes = component_report(distiller, rec, device,
                                                                            max(warmup, 1), max(repeats, 1))
    res.update(notes)
    if profile or not res["target_met"]:
        res["profile"] = profile_steps(distiller, {"student step": student_step, "DDPS step": ddps_step}, device)
    optimizer.zero_grad(set_to_none=True)
    del distiller, student, teacher, optimizer, rec
    release(device)
    return res


# ------------------------------------------------------------------------------------ evaluation


def eval_report(quick, from_json=None):
    if from_json:
        with open(from_json) as f:
            data = json.load(f)
        return {"source": os.path.abspath(from_json), "rows": data["rows"]}
    from engine.evaluators import evaluator_for
    from tools import bench_eval as be

    if quick:
        cuhk = be.build_cuhk(0, n_img=300, n_query=60)
        prw = be.build_prw(1, n_img=300, n_query=60, n_ids=30)
    else:
        cuhk = be.build_cuhk(0)
        prw = be.build_prw(1)
    rows = []

    def record(dataset, setting, fn, kind):
        seconds, res = be.best_time(fn, 1)
        row = {"dataset": dataset, "setting": setting, "seconds": round(seconds, 4)}
        if kind == "search":
            row.update(mAP=float(res["mAP"]), top1=float(res["accs"][0]))
        else:
            row.update(recall=float(res[0]), ap=float(res[1]))
        rows.append(row)

    g, q = cuhk[:2]
    raw = be.raw_outputs(cuhk)
    record("CUHK-SYSU", "detection (det_thresh 0.01)", lambda: evaluator_for("CUHK-SYSU").detection(g, raw), "det")
    g.load_protocol(100)  # reading the protocol is the dataset's job: not timed
    for cbgm in (False, True):
        evaluator = evaluator_for("CUHK-SYSU", gallery_size=100, cbgm=cbgm)
        record("CUHK-SYSU", "search, gallery 100" + (" + CBGM" if cbgm else ""),
               lambda: evaluator.search(g, q, raw), "search")
    sizes = {"CUHK-SYSU": [len(g.annotations), len(q.annotations)]}
    g, q = prw[:2]
    raw = be.raw_outputs(prw)
    record("PRW", "detection (det_thresh 0.01)", lambda: evaluator_for("PRW").detection(g, raw), "det")
    for cross_camera, cbgm in ((False, False), (True, False), (False, True), (True, True)):
        label = ("cross-camera" if cross_camera else "all cameras") + (" + CBGM" if cbgm else "")
        evaluator = evaluator_for("PRW", cross_camera=cross_camera, cbgm=cbgm)
        record("PRW", f"search, {label}", lambda: evaluator.search(g, q, raw), "search")
    sizes["PRW"] = [len(g.annotations), len(q.annotations)]
    return {"source": "tools/bench_eval.py builders" + (" (quick: reduced sizes)" if quick else " (full scale)"),
            "sizes": sizes, "rows": rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"subset of {', '.join(MODELS)} (DDPS rows: the students among them)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--train-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="training image size (default 450 750 on the CPU, 900 1500 on CUDA)")
    parser.add_argument("--infer-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="inference / FLOPs image size (default 900 1500, the original input size)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 2 on the CPU, 4 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 on the CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 1 on the CPU, 3 on CUDA)")
    parser.add_argument("--parts", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--profile", action="store_true",
                        help="add a torch.profiler breakdown of the student step and the DDPS step")
    parser.add_argument("--eval-from", default=None, metavar="JSON",
                        help="take the evaluation figures from a `tools/bench_eval.py --json` file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and settings (tests)")
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "benchmark"), help="output folder")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    cuda = device.type == "cuda"
    names = list(dict.fromkeys(canonical(n) for n in args.models))
    infer_size = tuple(args.infer_size or (QUICK_SIZE if args.quick else ORIGINAL_SIZE))
    train_size = tuple(args.train_size or (QUICK_SIZE if args.quick else ((900, 1500) if cuda else (450, 750))))
    batch = args.batch or (2 if args.quick or not cuda else 4)
    repeats = args.repeats or (1 if args.quick else (10 if cuda else 3))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if cuda else 1))
    if args.quick:
        repeats, warmup = min(repeats, 2), min(warmup, 1)

    command = ["python tools/benchmark.py"] + list(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine_info(device, command, runtime_env.KEPT_FREED_MEMORY),
              "settings": {"models": names, "quick": args.quick, "infer_size": list(infer_size),
                           "train_size": list(train_size), "batch": batch, "repeats": repeats, "warmup": warmup,
                           "parts": args.parts, "seed": args.seed},
              "models": {}, "ddps": {}}
    sections = set(args.parts)

    def log(msg):
        print(msg, flush=True)

    for name in names:
        entry = result["models"][name] = {}
        if sections & {"params", "flops", "inference"}:
            cfg = base_cfg(name, infer_size, args.quick)
            model = build(cfg, "baseline", device, args.seed)
            if "params" in sections:
                entry["params"] = parameter_report(name, model, config_path(name, "base"))
                log(f"{name}: {entry['params']['total']:,} parameters ({entry['params']['trainable']:,} trainable)")
            if "flops" in sections:
                entry["flops"] = flop_report(model, infer_size, device)
                log(f"{name}: {format_gflops(entry['flops']['total'])} GFLOPs per forward, backbone + FPN "
                    f"{format_gflops(entry['flops']['backbone_fpn'])}")
            if "inference" in sections:
                entry["inference"] = inference_report(model, infer_size, device, warmup, repeats)
                log(f"{name}: inference {format_ms(entry['inference']['median_s'])} ms / image")
            del model
            release(device)
        if "train" in sections:
            cfg = base_cfg(name, train_size, args.quick)
            model = build(cfg, "baseline", device, args.seed)
            entry["train"] = train_report(model, cfg, train_size, batch, device, warmup, repeats, args.seed)
            log(f"{name}: training step {format_ms(entry['train']['median_s'])} ms (batch {batch})")
            del model
            release(device)
    if "ddps" in sections:
        for name in names:
            if name == TEACHER:
                continue
            r = result["ddps"][name] = ddps_report(name, train_size, batch, device, warmup, repeats, args.seed,
                                                   args.quick, args.profile)
            log(f"{name}: DDPS step {format_ms(r['ddps_step']['median_s'])} ms = student "
                f"{format_ms(r['student_step']['median_s'])} + teacher {format_ms(r['teacher_forward']['median_s'])} "
                f"+ overhead {r['overhead_pct']:+.1f}%")
    if "eval" in sections:
        result["evaluation"] = eval_report(args.quick, args.eval_from)
        log(f"evaluation: {len(result['evaluation']['rows'])} protocols timed")
    try:
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import resource

        # Linux reports kilobytes
        result["machine"]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    except (ImportError, OSError):
        pass

    atomic_write_bytes(os.path.join(args.out, "benchmark.md"), (markdown(result) + "\n").encode())
    atomic_write_json(os.path.join(args.out, "benchmark.json"), result)
    log(f"wrote {os.path.join(args.out, 'benchmark.md')} and benchmark.json")
    return result


if __name__ == "__main__":
    main()
