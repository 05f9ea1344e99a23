#!/usr/bin/env python
"""The paper's table in miniature, on the synthetic "hard" world, on the CPU.

For every seed:
1. write the hard synthetic world in the CUHK-SYSU layout (tools/make_synthetic.py --preset hard:
   60 training identities that differ only by combinations of a few clothing colours and
   patterns, clutter in the same colours, scale changes, occlusion; a held-out gallery pool and
   60 queries of 60 other identities);
2. train the teacher, a ResNet-18 from random weights (configs/synthetic/table/teacher.yaml);
3. train every student (--students) alone and distilled with DDPS (DFD + LD + CD) from that
   teacher;
4. train the ResNet-18 x0.5 student with each DDPS term alone and with each pair (--ablations);
5. with --comparison, train the same student with the methods DDPS is compared with (PKD,
   ReviewKD, each alone and + LD + CD, as in the paper's table) and two detection-KD methods of
   the literature (CWD, MGD), from the same teacher;
every run with the same data, input size, steps and schedule (the files of
configs/synthetic/table/, plus command-line overrides for the seed, the output folder, the data,
the teacher checkpoint and the steps). train_ddps evaluates each model after its last epoch with
the real protocols (detection recall and AP; CUHK-SYSU search, gallery 100: mAP, top-1) and writes
metrics.json. Then:
- ``<out>/table.md``: mean ± std over the seeds of every model's mAP, top-1, detection recall and
  AP, the paired mAP gain over the same student alone, training minutes; per-seed mAP;
- ``<out>/table.json``: the settings and every run's metrics;
- ``<out>/map.png``: mAP per model (mean, std error bars, one dot per seed).

Resumable: a run whose last checkpoint and metrics.json exist is not redone (a run whose last
checkpoint exists but whose evaluation was cut short is only evaluated). A run interrupted during
training restarts from scratch, or continues from its latest epoch checkpoint with --resume.
A run folder written with other settings stops the command (use another --out, or --redo).

    python tools/reproduce_table.py                        # 3 seeds, the whole table
    python tools/reproduce_table.py --dry-run              # the plan and the estimated time
    python tools/reproduce_table.py --seeds 0 --students resnet18_x05 --no-ablations
    python tools/reproduce_table.py --comparison --no-ablations   # DDPS against the other methods
    python tools/reproduce_table.py --quick --seeds 0      # 2 steps per run on a tiny world
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)
import train_ddps  # noqa: E402
from tools import make_synthetic  # noqa: E402
from utils.misc import atomic_write_json  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs", "synthetic", "table")
WORLD_PRESET = "hard"

STUDENTS = {"resnet18_x05": "ResNet-18 x0.5", "mobilenet_v2": "MobileNetV2"}
ABLATION_STUDENT = "resnet18_x05"
TERMS = {"dfd": "DFD", "ld": "LD", "cd": "CD"}
ABLATIONS = ("dfd", "ld", "cd", "dfd_ld", "dfd_cd", "ld_cd")
# the comparison rows (run name suffix -> label): the paper's comparison methods, then two
# detection-KD methods of the literature; each config names its terms (configs/synthetic/table/)
COMPARISONS = {"pkd": "PKD", "pkd_ld_cd": "PKD + LD + CD", "reviewkd": "ReviewKD",
               "reviewkd_ld_cd": "ReviewKD + LD + CD", "cwd": "CWD", "mgd": "MGD"}

# Defaults that fit in about 2.5 hours of a quiet 2-core CPU (see estimate_seconds).
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STUDENTS = ("resnet18_x05",)

# The schedule of the config files (checked against them at start-up): MAX_EPOCHS short epochs of
# MAX_ITERS_PER_EPOCH steps, LR x GAMMA from epoch round(5/6 of the epochs) on.
BASE_EPOCHS = 6
BASE_ITERS = 40
# The teacher trains TEACHER_EPOCH_FACTOR times the students' epochs (same epoch length, its LR
# decay for its own last sixth). Trained once per seed, it is the fixed reference the students
# are measured against, as the paper's fully trained ResNet-50 is. Measured on this world with one
# seed: at equal steps a ResNet-18 from random weights is no better than the x0.5 student (600
# steps each: mAP 0.18 vs 0.23), so an equal-step teacher would leave nothing to distil; with
# twice the steps it leads (mAP 0.22 after 600 steps vs the student's 0.13 after 300).
TEACHER_EPOCH_FACTOR = 2

# --quick: a world small enough for a test, two steps per run, fewer proposals; a smoke test of
# the whole path (data, training, distillation, evaluation, table), not an experiment
QUICK_WORLD = dict(train_ids=3, test_ids=3, train_images=8, test_images=10, image_width=128, image_height=96,
                   max_persons=4, unlabeled=(0, 2))
QUICK_OPTS = ["TF_BOARD", "False", "INPUT.MIN_SIZE", "72", "INPUT.MAX_SIZE", "96",
              "MODEL.ROI_HEAD.BATCH_SIZE_TRAIN", "16", "MODEL.RPN.PRE_NMS_TOPN_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPN_TRAIN", "50",
              "MODEL.RPN.PRE_NMS_TOPN_TEST", "50", "MODEL.RPN.POST_NMS_TOPN_TEST", "20",
              "MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST", "20"]

# The time model of the plan, for a quiet 2-core CPU with torch's default two threads (160x120
# input, batch 4): seconds per training step, per evaluated image (every gallery image and every
# query is a forward pass), per saved checkpoint and per run (building the models, loading the
# data). The teacher's 0.9 s per step was measured on a quiet machine. With one thread, on the
# same machine under load from other processes, the table's configs took 1.39 s per step (teacher),
# 1.19 (ResNet-18 x0.5), 1.27 (MobileNetV2), 1.59 (either student + DDPS) and 0.23 / 0.21 s per
# evaluated image (teacher / student, untrained: ~65 detections per image); two threads on two
# quiet cores take about 0.69x the one-thread time. The FPN, the RPN and the two 12544 x 1024 RoI
# heads, the same in every model, dominate: a half-width student is not much cheaper than the
# teacher, and distillation adds the teacher's forward pass (no gradient) and the DFD/LD/CD terms.
# Finished runs in --out show what they took beside the estimate. The full default table on the
# quiet machine (2026-11-24): 47-48 min per seed against the 54 min estimated (teacher 480 steps
# in 8.0 min, students 240 steps in 3.8-4.6 min, evaluations ~0.6 min each).
SECONDS_PER_STEP = {"resnet18": 0.9, "resnet18_x05": 0.78, "mobilenet_v2": 0.84}
DISTILL_STEP_EXTRA = 0.35
SECONDS_PER_EVAL_IMAGE = {"resnet18": 0.17, "resnet18_x05": 0.15, "mobilenet_v2": 0.15}
SECONDS_PER_CHECKPOINT = 1.5
SECONDS_PER_RUN = 15.0
SECONDS_PER_WORLD = 10.0
# --threads 1 on a quiet machine: one core instead of two
ONE_THREAD_FACTOR = 1.45


@dataclass(frozen=True)
class RunSpec:
    name: str  # run folder and config file name (configs/synthetic/table/<name>.yaml)
    label: str  # row of the table
    kind: str  # "teacher" | "alone" | "ddps" | "ablation" | "comparison"
    backbone: str
    student: Optional[str] = None  # the student a distilled run (or an alone run) belongs to

    @property
    def distilled(self) -> bool:
        return self.kind in ("ddps", "ablation", "comparison")

    @property
    def cfg_file(self) -> str:
        return os.path.join(CONFIG_DIR, self.name + ".yaml")


TEACHER = RunSpec("teacher", "teacher ResNet-18", "teacher", "resnet18")


def ablation_label(key: str) -> str:
    return f"{STUDENTS[ABLATION_STUDENT]} + " + " + ".join(TERMS[t] for t in key.split("_"))


def model_specs(students: Sequence[str], ablations: Sequence[str], comparisons: Sequence[str] = ()) -> List[RunSpec]:
    """The table's rows in order: the teacher; per student alone, + DDPS, then (for the ablation
    student) the ablations and the comparison methods. The runs of a seed go in this order too."""
    specs = [TEACHER]
    for s in students:
        specs.append(RunSpec(s, STUDENTS[s], "alone", s, s))
        specs.append(RunSpec(f"{s}_ddps", f"{STUDENTS[s]} + DDPS", "ddps", s, s))
        if s == ABLATION_STUDENT:
            specs += [RunSpec(f"{s}_{a}", ablation_label(a), "ablation", s, s) for a in ablations]
            specs += [RunSpec(f"{s}_{m}", f"{STUDENTS[s]} + {COMPARISONS[m]}", "comparison", s, s)
                      for m in comparisons]
    return specs


# --------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    seeds: List[int]
    epochs: int
    iters_per_epoch: int
    milestones: List[int]
    world: Dict
    quick: bool
    extra_opts: List[str]
    batch: int = 4
    input_size: str = "160x120"
    gallery_size: int = 100
    threads: Optional[int] = None
    teacher_factor: int = TEACHER_EPOCH_FACTOR

    @property
    def steps(self) -> int:
        """Training steps of every student run."""
        return self.epochs * self.iters_per_epoch

    def run_epochs(self, spec: "RunSpec") -> int:
        return self.epochs * (self.teacher_factor if spec.kind == "teacher" else 1)

    def run_steps(self, spec: "RunSpec") -> int:
        return self.run_epochs(spec) * self.iters_per_epoch

    def run_milestones(self, spec: "RunSpec") -> List[int]:
        return decay_milestones(self.run_epochs(spec))

    def as_dict(self) -> Dict:
        return {
            "seeds": self.seeds, "epochs": self.epochs, "iters_per_epoch": self.iters_per_epoch,
            "steps": self.steps, "lr_decay_milestones": self.milestones, "teacher_epochs": self.run_epochs(TEACHER),
            "teacher_steps": self.run_steps(TEACHER), "teacher_lr_decay_milestones": self.run_milestones(TEACHER),
            "world_preset": WORLD_PRESET,
            "world_overrides": self.world, "quick": self.quick, "extra_opts": self.extra_opts,
            "batch": self.batch, "input_size": self.input_size, "gallery_size": self.gallery_size,
        }


def decay_milestones(epochs: int) -> List[int]:
    """LR x GAMMA for the last sixth of the epochs (6 epochs: from epoch 5), none for 1 epoch."""
    if epochs < 2:
        return []
    return [min(epochs - 1, max(1, int(round(epochs * 5 / 6))))]


def world_options(world: Dict):
    return make_synthetic.make_options(WORLD_PRESET, **world)


def resolve_schedule(steps: Optional[int], epochs: Optional[int], train_images: int, batch: int):
    """(epochs, iterations per epoch) for --steps/--epochs; an epoch never exceeds the data."""
    full = max(1, math.ceil(train_images / batch))
    e = epochs if epochs is not None else BASE_EPOCHS
    if (steps is not None and steps < 1) or e < 1:
        raise SystemExit("--steps and --epochs must be >= 1")
    if steps is None:  # the config's epoch length, or the whole epoch of a smaller world
        return e, min(BASE_ITERS, full)
    if math.ceil(steps / e) > full:
        if epochs is not None:
            raise SystemExit(f"--steps {steps} over --epochs {epochs} needs more than the {full} steps an epoch "
                             f"holds ({train_images} training images, batch {batch}): raise --epochs")
        e = math.ceil(steps / full)
    return e, math.ceil(steps / e)


def make_settings(args) -> Settings:
    from configs import load_config

    cfg = load_config(TEACHER.cfg_file)
    teacher_epochs = BASE_EPOCHS * TEACHER_EPOCH_FACTOR
    if (cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.MAX_ITERS_PER_EPOCH) != (teacher_epochs, BASE_ITERS):
        raise SystemExit(f"{TEACHER.cfg_file}: MAX_EPOCHS/MAX_ITERS_PER_EPOCH are not {teacher_epochs}/{BASE_ITERS}: "
                         "update BASE_EPOCHS/BASE_ITERS/TEACHER_EPOCH_FACTOR in tools/reproduce_table.py")
    extra = (QUICK_OPTS if args.quick else []) + list(args.opts or [])
    if len(extra) % 2:
        raise SystemExit("--opts takes KEY VALUE pairs")
    run_cfg = load_config(TEACHER.cfg_file, extra)  # what every run gets (the files agree: tested)
    batch = run_cfg.INPUT.BATCH_SIZE_TRAIN
    world = dict(QUICK_WORLD) if args.quick else {}
    train_images = world_options(world).train_images
    if args.quick and not (args.steps or args.epochs):
        epochs, iters = 1, 2
    else:
        epochs, iters = resolve_schedule(args.steps, args.epochs, train_images, batch)
    return Settings(seeds=list(args.seeds), epochs=epochs, iters_per_epoch=iters, milestones=decay_milestones(epochs),
                    world=world, quick=bool(args.quick), extra_opts=extra, batch=batch,
                    input_size=f"{run_cfg.INPUT.MAX_SIZE}x{run_cfg.INPUT.MIN_SIZE}",
                    gallery_size=run_cfg.EVAL_GALLERY_SIZE, threads=args.threads)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Run:
    seed: int
    spec: RunSpec
    out: str

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.spec.name}"

    @property
    def dir(self) -> str:
        return os.path.join(self.out, f"seed{self.seed}", self.spec.name)


def world_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed{seed}", "world")


def last_checkpoint(run: Run, settings: Settings) -> str:
    return os.path.join(run.dir, f"epoch_{settings.run_epochs(run.spec) - 1}.pth")


def teacher_run(run: Run) -> Run:
    return Run(run.seed, TEACHER, run.out)


def train_argv(run: Run, settings: Settings) -> List[str]:
    """train_ddps's command line of a run (the config file + overrides)."""
    opts = [
        "INPUT.DATA_ROOT", os.path.join(world_dir(run.out, run.seed), "CUHK-SYSU"),
        "OUTPUT_DIR", run.dir,
        "SEED", str(run.seed),
        "SOLVER.MAX_EPOCHS", str(settings.run_epochs(run.spec)),
        "SOLVER.MAX_ITERS_PER_EPOCH", str(settings.iters_per_epoch),
        "SOLVER.LR_DECAY_MILESTONES", json.dumps(settings.run_milestones(run.spec)),
    ]
    if run.spec.distilled:
        opts += ["DISTILLER.TEACHER.CKPT", last_checkpoint(teacher_run(run), settings)]
    return ["--cfg", os.path.relpath(run.spec.cfg_file)] + opts + list(settings.extra_opts)


PATH_KEYS = ("INPUT.DATA_ROOT", "OUTPUT_DIR", "DISTILLER.TEACHER.CKPT")


def settings_signature(argv: Sequence[str]) -> List[str]:
    """A run's command line without its paths (they follow from --out and the seed), so that the
    same folder reached through another path (relative, absolute, another working directory) is
    still recognised; the config file by name."""
    sig = ["--cfg", os.path.basename(argv[1])]
    rest = list(argv[2:])
    for k, v in zip(rest[::2], rest[1::2]):
        sig += [k, "<path>" if k in PATH_KEYS else v]
    return sig


def select_specs(args) -> List[RunSpec]:
    students = list(dict.fromkeys(args.students))
    if args.no_ablations:
        ablations: List[str] = []
    elif args.ablations is None:
        ablations = list(ABLATIONS)
    else:
        ablations = list(dict.fromkeys(args.ablations))
    if args.comparison is None:
        comparisons: List[str] = []
    else:
        comparisons = list(dict.fromkeys(args.comparison or COMPARISONS))
    if (ablations or comparisons) and ABLATION_STUDENT not in students:
        print(f"note: the ablations and the comparison methods are of {STUDENTS[ABLATION_STUDENT]} "
              f"({ABLATION_STUDENT}), which --students does not include: its alone and DDPS runs are added so "
              "that they have a reference")
        students.insert(0, ABLATION_STUDENT)
    specs = model_specs(students, ablations, comparisons)
    if args.runs:
        keep = [s for s in specs if any(fnmatch.fnmatch(s.name, pat) for pat in args.runs)]
        if not keep:
            raise SystemExit(f"--runs {' '.join(args.runs)} matches none of {', '.join(s.name for s in specs)}")
        if any(s.distilled for s in keep) and TEACHER not in keep:
            keep.insert(0, TEACHER)  # the distilled runs need it
        specs = [s for s in specs if s in keep]
    return specs


def build_plan(args, settings: Settings) -> List[Run]:
    specs = select_specs(args)
    return [Run(seed, spec, args.out) for seed in settings.seeds for spec in specs]


# --------------------------------------------------------------------------------------------
# time estimate


def step_seconds(spec: RunSpec) -> float:
    s = SECONDS_PER_STEP[spec.backbone]
    return s + DISTILL_STEP_EXTRA if spec.distilled else s


def eval_images(settings: Settings) -> int:
    opts = world_options(settings.world)
    return opts.test_images + opts.test_ids  # gallery pool + one query per test identity


def estimate_run_seconds(spec: RunSpec, settings: Settings) -> float:
    compute = settings.run_steps(spec) * step_seconds(spec) + eval_images(settings) * SECONDS_PER_EVAL_IMAGE[spec.backbone]
    if settings.threads == 1:
        compute *= ONE_THREAD_FACTOR
    return SECONDS_PER_RUN + settings.run_epochs(spec) * SECONDS_PER_CHECKPOINT + compute


def measured_run_seconds(run: "Run") -> Optional[float]:
    """Training + evaluation seconds of a finished run (timing.json), if known."""
    path = os.path.join(run.dir, TIMING_FILE)
    try:
        timing = _read_json(path)
        return float(timing["train_seconds"]) + float(timing.get("eval_seconds") or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_seconds(plan: Sequence[Run], settings: Settings, todo: Optional[Sequence[Run]] = None) -> float:
    runs = plan if todo is None else todo
    seeds = {r.seed for r in runs}
    return len(seeds) * SECONDS_PER_WORLD + sum(estimate_run_seconds(r.spec, settings) for r in runs)


# --------------------------------------------------------------------------------------------
# run state and execution


class SettingsMismatch(RuntimeError):
    pass


RUN_FILE = "run.json"
TIMING_FILE = "timing.json"


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def epoch_checkpoints(run_dir: str) -> Dict[int, str]:
    found = {}
    if os.path.isdir(run_dir):
        for f in os.listdir(run_dir):
            if f.startswith("epoch_") and f.endswith(".pth"):
                try:
                    found[int(f[len("epoch_"):-len(".pth")])] = os.path.join(run_dir, f)
                except ValueError:
                    pass
    return found


def run_state(run: Run, settings: Settings) -> str:
    """"done", "evaluate" (trained, metrics missing), "partial" (an epoch checkpoint), "new"."""
    final = last_checkpoint(run, settings)
    metrics = os.path.join(run.dir, "metrics.json")
    if os.path.isfile(final):
        if os.path.isfile(metrics):
            try:
                if _read_json(metrics).get("epoch") == settings.run_epochs(run.spec) - 1:
                    return "done"
            except (OSError, ValueError):
                pass
        return "evaluate"
    if any(e < settings.run_epochs(run.spec) - 1 for e in epoch_checkpoints(run.dir)):
        return "partial"
    return "new"


def check_settings(run: Run, settings: Settings) -> None:
    """Stop when the run folder holds a run of other settings (it would be silently mixed in)."""
    path = os.path.join(run.dir, RUN_FILE)
    if not os.path.isfile(path):
        return
    recorded = _read_json(path)
    previous = recorded.get("argv")
    if not previous or settings_signature(previous) != settings_signature(train_argv(run, settings)):
        raise SettingsMismatch(
            f"{run.dir} holds a run with other settings:\n  before: {' '.join(previous or [])}\n"
            f"  now:    {' '.join(train_argv(run, settings))}\nuse another --out, or --redo to train it again")
    if run.spec.distilled and recorded.get("teacher_stamp"):
        now = file_stamp(last_checkpoint(teacher_run(run), settings))
        if now is not None and now != recorded["teacher_stamp"]:
            raise SettingsMismatch(f"{run.dir} was distilled from another checkpoint of its teacher (trained again "
                                   "since): --redo it (e.g. --runs '*ddps' '*_dfd*' ... --redo), or use another --out")


def file_stamp(path: str) -> Optional[str]:
    """Size and modification time of a file (None if absent): which teacher a student had."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def ensure_world(out: str, seed: int, settings: Settings) -> str:
    """Write (or reuse) the seed's world; world.json marks a complete one."""
    root = world_dir(out, seed)
    marker = os.path.join(root, "world.json")
    wanted = _jsonable({"seed": seed, "preset": WORLD_PRESET, "overrides": settings.world,
                        "options": world_options(settings.world).__dict__})
    if os.path.isfile(marker):
        if _read_json(marker) == wanted:
            return root
        raise SettingsMismatch(f"{root} holds a world of other settings ({marker}); use another --out")
    if os.path.isdir(root):
        shutil.rmtree(root)  # an interrupted generation
    start = time.time()
    make_synthetic.generate(root, seed=seed, datasets=("CUHK-SYSU",), preset=WORLD_PRESET, **settings.world)
    atomic_write_json(marker, wanted)
    print(f"seed {seed}: wrote the {WORLD_PRESET} world to {root} in {time.time() - start:.1f} s")
    return root


def _jsonable(d):
    """``d`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(d, default=str))


def _wipe(run_dir: str) -> None:
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)


def execute(run: Run, settings: Settings, resume: bool, keep_checkpoints: bool) -> Dict:
    """Bring one run to "done"; returns what happened ({"action", "seconds"})."""
    state = run_state(run, settings)
    argv = train_argv(run, settings)
    final = last_checkpoint(run, settings)
    timing_path = os.path.join(run.dir, TIMING_FILE)
    if state == "done":
        return {"action": "reused", "seconds": 0.0}
    if state == "evaluate":
        print(f"{run.key}: trained, evaluating {final}")
        start = time.time()
        train_ddps.main(["--cfg", os.path.join(run.dir, "config.yaml"), "--eval", "--ckpt", final])
        timing = _read_json(timing_path) if os.path.isfile(timing_path) else {}
        if "train_seconds" not in timing and timing.get("attempt_start"):
            # the attempt that trained it stopped in its evaluation: its training time is known
            trained = os.path.getmtime(final) - timing["attempt_start"] + timing.get("credited_seconds", 0.0)
            atomic_write_json(timing_path, {"train_seconds": max(0.0, trained), "eval_seconds": time.time() - start,
                                            "resumed": False})
        if not keep_checkpoints:
            prune_checkpoints(run, settings)
        return {"action": "evaluated", "seconds": time.time() - start}
    credited = 0.0
    if state == "partial" and resume:
        epoch, ckpt = max(epoch_checkpoints(run.dir).items())
        timing = _read_json(timing_path) if os.path.isfile(timing_path) else {}
        # the interrupted attempt's time up to its last checkpoint still counts
        if timing.get("attempt_start"):
            credited = max(0.0, os.path.getmtime(ckpt) - timing["attempt_start"])
        credited += timing.get("credited_seconds", 0.0)
        full_argv = argv[:2] + ["--resume", "--ckpt", ckpt] + argv[2:]
        print(f"{run.key}: resuming from {ckpt} (epoch {epoch + 1} of {settings.run_epochs(run.spec)})")
        action = "resumed"
    else:
        if state == "partial":
            print(f"{run.key}: an interrupted run: training it again from scratch (--resume continues it instead)")
        _wipe(run.dir)
        full_argv = argv
        action = "trained"
    os.makedirs(run.dir, exist_ok=True)
    record = {"argv": argv, "spec": run.spec.__dict__, "seed": run.seed}
    if run.spec.distilled:
        record["teacher_stamp"] = file_stamp(last_checkpoint(teacher_run(run), settings))
    atomic_write_json(os.path.join(run.dir, RUN_FILE), record)
    start = time.time()
    atomic_write_json(timing_path, {"attempt_start": start, "credited_seconds": credited})
    print("python train_ddps.py " + " ".join(full_argv))
    train_ddps.main(full_argv)
    wall = time.time() - start
    metrics = _read_json(os.path.join(run.dir, "metrics.json"))
    train_seconds = credited + max(0.0, wall - float(metrics.get("inference_seconds", 0.0)))
    atomic_write_json(timing_path, {"train_seconds": train_seconds, "wall_seconds": wall + credited,
                                    "eval_seconds": metrics.get("inference_seconds"), "resumed": action == "resumed"})
    if not keep_checkpoints:
        prune_checkpoints(run, settings)
    return {"action": action, "seconds": wall}


def prune_checkpoints(run: Run, settings: Settings) -> None:
    """A finished run keeps its last checkpoint only (each is ~300 MB: model + SGD momentum)."""
    for e, path in epoch_checkpoints(run.dir).items():
        if e != settings.run_epochs(run.spec) - 1:
            os.remove(path)


# --------------------------------------------------------------------------------------------
# results


METRIC_KEYS = ("mAP", "top1", "top5", "top10", "det_recall", "det_ap")


def collect(plan: Sequence[Run], settings: Settings, failures: Dict[str, str]) -> List[Dict]:
    rows = []
    for run in plan:
        row = {"seed": run.seed, "name": run.spec.name, "label": run.spec.label, "kind": run.spec.kind,
               "backbone": run.spec.backbone, "student": run.spec.student, "run_dir": run.dir,
               "checkpoint": last_checkpoint(run, settings), "status": "missing"}
        if run_state(run, settings) == "done":
            m = _read_json(os.path.join(run.dir, "metrics.json"))
            row.update({k: float(m[k]) for k in METRIC_KEYS})
            row["eval_seconds"] = m.get("inference_seconds")
            timing_path = os.path.join(run.dir, TIMING_FILE)
            timing = _read_json(timing_path) if os.path.isfile(timing_path) else {}
            row["train_seconds"] = timing.get("train_seconds")
            row["status"] = "done"
        elif run.key in failures:
            row["status"] = "failed"
            row["error"] = failures[run.key]
        rows.append(row)
    return rows


def _mean_std(values: List[float]):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(rows: List[Dict], specs: Sequence[RunSpec]) -> List[Dict]:
    """Per model: mean and std (over seeds) of every metric, and the paired gain over alone."""
    done = [r for r in rows if r["status"] == "done"]
    alone = {(r["seed"], r["student"]): r for r in done if r["kind"] == "alone"}
    out = []
    for spec in specs:
        mine = [r for r in done if r["name"] == spec.name]
        entry = {"name": spec.name, "label": spec.label, "kind": spec.kind, "seeds": [r["seed"] for r in mine],
                 "n": len(mine)}
        for k in METRIC_KEYS:
            entry[k] = dict(zip(("mean", "std"), _mean_std([r[k] for r in mine])))
        minutes = [r["train_seconds"] / 60.0 for r in mine if r.get("train_seconds") is not None]
        entry["train_minutes"] = dict(zip(("mean", "std"), _mean_std(minutes)))
        entry["per_seed_mAP"] = {str(r["seed"]): r["mAP"] for r in mine}
        if spec.distilled:
            gains = [r["mAP"] - alone[(r["seed"], spec.student)]["mAP"] for r in mine if (r["seed"], spec.student) in alone]
            entry["mAP_gain_over_alone"] = dict(zip(("mean", "std"), _mean_std(gains)), n=len(gains),
                                                per_seed={str(r["seed"]): r["mAP"] - alone[(r["seed"], spec.student)]["mAP"]
                                                          for r in mine if (r["seed"], spec.student) in alone})
        out.append(entry)
    return out


def _pct(stat, n, digits=1) -> str:
    """mean ± std in %; the mean alone for one seed (no spread to show)."""
    if stat["mean"] is None:
        return "–"
    if n < 2:
        return f"{100 * stat['mean']:.{digits}f}"
    return f"{100 * stat['mean']:.{digits}f} ± {100 * stat['std']:.{digits}f}"


def _signed_pct(stat) -> str:
    if not stat or stat["mean"] is None:
        return ""
    if stat.get("n", 0) < 2:
        return f"{100 * stat['mean']:+.1f}"
    return f"{100 * stat['mean']:+.1f} ± {100 * stat['std']:.1f}"


def _minutes(stat) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.1f}"


def _schedule_text(settings: Settings, spec: Optional[RunSpec]) -> str:
    """'240 steps (6 epoch(s) x 40, LR x0.1 from epoch 5)' for a student (spec None) or the teacher."""
    epochs = settings.epochs if spec is None else settings.run_epochs(spec)
    milestones = decay_milestones(epochs)
    decay = f"LR x0.1 from epoch {milestones[0]}" if milestones else "no LR decay"
    return f"{epochs * settings.iters_per_epoch} steps ({epochs} epoch(s) x {settings.iters_per_epoch}, {decay})"


def format_markdown(summary: List[Dict], rows: List[Dict], settings: Settings, wall_seconds: float) -> str:
    world = world_options(settings.world)
    lines = [
        "# DDPS in miniature: the synthetic hard world (CUHK-SYSU layout)",
        "",
        f"- world: preset `{WORLD_PRESET}`{' (--quick: tiny)' if settings.quick else ''}, "
        f"{world.image_width}x{world.image_height} scenes, {world.train_ids} training identities in "
        f"{world.train_images} images, {world.test_ids} queries over a held-out pool of {world.test_images} images; "
        "one world per seed",
        f"- every student run: {_schedule_text(settings, None)}, batch {settings.batch}, {settings.input_size} input, "
        "from random weights",
        f"- the teacher, a ResNet-18 from random weights trained once per seed with the same data and input: "
        f"{_schedule_text(settings, TEACHER)}",
        f"- seeds: {', '.join(map(str, settings.seeds))}; values: mean ± sample std over the seeds, in %; "
        f"search: CUHK-SYSU protocol, gallery {settings.gallery_size}; detection: recall and AP at IoU 0.5",
        "- gain: the paired mAP difference to the same student trained alone on the same seed (points)",
        "",
        "| model | seeds | mAP | top-1 | mAP gain | det recall | det AP | train min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        n = e["n"]
        lines.append(f"| {e['label']} | {n} | {_pct(e['mAP'], n)} | {_pct(e['top1'], n)} | "
                     f"{_signed_pct(e.get('mAP_gain_over_alone'))} | {_pct(e['det_recall'], n)} | "
                     f"{_pct(e['det_ap'], n)} | {_minutes(e['train_minutes'])} |")
    seeds = settings.seeds
    lines += ["", "Per-seed mAP (%):", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---:|" * len(seeds)]
    for e in summary:
        cells = [f"{100 * e['per_seed_mAP'][str(s)]:.1f}" if str(s) in e["per_seed_mAP"] else "–" for s in seeds]
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    missing = [r for r in rows if r["status"] != "done"]
    if missing:
        lines += ["", "Not in the table (missing or failed): "
                  + ", ".join(f"seed{r['seed']}/{r['name']} ({r['status']})" for r in missing)]
    lines += ["", f"Wall time of this invocation: {wall_seconds / 60:.1f} min (runs reused from earlier "
              "invocations not counted; see train min)."]
    return "\n".join(lines) + "\n"


KIND_COLOURS = {"teacher": "#7f7f7f", "alone": "#1f77b4", "ddps": "#d62728", "ablation": "#ff9896",
                "comparison": "#2ca02c"}
KIND_NAMES = {"teacher": "teacher", "alone": "student alone", "ddps": "student + DDPS",
              "ablation": "student + some DDPS terms", "comparison": "student + another method"}


def plot_map(summary: List[Dict], rows: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary if e["n"] > 0]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(entries) + 2.0), 4.5))
    xs = list(range(len(entries)))
    means = [100 * e["mAP"]["mean"] for e in entries]
    stds = [100 * e["mAP"]["std"] for e in entries]
    ax.bar(xs, means, yerr=stds, capsize=4, color=[KIND_COLOURS[e["kind"]] for e in entries], edgecolor="black",
           linewidth=0.6)
    seed_values = [[100 * v for v in e["per_seed_mAP"].values()] for e in entries]
    # a seed's dot can lie above mean + std: the label goes above both
    heads = [max([m + sd] + vals) for m, sd, vals in zip(means, stds, seed_values)]
    top = max(heads + [1.0])
    for x, m, vals, head in zip(xs, means, seed_values, heads):
        ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.text(x, head + 0.02 * top, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    kinds = [k for k in KIND_COLOURS if any(e["kind"] == k for e in entries)]
    if not entries:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend([Patch(facecolor=KIND_COLOURS[k], edgecolor="black") for k in kinds], [KIND_NAMES[k] for k in kinds],
                  fontsize=7, loc="upper left", ncol=len(kinds), frameon=False)
    teacher = next((e for e in entries if e["kind"] == "teacher"), None)
    if teacher is not None:
        ax.axhline(100 * teacher["mAP"]["mean"], color=KIND_COLOURS["teacher"], linestyle="--", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([e["label"] for e in entries], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("mAP (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, top * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: str, plan: Sequence[Run], specs: Sequence[RunSpec], settings: Settings,
                  failures: Dict[str, str], wall_seconds: float) -> Dict:
    rows = collect(plan, settings, failures)
    summary = summarise(rows, specs)
    md = format_markdown(summary, rows, settings, wall_seconds)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    atomic_write_json(os.path.join(out, "table.json"), {"settings": settings.as_dict(), "summary": summary,
                                                        "runs": rows})
    title = (f"synthetic hard world, {len(settings.seeds)} seed(s), {settings.steps} steps per student, "
             f"{settings.run_steps(TEACHER)} for the teacher")
    plot_map(summary, rows, os.path.join(out, "map.png"), title)
    print(md)
    print(f"wrote {os.path.join(out, 'table.md')}, table.json and map.png")
    return {"rows": rows, "summary": summary, "markdown": md}


# --------------------------------------------------------------------------------------------


def format_plan(plan: Sequence[Run], settings: Settings, states: Dict[str, str]) -> str:
    todo = [r for r in plan if states[r.key] != "done"]
    specs = list(dict.fromkeys(r.spec for r in plan))
    lines = [f"plan: {len(settings.seeds)} seed(s) x {len(specs)} models = {len(plan)} runs "
             f"({len(plan) - len(todo)} already done, {len(todo)} to do); every student {_schedule_text(settings, None)}; "
             f"the teacher {_schedule_text(settings, TEACHER)}"]
    for spec in specs:
        per = estimate_run_seconds(spec, settings)
        measured = [m for m in (measured_run_seconds(r) for r in plan if r.spec == spec and states[r.key] == "done")
                    if m is not None]
        took = f" (took {sum(measured) / len(measured) / 60:.1f})" if measured else ""
        lines.append(f"  {spec.name:<22} {spec.label:<30} ~{per / 60:4.1f} min/run{took}   "
                     + " ".join(f"seed{r.seed}:{states[r.key]}" for r in plan if r.spec == spec))
    est = estimate_seconds(plan, settings, todo)
    full = estimate_seconds(plan, settings)
    threads = "one thread" if settings.threads == 1 else "two threads"
    lines.append(f"estimated time: {est / 60:.0f} min for what is left ({full / 60:.0f} min from scratch) "
                 f"on a quiet 2-core CPU, {threads}; a busy machine takes longer")
    busy = busy_note(settings)
    if busy:
        lines.append(busy)
    return "\n".join(lines)


def busy_note(settings: Settings) -> str:
    """A warning when other processes keep the cores busy and torch would run several threads."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if settings.threads == 1 or load < cores:
        return ""
    return (f"note: the machine is busy (load {load:.1f} on {cores} cores): with several torch threads every "
            "step waits for descheduled threads (measured: 3-5x slower); --threads 1 is much faster then")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="world and training seeds")
    p.add_argument("--out", default=None,
                   help="results, worlds and runs (seed<k>/<run>/); default output/table (--quick: output/table_quick)")
    p.add_argument("--steps", type=int, help=f"training steps of every run (default {BASE_EPOCHS * BASE_ITERS})")
    p.add_argument("--epochs", type=int, help=f"epochs of every run (default {BASE_EPOCHS}); with --steps, the "
                   "steps are spread over them; the LR drops x0.1 for the last sixth of the epochs")
    p.add_argument("--students", nargs="+", default=list(DEFAULT_STUDENTS), choices=sorted(STUDENTS),
                   help="students trained alone and with DDPS")
    p.add_argument("--ablations", nargs="*", choices=ABLATIONS, default=None,
                   help=f"DDPS terms (alone and in pairs) for {ABLATION_STUDENT} (default: all six)")
    p.add_argument("--no-ablations", action="store_true", help="no ablation runs")
    p.add_argument("--comparison", nargs="*", choices=list(COMPARISONS), default=None, metavar="METHOD",
                   help=f"add the comparison rows for {ABLATION_STUDENT}: the given methods, or all of "
                        f"{', '.join(COMPARISONS)} when none is given (default: no comparison rows)")
    p.add_argument("--runs", nargs="+", metavar="PATTERN",
                   help="only the runs whose name matches (shell patterns, e.g. 'teacher' 'resnet18_x05*'); "
                        "the teacher is added when a distilled run needs it")
    p.add_argument("--quick", action="store_true", help="a tiny world and 2 steps per run (tests, smoke checks)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimated time, run nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted runs from their latest epoch checkpoint (default: restart them)")
    p.add_argument("--redo", action="store_true", help="train the selected runs again even if finished")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every epoch's checkpoint of finished runs (default: only the last)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="config overrides for every run (e.g. DEVICE cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core); 1 is much faster on cores "
                        "shared with other busy processes")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "output/table_quick" if args.quick else "output/table"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is None or args.dry_run:
        return _main(args)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(before)


def _main(args) -> int:
    settings = make_settings(args)
    plan = build_plan(args, settings)
    specs = list(dict.fromkeys(r.spec for r in plan))
    if args.redo and not args.dry_run:
        for run in plan:
            _wipe(run.dir)
    for run in plan:
        check_settings(run, settings)
    states = {r.key: run_state(r, settings) for r in plan}
    print(format_plan(plan, settings, states))
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    failures: Dict[str, str] = {}
    todo = [r for r in plan if states[r.key] != "done"]
    estimated_left = estimate_seconds(plan, settings, todo)
    spent_estimate = 0.0
    for i, run in enumerate(plan, 1):
        ensure_world(args.out, run.seed, settings)
        if run.spec.distilled and teacher_run(run).key in failures:
            failures[run.key] = f"its teacher ({teacher_run(run).key}) failed"
            print(f"[{i}/{len(plan)}] {run.key}: skipped, {failures[run.key]}")
            continue
        print(f"\n[{i}/{len(plan)}] {run.key}: {run.spec.label} (seed {run.seed})")
        try:
            check_settings(run, settings)  # again: its teacher may have been trained again meanwhile
            result = execute(run, settings, resume=args.resume, keep_checkpoints=args.keep_checkpoints)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed run does not stop the table
            failures[run.key] = f"{type(exc).__name__}: {exc}"
            print(f"{run.key} FAILED: {failures[run.key]}")
            continue
        finally:
            gc.collect()  # the run's models, before the next one is built
        if result["action"] == "reused":
            print(f"{run.key}: done already ({run.dir}), reused")
            continue
        spent_estimate += estimate_run_seconds(run.spec, settings)
        elapsed = time.time() - start
        pace = elapsed / spent_estimate if spent_estimate else 1.0
        left = max(0.0, estimated_left - spent_estimate) * pace
        print(f"{run.key}: {result['action']} in {result['seconds'] / 60:.1f} min; elapsed {elapsed / 60:.1f} min, "
              f"about {left / 60:.0f} min left at this pace")
    write_results(args.out, plan, specs, settings, failures, time.time() - start)
    if failures:
        print("failed runs:\n" + "\n".join(f"  {k}: {v}" for k, v in failures.items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
