"""ReviewKD: knowledge review with attention-based fusion and the HCL loss (comparison method,
SPEC 6.1).

ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021) lets each student
level "review" the coarser ones: the student's maps are fused from the coarsest level to the
finest by ABF (attention-based fusion) modules, and every fused output imitates the teacher's
map of its level through HCL (hierarchical context loss).

ABF of one level, student map x (N x C_in x H x W), widths in -> mid -> out:

    x' = BN(conv1x1(x))                                   (in -> mid, no bias)
    at every level but the coarsest, with y the x' of the previous (coarser) level:
        y  = resize(y, (H, W)), nearest
        z  = sigmoid(conv1x1(concat[x', y]))              (2*mid -> 2, with bias)
        x' = x' * z[:, 0:1] + y * z[:, 1:2]
    out = BN(conv3x3(x'))                                 (mid -> out, padding 1, no bias)

It returns (out, x'); x' goes on to the next (finer) level. Init: the two main convs (conv1x1
and conv3x3) Kaiming-uniform with a = 1, i.e. U(-b, b), b = sqrt(6 / ((1 + a^2) fan_in)) =
sqrt(3 / fan_in); the attention conv keeps PyTorch's default.

HCL over levels k with fused student outputs S_k and teacher maps T_k (N x C x H_k x W_k):

    level_k = ( mse(S_k, T_k) + sum_j w_j * mse(P_l(S_k), P_l(T_k)) ) / (1 + sum_j w_j)
    hcl     = sum_k level_k

where mse is the mean squared error, P_l the adaptive average pool to l x l, l runs over
(4, 2, 1) SKIPPING every l >= H_k (a level smaller than 4 x 4 uses fewer pools, a level of height
1 none), and w_j = 0.5, 0.25, 0.125 for the first, second and third pool actually used.

The term (`ReviewKDTerm`) uses the five FPN outputs '0'..'3' and 'pool', one ABF per level,
applied from 'pool' (no fusion) to '0'; loss_reviewkd = REVIEWKD.WEIGHT * hcl. The ABF
modules are the term's learnable parts and are trained with the student (the original never
gave them to the optimizer, so they stayed at their random initialisation: SPEC 6.1, a defect
not carried over); their state dict (BN running statistics included) is the checkpoint entry
"reviewkd". The teacher maps are detached; everything runs in float32 with autocast off
(float64 inputs of `hcl_loss` stay float64).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ALL_FPN_LEVELS, DistillTerm, float32_losses
from .registry import register_term

__all__ = ["ABF", "ReviewKDTerm", "hcl_loss"]

HCL_POOL_SIZES = (4, 2, 1)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # float32 for half-precision maps, else their own (float64 stays float64)
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class ABF(nn.Module):
    """Attention-based fusion of one level (module docstring).

    Args: in_channels (student width), mid_channels, out_channels (teacher width), fuse (False
    at the coarsest level: no attention conv, nothing to fuse). Submodule names are the
    original's (conv1 = [conv1x1, BN], att_conv = [conv1x1, sigmoid], conv2 = [conv3x3, BN]),
    so its state dicts read the same.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(out, x') of student map ``x``, fused with ``y`` (the coarser level's x')."""
        if (y is None) != (self.att_conv is None):
            raise ValueError("ABF: the coarsest level takes no residual, every other level needs one")
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))  # N x 2 x H x W: per-position weights
            x = x * z[:, 0:1] + y * z[:, 1:2]
        return self.conv2(x), x


def _level_hcl(fs: Tensor, ft: Tensor) -> Tensor:
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for size in HCL_POOL_SIZES:
        if size >= fs.shape[2]:  # the original compares with the height only
            continue
        weight /= 2.0  # 0.5, 0.25, 0.125 for the pools actually used
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


def hcl_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """ReviewKD's HCL summed over two lists of levels, unweighted (module docstring).
    feats_s: the fused student outputs; feats_t: the teacher's maps (detached), shapes pairwise
    equal (N x C x H x W)."""
    feats_s, feats_t = list(feats_s), list(feats_t)
    if not feats_s or len(feats_s) != len(feats_t):
        raise ValueError(f"hcl_loss expects two equally long, non-empty lists of levels, got "
                         f"{len(feats_s)} and {len(feats_t)}")
    with torch.autocast(device_type=feats_s[0].device.type, enabled=False):
        total = None
        for fs, ft in zip(feats_s, feats_t):
            if fs.dim() != 4 or fs.shape != ft.shape:
                raise ValueError(f"hcl_loss: student level {tuple(fs.shape)} and teacher level "
                                 f"{tuple(ft.shape)} differ")
            dtype = _compute_dtype(fs)
            level = _level_hcl(fs.to(dtype), ft.detach().to(dtype))
            total = level if total is None else total + level
        return total


@register_term("reviewkd")
class ReviewKDTerm(DistillTerm):
    """ReviewKD on the five FPN outputs (module docstring). Config: REVIEWKD.WEIGHT. Learnable
    parts: `abfs`, an nn.ModuleDict of one ABF per level keyed by the level name ('0'..'3',
    'pool'; ABF(student width -> teacher width -> teacher width), 'pool' without fusion). Its
    state dict is the checkpoint entry "reviewkd" (keys "abfs.<level>.conv1.0.weight", ...)."""

    needs = frozenset({"features"})

    def __init__(self, student_channels: int, teacher_channels: int, weight: float = 1.2):
        super().__init__()
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.weight = float(weight)
        coarsest = ALL_FPN_LEVELS[-1]
        # mid = the teacher width (256 for SeqNet's FPN, as the original's 256 -> 256 -> 256)
        self.abfs = nn.ModuleDict({
            level: ABF(self.student_channels, self.teacher_channels, self.teacher_channels,
                       fuse=level != coarsest)
            for level in ALL_FPN_LEVELS})

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        return cls(student_channels, teacher_channels, weight=cfg.REVIEWKD.WEIGHT)

    def review(self, features) -> Dict[str, Tensor]:
        """The fused outputs of the student's FPN ``features``, level name -> N x C_t x H x W,
        computed from the coarsest level to the finest."""
        outs, residual = {}, None
        for level in reversed(ALL_FPN_LEVELS):
            abf = self.abfs[level]
            x = features[level].to(abf.conv1[0].weight.dtype)  # autocast is off: match the weights
            outs[level], residual = abf(x, residual)
        return outs

    @float32_losses
    def forward(self, student, teacher) -> Dict[str, Tensor]:
        outs = self.review(student.features)
        loss = hcl_loss([outs[level] for level in ALL_FPN_LEVELS],
                        [teacher.features[level] for level in ALL_FPN_LEVELS])
        return {"loss_reviewkd": self.weight * loss}

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"weight={self.weight}")
