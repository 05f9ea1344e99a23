"""MGD: masked generative distillation of the FPN maps (Yang et al., "Masked Generative
Distillation", ECCV 2022).

Instead of imitating the teacher's map directly, the student's map is randomly masked and a
small generation block must rebuild the teacher's full map from what is left, so the student's
features have to carry enough of the teacher's to regenerate it. Per level, with F_s, F_t
(N x C x H x W, the student's map first aligned to the teacher's width C by a 1x1 conv with bias
when the widths differ):

    u ~ U[0, 1)^(N x 1 x H x W)                 (torch.rand on the map's device: the run's seed)
    M = 0 where u >= 1 - ratio, else 1           (spatial: one value for all channels of a position)
    G = conv3x3(C, C, pad 1) -> ReLU -> conv3x3(C, C, pad 1)      (learnable, one per level)
    MGD = sum( (G(M * F_s) - F_t)^2 ) / N

so a fraction ``ratio`` of the positions is masked on average. (mmrazor writes ``u > 1 - ratio``;
``>=`` differs from it only when u hits 1 - ratio exactly, and makes ratio 1 mask everything.)
Level loss ``loss_mgd_fpn_{level}`` = MGD.ALPHA * MGD on every level of MGD.LEVELS, with
ratio = MGD.MASK_RATIO. Defaults (alpha_mgd 2e-5, lambda_mgd 0.65, all five neck outputs '0'..'3'
and 'pool') are those of mmrazor's Faster R-CNN FPN MGD configs.

Everything (align, mask, generation, loss) runs in float32 with autocast off; the teacher map is
detached. The masks are drawn level after level in MGD.LEVELS order, so a seed fixes all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import DistillTerm, check_levels, float32_losses
from .registry import register_term

__all__ = ["MGDGeneration", "MGDTerm", "mgd_loss", "random_spatial_mask"]


def random_spatial_mask(feat: Tensor, ratio: float) -> Tensor:
    """An N x 1 x H x W mask of 0/1 (dtype and device of ``feat``, N x C x H x W) that is 0 on a
    random fraction ``ratio`` of the positions on average (see the module docstring)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    n, _, h, w = feat.shape
    u = torch.rand((n, 1, h, w), device=feat.device)
    return (u < 1.0 - ratio).to(feat.dtype)


def mgd_loss(generated: Tensor, feat_t: Tensor) -> Tensor:
    """Unweighted MGD of one level given the generated map: sum((generated - F_t)^2) / N, a
    float32 scalar (float64 for float64 inputs), teacher detached."""
    if generated.dim() != 4 or generated.shape != feat_t.shape:
        raise ValueError(f"mgd_loss expects two N x C x H x W maps of one shape, got "
                         f"{tuple(generated.shape)} and {tuple(feat_t.shape)}")
    with torch.autocast(device_type=generated.device.type, enabled=False):
        dtype = torch.float64 if generated.dtype == torch.float64 else torch.float32
        n = generated.shape[0]
        diff = generated.to(dtype) - feat_t.detach().to(dtype)
        return diff.pow(2).sum() / max(n, 1)  # an empty batch gives a (differentiable) zero


class MGDGeneration(nn.Module):
    """One level's learnable parts: ``align`` (1x1 conv with bias, student -> teacher width; None
    when the widths agree) and ``generation`` (conv3x3 -> ReLU -> conv3x3, teacher width)."""

    def __init__(self, teacher_channels: int, student_channels: int):
        super().__init__()
        c = int(teacher_channels)
        self.align = nn.Conv2d(int(student_channels), c, kernel_size=1) if student_channels != c else None
        self.generation = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, feat_s: Tensor, ratio: float) -> Tensor:
        """G(M * align(F_s)): the teacher-width map generated from the masked student map."""
        if self.align is not None:
            feat_s = self.align(feat_s)
        # mask after align, as mmrazor: the masked positions are exactly zero (no bias leaks in)
        return self.generation(feat_s * random_spatial_mask(feat_s, ratio))


@register_term("mgd")
class MGDTerm(DistillTerm):
    """MGD on the FPN levels MGD.LEVELS (see the module docstring). Loss names
    ``loss_mgd_fpn_{level}``. State (checkpoint entry "mgd"): the module's state dict,
    ``levels.{level}.generation.{0,2}.{weight,bias}`` and, when the two FPN widths differ,
    ``levels.{level}.align.{weight,bias}``."""

    needs = frozenset({"features"})

    def __init__(self, levels: Sequence[str], student_channels: int, teacher_channels: int,
                 alpha: float = 2e-5, mask_ratio: float = 0.65):
        super().__init__()
        level_names = check_levels(levels, "MGD.LEVELS")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"MGD.MASK_RATIO must lie in [0, 1], got {mask_ratio}")
        self.alpha, self.mask_ratio = float(alpha), float(mask_ratio)
        self.levels = nn.ModuleDict({level: MGDGeneration(teacher_channels, student_channels)
                                     for level in level_names})

    @staticmethod
    def loss_name(level: str) -> str:
        return f"loss_mgd_fpn_{level}"

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        m = cfg.MGD
        return cls(m.LEVELS, student_channels, teacher_channels, alpha=m.ALPHA, mask_ratio=m.MASK_RATIO)

    @float32_losses
    def forward(self, student, teacher):
        losses = {}
        for level, block in self.levels.items():  # config order: fixes the order of the masks drawn
            generated = block(student.features[level].float(), self.mask_ratio)
            losses[self.loss_name(level)] = self.alpha * mgd_loss(generated, teacher.features[level])
        return losses

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mask_ratio={self.mask_ratio}"
