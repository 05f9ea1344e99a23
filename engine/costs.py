"""What a model costs: parameters per part, FLOPs of one forward, inference time per image and
the time of one training step, measured through the model's own interfaces on synthetic inputs.

FLOPs come from torch.utils.flop_counter.FlopCounterMode (2 x multiply-accumulates of
convolutions and matrix products; RoIAlign, NMS, element-wise ops and softmax are not counted).
Timings use ``utils.timing``: warm-up calls, then the median of the timed ones.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.schedule import build_optimizer
from utils.timing import peak_gib, repeat_timed, reset_peak

__all__ = ["PARTS", "UNLABELED_PID", "count", "flop_report", "get_part", "inference_report", "make_optimizer",
           "make_step", "norm_kind", "part_flops", "synthetic_batch", "train_report"]

PARTS = ("backbone.body", "backbone.fpn", "rpn", "roi_heads")  # the model parts counted and timed
UNLABELED_PID = 5555

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
