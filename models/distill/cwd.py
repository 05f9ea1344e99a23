"""CWD: channel-wise distillation of the FPN maps (Shu et al., "Channel-wise Knowledge
Distillation for Dense Prediction", ICCV 2021).

Every channel of a map is turned into a distribution over its spatial positions, and the
student's distribution is pulled to the teacher's. For maps F_s, F_t (N x C x H x W) and a
temperature tau:

    p[n, c, :] = softmax over the H*W positions of F[n, c] / tau        (teacher and student)
    CWD        = tau^2 / (N * C) * sum_{n, c} KL(p_t[n, c] || p_s[n, c])
               = tau^2 / (N * C) * sum_{n, c, i} p_t (log p_t - log p_s)

Log-probabilities come from log_softmax (never the log of a probability), in float32 with
autocast off (float64 inputs stay float64). The teacher map is detached.

Level loss ``loss_cwd_fpn_{level}`` = CWD.WEIGHT * CWD(F_s, F_t; CWD.TAU) on every level of
CWD.LEVELS. Defaults (weight 10, tau 1, all five neck outputs '0'..'3' and 'pool') are those of
mmrazor's Faster R-CNN FPN CWD configs.

When the student's FPN is narrower or wider than the teacher's, a learnable 1x1 conv per level
(``align``) maps the student's map to the teacher's width first. It has no bias: adding a
constant to a whole channel does not change that channel's spatial softmax, so a bias could never
receive a gradient (the loss is exactly invariant to it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillTerm, check_levels, float32_losses
from .registry import register_term

__all__ = ["CWDTerm", "cwd_loss"]


def cwd_loss(feat_s: Tensor, feat_t: Tensor, tau: float = 1.0) -> Tensor:
    """Unweighted CWD of one level (formula in the module docstring): a scalar, float32 (float64
    for float64 inputs), differentiable in ``feat_s`` only."""
    if feat_s.dim() != 4 or feat_s.shape != feat_t.shape:
        raise ValueError(f"cwd_loss expects two N x C x H x W maps of one shape, got "
                         f"{tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
    if tau <= 0:
        raise ValueError(f"cwd_loss: tau must be positive, got {tau}")
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        dtype = torch.float64 if feat_s.dtype == torch.float64 else torch.float32
        n, c, h, w = feat_s.shape
        if n * c == 0:
            return feat_s.to(dtype).sum() * 0.0  # empty batch: a zero that still backpropagates
        # one row per (n, c): the softmax runs over that channel's H*W positions
        log_p_s = F.log_softmax(feat_s.to(dtype).reshape(n * c, h * w) / tau, dim=1)
        log_p_t = F.log_softmax(feat_t.detach().to(dtype).reshape(n * c, h * w) / tau, dim=1)
        # kl_div(input=log p_s, target=log p_t, log_target) = sum p_t (log p_t - log p_s)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        return kl * (tau ** 2) / (n * c)


@register_term("cwd")
class CWDTerm(DistillTerm):
    """CWD on the FPN levels CWD.LEVELS (see the module docstring). Loss names
    ``loss_cwd_fpn_{level}``. State: the align convs, ``align.{level}.weight``, only when the
    two FPN widths differ (otherwise the term has no state and checkpoints hold no "cwd" entry)."""

    needs = frozenset({"features"})

    def __init__(self, levels: Sequence[str], student_channels: int, teacher_channels: int,
                 tau: float = 1.0, weight: float = 10.0):
        super().__init__()
        self.levels = check_levels(levels, "CWD.LEVELS")
        if tau <= 0:
            raise ValueError(f"CWD.TAU must be positive, got {tau}")
        self.tau, self.weight = float(tau), float(weight)
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        # empty when the widths agree: the maps are compared as they are
        self.align = nn.ModuleDict()
        if self.student_channels != self.teacher_channels:
            for level in self.levels:
                self.align[level] = nn.Conv2d(self.student_channels, self.teacher_channels,
                                              kernel_size=1, bias=False)

    @staticmethod
    def loss_name(level: str) -> str:
        return f"loss_cwd_fpn_{level}"

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        c = cfg.CWD
        return cls(c.LEVELS, student_channels, teacher_channels, tau=c.TAU, weight=c.WEIGHT)

    @float32_losses
    def forward(self, student, teacher):
        losses = {}
        for level in self.levels:
            feat_s = student.features[level].float()
            if level in self.align:
                feat_s = self.align[level](feat_s)
            losses[self.loss_name(level)] = self.weight * cwd_loss(feat_s, teacher.features[level], self.tau)
        return losses

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, tau={self.tau}, weight={self.weight}"
