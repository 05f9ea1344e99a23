"""PKD: Pearson-correlation knowledge distillation on the FPN outputs (comparison method, SPEC 6.1).

PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022) imitates the teacher's features after removing their
scale: every map is standardised per channel, so only the pattern of each channel counts (the
MSE of standardised maps is 1 - the Pearson correlation coefficient, up to the n/(n-1) factor).

For one level, F of shape N x C x H x W, n = N*H*W values per channel:

    mu_c    = (1/n) * sum_{n,h,w} F[n, c, h, w]
    sigma_c = sqrt( 1/(n-1) * sum_{n,h,w} (F[n, c, h, w] - mu_c)^2 )      (unbiased)
    F^[n, c, h, w] = (F[n, c, h, w] - mu_c) / (sigma_c + 1e-6)

    pkd_loss(F_s, F_t) = (1 / (N*C*H*W)) * sum (F^_s - F^_t)^2 / 2

The term (`PKDTerm`) applies it to the four FPN outputs '0'..'3' (the outputs of
fpn.layer_blocks.0-3; not the pooled level, as the original): where the student's and the
teacher's widths differ, a learnable 1x1 conv with bias first maps the student's map to the
teacher's width. Level loss = PKD.WEIGHT * pkd_loss, named loss_pkd_fpn_layer_{i} (the
original's names).

    Note: the standardisation removes any per-channel constant, so the align conv's bias has no
    effect on the loss and gets an (analytically) zero gradient; it is kept because SPEC 6.1 and
    the original define the conv with a bias.

The teacher map is detached; the arithmetic runs in float32 with autocast off (float64 inputs
stay float64), whatever precision the maps come in.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .base import FPN_LEVELS, DistillTerm, float32_losses
from .registry import register_term

__all__ = ["PKDTerm", "pkd_loss"]

EPS = 1e-6


def _compute_dtype(t: Tensor) -> torch.dtype:
    # float32 for half-precision maps (their variance would lose too many digits), else their own
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _standardise(feat: Tensor) -> Tensor:
    """C x (N*H*W): each channel of an N x C x H x W map minus its mean, over (std + 1e-6)."""
    c = feat.shape[1]
    flat = feat.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)  # unbiased (n - 1), as the original
    return (flat - mean) / (std + EPS)


def pkd_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """PKD of one level, unweighted: mean of the squared difference of the per-channel
    standardised maps, halved (module docstring). feat_s, feat_t: N x C x H x W, same shape
    (the student's already at the teacher's width). The teacher map is detached."""
    if feat_s.dim() != 4 or feat_s.shape != feat_t.shape:
        raise ValueError(f"pkd_loss expects two N x C x H x W maps of the same shape, got "
                         f"{tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
    n, _, h, w = feat_s.shape
    if n * h * w < 2:
        # the unbiased std of a single value is undefined (0/0): refuse rather than return NaN
        raise ValueError(f"pkd_loss needs at least 2 values per channel, got a {tuple(feat_s.shape)} map")
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        dtype = _compute_dtype(feat_s)
        norm_s = _standardise(feat_s.to(dtype))
        norm_t = _standardise(feat_t.detach().to(dtype))
        return (norm_s - norm_t).pow(2).mean() / 2


@register_term("pkd")
class PKDTerm(DistillTerm):
    """PKD on the four FPN outputs '0'..'3' (module docstring). Config: PKD.WEIGHT multiplies
    every level's loss. Learnable parts: `align`, one 1x1 conv (with bias) per level keyed by
    the level name, only when the widths differ; its state dict is the checkpoint entry "pkd"
    (nothing is saved when the widths are equal)."""

    needs = frozenset({"features"})

    def __init__(self, student_channels: int, teacher_channels: int, weight: float = 6.0):
        super().__init__()
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.weight = float(weight)
        if self.student_channels != self.teacher_channels:
            self.align = nn.ModuleDict({level: nn.Conv2d(self.student_channels, self.teacher_channels, 1)
                                        for level in FPN_LEVELS})
        else:
            self.align = None

    @staticmethod
    def loss_name(level: str) -> str:
        return f"loss_pkd_fpn_layer_{level}"

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        return cls(student_channels, teacher_channels, weight=cfg.PKD.WEIGHT)

    @float32_losses
    def forward(self, student, teacher) -> Dict[str, Tensor]:
        losses = {}
        for level in FPN_LEVELS:
            feat_s = student.features[level]
            if self.align is not None:
                conv = self.align[level]
                feat_s = conv(feat_s.to(conv.weight.dtype))  # autocast is off: match the weights
            losses[self.loss_name(level)] = self.weight * pkd_loss(feat_s, teacher.features[level])
        return losses

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"weight={self.weight}")
