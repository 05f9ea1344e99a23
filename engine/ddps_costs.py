"""What the distillation step costs beyond the student's own step and the teacher's forward.

``time_ddps_step`` times three things on one batch in interleaved rounds (so that load from other
processes hits them alike): the student's training step, the teacher's forward alone (no grad,
on the student's transformed batch: the outputs the distiller's terms declare) and the whole
distillation step. ``component_report`` times each distillation term alone (forward + backward
on detached student tensors) and the parts of DFD's first level; ``profile_steps`` gives a
torch.profiler breakdown of the two steps by labelled region (forward hooks, removed after).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from utils.timing import peak_gib, reset_peak, summary, sync, timed, repeat_timed

__all__ = ["component_report", "profile_steps", "profiler_labels", "teacher_forward_fn", "time_ddps_step"]

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
            diff = feat_s - feat_t
            module.global_term(feat_s, feat_t, diff, diff.pow(2)).backward()

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


def time_ddps_step(distiller, student_step, ddps_step, rec, device, warmup, repeats):
    """Timings (``utils.timing.summary``) of the student step, the teacher forward and the DDPS
    step, and the overhead of the DDPS step over the other two, in seconds and % (wall clock;
    also in CPU time, and the system-time part)."""
    fns = {"student_step": student_step, "teacher_forward": teacher_forward_fn(distiller, rec), "ddps_step": ddps_step}
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
    res["peak_gib"] = peak_gib(device)
    return res
