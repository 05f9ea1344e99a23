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
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.runtime_env as runtime_env  # noqa: E402  (before torch: passive OpenMP waits, freed memory kept)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from configs import load_config  # noqa: E402
from tools.benchmark_report import OVERHEAD_TARGET_PCT, PARTS, _g, _ms, markdown  # noqa: E402
from engine.schedule import build_optimizer  # noqa: E402
from models import build_model  # noqa: E402

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
UNLABELED_PID = 5555

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


# ------------------------------------------------------------------------------------ machine
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device, argv):
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python tools/benchmark.py"] + list(argv)),
    }
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_")) or k == "LD_PRELOAD"}
    kept = runtime_env.KEPT_FREED_MEMORY
    env["mallopt (utils/runtime_env)"] = ("mmap threshold 32 MiB, trim threshold 2 GiB, top pad 1 GiB" if kept
                                          else "not applied (glibc defaults or the MALLOC_* above)")
    info["environment"] = env
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------ timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(wall seconds, CPU seconds of this process (user + system, all threads), system seconds)
    of one call of fn."""
    sync(device)
    start, before = time.perf_counter(), os.times()
    fn()
    sync(device)
    wall, after = time.perf_counter() - start, os.times()
    system = after.system - before.system
    return wall, after.user - before.user + system, system


def summary(samples):
    """Wall-clock statistics (the figures reported) and the process CPU time: on a CPU shared
    with other jobs the wall time grows with their load while the CPU time mostly does not. The
    system part is mostly page faults of large fresh allocations on the CPU."""
    wall = [w for w, _, _ in samples]
    cpu = [c for _, c, _ in samples]
    system = [x for _, _, x in samples]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
            "samples_s": [round(s, 6) for s in wall], "cpu_median_s": statistics.median(cpu),
            "cpu_samples_s": [round(s, 6) for s in cpu], "system_median_s": statistics.median(system)}


def repeat_timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        timed(fn, device)
    return summary([timed(fn, device) for _ in range(repeats)])


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return None


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ inputs
def synthetic_batch(batch, size, lut_size, device, seed=0, people=4):
    """`batch` random images (3 x H x W in [0, 1]) with `people` person-shaped boxes each; the
    last box of every image is unlabeled (5555), the others carry random ids in 1..lut_size."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        bw = w * (0.06 + 0.12 * torch.rand(people, generator=g))
        bh = torch.minimum(bw * (2.0 + torch.rand(people, generator=g)), torch.tensor(0.9 * h))
        x1 = (w - bw) * torch.rand(people, generator=g)
        y1 = (h - bh) * torch.rand(people, generator=g)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)
        labels = torch.randint(1, lut_size + 1, (people,), generator=g)
        labels[-1] = UNLABELED_PID
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


# ------------------------------------------------------------------------------------ params
def count(module):
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def get_part(model, dotted):
    for attr in dotted.split("."):
        model = getattr(model, attr)
    return model


def norm_kind(body):
    from torchvision.ops import FrozenBatchNorm2d

    kinds = {type(m) for m in body.modules()}
    if FrozenBatchNorm2d in kinds:
        return "FrozenBatchNorm2d"
    if any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds):
        return "BatchNorm2d"
    return "none"


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


# ------------------------------------------------------------------------------------ FLOPs
def part_flops(by_module, prefix):
    """FLOPs counted inside the module `prefix`. FlopCounterMode attributes FLOPs to modules
    through their forward hooks; a module whose methods are called directly (roi_heads:
    forward_inference) has no entry of its own, so the outermost entries below it are summed."""
    if prefix in by_module:
        return int(by_module[prefix])
    below = [k for k in by_module if k.startswith(prefix + ".")]
    outer = [k for k in below if not any(k.startswith(o + ".") for o in below if o != k)]
    return int(sum(by_module[k] for k in outer))


def flop_report(model, size, device):
    """FLOPs of one eval-mode forward of one 3 x H x W image, and of backbone + FPN alone."""
    model.eval()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        counter = FlopCounterMode(display=False, depth=None)
        with counter:
            out = model([image])
        total = counter.get_total_flops()
        by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        root = type(model).__name__
        parts = {p: part_flops(by_module, f"{root}.{p}") for p in PARTS}
        transformed, _ = model.transform([image])
        counter = FlopCounterMode(display=False, depth=None)
        with counter:
            model.backbone(transformed.tensors)
        backbone = counter.get_total_flops()
    return {"input": [3, *size], "padded": list(transformed.tensors.shape[-2:]),
            "total": int(total), "backbone_fpn": int(backbone), "parts": parts,
            "detections": int(len(out[0]["boxes"]))}


# ------------------------------------------------------------------------------------ inference
def inference_report(model, size, device, warmup, repeats):
    model.eval()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(2)).to(device)

    def run():
        with torch.no_grad():
            model([image])

    reset_peak(device)
    res = repeat_timed(run, device, warmup, repeats)
    res["size"] = list(size)
    res["peak_gib"] = peak_gib(device)
    return res


# ------------------------------------------------------------------------------------ training
def make_optimizer(cfg, module):
    opt = build_optimizer(cfg, module.parameters())
    for group in opt.param_groups:
        group["lr"] = cfg.SOLVER.BASE_LR * cfg.SOLVER.WARMUP_FACTOR
    return opt


def make_step(module, optimizer, cfg, images, targets):
    """One training step as engine/trainer.py does it (without AMP): forward, sum, backward,
    gradient clipping, SGD step; the losses are read back (as the trainer logs them)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = float(cfg.SOLVER.CLIP_GRADIENTS)

    def step():
        with torch.autograd.profiler.record_function("step: forward"):
            losses = module(images, targets)
            total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.profiler.record_function("step: backward"):
            total.backward()
        with torch.autograd.profiler.record_function("step: clip + SGD"):
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        value = float(total.detach())
        if value != value:  # NaN: the timings would no longer mean anything
            raise FloatingPointError(f"non-finite training loss {value}")

    return step


def train_report(model, cfg, size, batch, device, warmup, repeats, seed):
    model.train()
    images, targets = synthetic_batch(batch, size, int(cfg.MODEL.LOSS.LUT_SIZE), device, seed)
    optimizer = make_optimizer(cfg, model)
    reset_peak(device)
    res = repeat_timed(make_step(model, optimizer, cfg, images, targets), device, warmup, repeats)
    res.update(size=list(size), batch=batch, peak_gib=peak_gib(device))
    optimizer.zero_grad(set_to_none=True)
    return res


# ------------------------------------------------------------------------------------ DDPS
def teacher_forward_fn(distiller, rec):
    """What the distiller asks of the teacher, without gradients, on the student's batch: the
    outputs its terms declare (for DDPS: FPN maps, proposal logits, box embeddings, OIM logits)."""
    from models.distill import teacher_outputs

    def run():
        teacher_outputs(distiller.teacher, rec, distiller.teacher_needs)

    return run


def _detached_record(rec):
    """The record with the student tensors the terms read detached and requiring grad, so that
    a term's backward runs its own graph only."""
    def leaf(t):
        return t.detach().requires_grad_(True)

    feats = type(rec.features)((k, leaf(v)) for k, v in rec.features.items())
    return dataclasses.replace(rec, features=feats, proposal_logits=leaf(rec.proposal_logits),
                               embeddings=leaf(rec.embeddings))


def component_report(distiller, rec, device, warmup, repeats):
    """Forward + backward of each distillation term alone, on a recorded batch (detached student
    tensors that require grad, so that only the term's own graph is run backwards), and for DFD
    the parts of its first level."""
    from models.distill import FPN_LEVELS, teacher_outputs
    from models.distill.dfd import dfd_attention, dfd_masks

    t_out = teacher_outputs(distiller.teacher, rec, distiller.teacher_needs)
    comps = {}

    def measure(key, fn):
        comps[key] = repeat_timed(fn, device, warmup, repeats)

    gt_boxes = [t["boxes"] for t in rec.targets]
    padded = tuple(rec.images.tensors.shape[-2:])
    for name, term in distiller.terms.items():
        if name == "dfd":  # one entry per FPN level
            for level in FPN_LEVELS:
                module = term.levels[term.loss_name(level)]
                feat_s = rec.features[level].detach().requires_grad_(True)

                def dfd_step(module=module, feat_s=feat_s, level=level):
                    module(feat_s, t_out.features[level], gt_boxes, padded).backward()

                measure(f"DFD level {level} (fwd+bwd)", dfd_step)
            continue

        def step(term=term):
            sum(term(_detached_record(rec), t_out).values()).backward()

        label = {"cd": "CD: selection + loss"}.get(name, name.upper())
        measure(f"{label} (fwd+bwd)", step)
    if "dfd" in distiller.terms:
        term = distiller.terms["dfd"]
        level = "0"
        module = term.levels[term.loss_name(level)]
        feat_t = t_out.features[level]
        grid = tuple(feat_t.shape[-2:])
        measure(f"  DFD level {level}: person/background masks",
                lambda: dfd_masks(gt_boxes, grid, padded, device=feat_t.device, dtype=torch.float32))
        measure(f"  DFD level {level}: attention maps (student + teacher, fwd)",
                lambda: (dfd_attention(rec.features[level].detach(), module.temp),
                         dfd_attention(feat_t, module.temp)))
        feat_s = rec.features[level].detach().requires_grad_(True)

        def context_step():
            out_s = module.global_context(feat_s, module.conv_mask_s, module.channel_add_conv_s)
            out_t = module.global_context(feat_t, module.conv_mask_t, module.channel_add_conv_t)
            (out_s - out_t).pow(2).sum().backward()

        measure(f"  DFD level {level}: context blocks + global term (fwd+bwd)", context_step)
    sizes_note = {}
    if "cd" in distiller.terms:
        fg = torch.nonzero(torch.cat(rec.reid_labels) > 0).squeeze(1)
        oim = distiller.teacher.roi_heads.reid_loss

        def oim_probs():
            with torch.no_grad():
                torch.softmax(oim.logits(t_out.box_embeddings[fg]).float(), dim=1)

        measure("  CD: teacher OIM logits + softmax", oim_probs)
        sizes_note = {"cd_boxes": int(len(fg)), "oim_columns": int(oim.lut.shape[0] + oim.cq.shape[0])}
    for p in distiller.parameters():
        p.grad = None
    return ({k: v["median_s"] for k, v in comps.items()}, {k: v["cpu_median_s"] for k, v in comps.items()},
            sizes_note)


@contextlib.contextmanager
def profiler_labels(distiller):
    """Label the student's parts, the teacher's parts and the distillation terms for torch.profiler
    (forward hooks on the modules, removed afterwards)."""
    from torch.autograd.profiler import record_function

    handles = []

    def hook(module, label):
        stack = []

        def pre(_mod, _args):
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(_mod, _args, _out):
            stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    student, teacher = distiller.student, distiller.teacher
    hook(student.backbone, "student: backbone + FPN")
    hook(student.rpn, "student: RPN")
    hook(student.roi_heads, "student: RoI heads")
    for name, term in distiller.terms.items():  # a term's own teacher calls (CD's OIM logits) land here
        hook(term, f"{name.upper()} term")
    heads = teacher.roi_heads
    for module, label in ((teacher.backbone, "teacher: backbone + FPN"),
                          (heads.box_roi_pool, "teacher: RoIAlign"),
                          (heads.box_head, "teacher: box head (proposal logits)"),
                          (heads.faster_rcnn_predictor, "teacher: box head (proposal logits)"),
                          (heads.reid_head, "teacher: re-id head (box embeddings)"),
                          (heads.embedding_head, "teacher: re-id head (box embeddings)")):
        hook(module, label)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_steps(distiller, steps, device, top=15):
    """torch.profiler of one student step and one DDPS step: time in labelled regions, top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    with profiler_labels(distiller):
        for key, step in steps.items():
            step()  # warm
            with profile(activities=activities) as prof:
                step()
                sync(device)
            events = prof.key_averages()
            use_device = device.type == "cuda"

            def total(e):
                return (getattr(e, "device_time_total", 0) if use_device else e.cpu_time_total) / 1e3

            def self_time(e):
                return (getattr(e, "self_device_time_total", 0) if use_device else e.self_cpu_time_total) / 1e3

            regions = {e.key: {"calls": e.count, "ms": round(total(e), 2)} for e in events
                       if e.key.startswith(("step:", "student:", "teacher:", "DFD ", "LD", "CD "))}
            ops = sorted((e for e in events if not e.key.startswith(("step:", "student:", "teacher:", "DFD ",
                                                                       "LD", "CD ", "ProfilerStep"))),
                         key=self_time, reverse=True)[:top]
            out[key] = {"regions_ms": regions,
                        "top_ops": [{"op": e.key, "calls": e.count, "self_ms": round(self_time(e), 2)} for e in ops],
                        "clock": "device" if use_device else "cpu"}
    return out


def ddps_report(student_name, size, batch, device, warmup, repeats, seed, quick, profile):
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
    teacher_fwd = teacher_forward_fn(distiller, rec)

    fns = {"student_step": student_step, "teacher_forward": teacher_fwd, "ddps_step": ddps_step}
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    samples = {k: [] for k in fns}
    reset_peak(device)
    for _ in range(repeats):  # interleaved rounds: load from other processes hits all three alike
        for key, fn in fns.items():
            samples[key].append(timed(fn, device))
    res = {k: summary(v) for k, v in samples.items()}
    s, t, d = (res[k]["median_s"] for k in ("student_step", "teacher_forward", "ddps_step"))
    res["overhead_s"] = d - (s + t)
    res["overhead_pct"] = 100.0 * (d - (s + t)) / (s + t)
    s, t, d = (res[k]["cpu_median_s"] for k in ("student_step", "teacher_forward", "ddps_step"))
    res["cpu_overhead_pct"] = 100.0 * (d - (s + t)) / (s + t)
    s, t, d = (res[k]["system_median_s"] for k in ("student_step", "teacher_forward", "ddps_step"))
    res["system_overhead_s"] = d - (s + t)
    res["target_met"] = res["overhead_pct"] <= OVERHEAD_TARGET_PCT
    res.update(config=os.path.relpath(config_path(student_name, "ddps"), ROOT), size=list(size), batch=batch,
               peak_gib=peak_gib(device),
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
        seconds, res = be._timed(fn, 1)
        row = {"dataset": dataset, "setting": setting, "seconds": round(seconds, 4)}
        if kind == "search":
            row.update(mAP=float(res["mAP"]), top1=float(res["accs"][0]))
        else:
            row.update(recall=float(res[0]), ap=float(res[1]))
        rows.append(row)

    def raw_of(gd, gf, qbf, qd, qf):
        return {"gallery_dets": gd, "gallery_feats": gf, "query_box_feats": qbf, "query_dets": qd, "query_feats": qf}

    g, q, *outputs = cuhk
    raw = raw_of(*outputs)
    record("CUHK-SYSU", "detection (det_thresh 0.01)", lambda: evaluator_for("CUHK-SYSU").detection(g, raw), "det")
    g.load_protocol(100)  # reading the protocol is the dataset's job: not timed
    for cbgm in (False, True):
        evaluator = evaluator_for("CUHK-SYSU", gallery_size=100, cbgm=cbgm)
        record("CUHK-SYSU", "search, gallery 100" + (" + CBGM" if cbgm else ""),
               lambda: evaluator.search(g, q, raw), "search")
    sizes = {"CUHK-SYSU": [len(g.annotations), len(q.annotations)]}
    g, q, *outputs = prw
    raw = raw_of(*outputs)
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

    result = {"machine": machine_info(device, sys.argv[1:] if argv is None else argv),
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
                log(f"{name}: {_g(entry['flops']['total'])} GFLOPs per forward, backbone + FPN "
                    f"{_g(entry['flops']['backbone_fpn'])}")
            if "inference" in sections:
                entry["inference"] = inference_report(model, infer_size, device, warmup, repeats)
                log(f"{name}: inference {_ms(entry['inference']['median_s'])} ms / image")
            del model
            release(device)
        if "train" in sections:
            cfg = base_cfg(name, train_size, args.quick)
            model = build(cfg, "baseline", device, args.seed)
            entry["train"] = train_report(model, cfg, train_size, batch, device, warmup, repeats, args.seed)
            log(f"{name}: training step {_ms(entry['train']['median_s'])} ms (batch {batch})")
            del model
            release(device)
    if "ddps" in sections:
        for name in names:
            if name == TEACHER:
                continue
            r = result["ddps"][name] = ddps_report(name, train_size, batch, device, warmup, repeats, args.seed,
                                                   args.quick, args.profile)
            log(f"{name}: DDPS step {_ms(r['ddps_step']['median_s'])} ms = student "
                f"{_ms(r['student_step']['median_s'])} + teacher {_ms(r['teacher_forward']['median_s'])} "
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

    os.makedirs(args.out, exist_ok=True)
    md = markdown(result)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {os.path.join(args.out, 'benchmark.md')} and benchmark.json")
    return result


if __name__ == "__main__":
    main()
