"""DFD: disaggregation feature distillation on one FPN level (SPEC 6).

DFD follows FGD (focal and global distillation): the feature map is split into person and
background regions that are distilled separately, weighted by the teacher's attention, plus an
attention-imitation term and a global-context term. Notation: F_s, F_t are the student's and
the teacher's maps (N x C x H x W), tau = temp.

Attention of a map F:
    A_sp[n, h, w] = H*W * softmax_{(h, w)}( mean_c |F[n, c, h, w]| / tau )     (N x H x W)
    A_ch[n, c]    = C   * softmax_{c}    ( mean_{h,w} |F[n, c, h, w]| / tau )   (N x C)

Masks (`dfd_masks`): a ground-truth box (x1, y1, x2, y2) in pixels of the padded batch tensor
of size (H_img, W_img) is mapped to the grid by x' = x / W_img * W, y' = y / H_img * H (in the
boxes' floating dtype, in that order of operations, as the original); it covers rows
floor(y1')..ceil(y2') and columns floor(x1')..ceil(x2'), both ends included, clamped to the grid
(rows 0..H-1, columns 0..W-1). Every covered cell gets

    1 / ((ceil(y2') - floor(y1') + 1) * (ceil(x2') - floor(x1') + 1))

computed from the UNCLAMPED range, and overlapping boxes keep the maximum. M_bg = 1 on the cells
no box covers, divided by their count (all zeros if every cell is covered).

    The area is the original's, not the covered cell count: a box touching the right or bottom
    edge of the padded tensor has ceil(x2') = W, one column past the grid, and that column
    counts in its area although no cell of it exists (the original sliced the unclamped range,
    and slicing past the end of a tensor stops at the end). Such a border box therefore gets a
    slightly smaller per-cell value than a box of the same size inside the map. This weighting
    defines the method's DFD term, so it is reproduced exactly (docs/FAITHFULNESS.md). A box
    that lies entirely outside the grid covers nothing.

    Geometry: the original scaled boxes by the un-padded image size while the map covers the
    padded batch tensor; here boxes are mapped with the padded tensor size, i.e. by the level's
    true stride, so the mask lies on the person (SPEC 6 asks for this departure).

Terms (sums over every entry, broadcast M (N,1,H,W), A_sp_t (N,1,H,W), A_ch_t (N,C,1,1)):
    fg        = sum( M_fg * A_sp_t * A_ch_t * (F_s - F_t)^2 ) / N
    bg        = sum( M_bg * A_sp_t * A_ch_t * (F_s - F_t)^2 ) / N
    attention = ( sum |A_ch_s - A_ch_t| + sum |A_sp_s - A_sp_t| ) / N
    global    = sum( (G_s(F_s) - G_t(F_t))^2 ) / N
where G is a GCNet-style context block:
    w       = softmax over positions of conv_mask(F)          (1x1 conv C -> 1)
    context = sum over positions of w * F                       (N x C x 1 x 1)
    G(F)    = F + channel_add_conv(context),  channel_add_conv = 1x1 conv C -> C/2,
              LayerNorm([C/2, 1, 1]), ReLU, 1x1 conv C/2 -> C
Init: conv_mask_* Kaiming-normal (fan_in, ReLU gain) with zero bias; the last conv of each
channel_add_conv zero weight and bias, so at initialisation global = sum (F_s - F_t)^2 / N.

Level loss = alpha * fg + beta * bg + gamma * attention + lam * global.

The student map first goes through `align` (1x1 conv student_channels -> channels) when the
widths differ. The teacher map is detached: no gradient reaches the teacher network, but both
context blocks (student side and teacher side) are learnable and trained through the global
term, as in FGD. Submodule names follow FGD (conv_mask_s/_t, channel_add_conv_s/_t, align) so
the "fgd" entries of an original distillation checkpoint map onto them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from models.checkpoint import CheckpointMismatchError

from .base import FPN_LEVELS, DistillTerm
from .registry import register_term

__all__ = ["DFDLoss", "DFDTerm", "dfd_attention", "dfd_masks"]


def dfd_attention(feat: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """Spatial and channel attention of an N x C x H x W map: (A_sp (N,H,W), A_ch (N,C))."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = value.mean(dim=1).reshape(n, h * w)
    a_sp = (h * w) * torch.softmax(spatial / temp, dim=1)
    channel = value.mean(dim=(2, 3))
    a_ch = c * torch.softmax(channel / temp, dim=1)
    return a_sp.reshape(n, h, w), a_ch


def dfd_masks(boxes: Sequence[Tensor], grid_size: tuple[int, int],
              image_size: tuple[int, int], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Person and background masks (M_fg, M_bg), each N x H x W (see the module docstring).

    boxes: one n_i x 4 tensor per image (x1, y1, x2, y2, pixels of the padded batch tensor);
    grid_size: (H, W) of the feature level; image_size: (H_img, W_img) of the padded tensor.
    Vectorised: boxes are padded to N x B x 4 with a validity mask; each box's row and column
    ranges are compared with index grids and the per-box values are reduced by amax over B.
    """
    n = len(boxes)
    h, w = int(grid_size[0]), int(grid_size[1])
    h_img, w_img = float(image_size[0]), float(image_size[1])
    if device is None:
        device = boxes[0].device if n > 0 else torch.device("cpu")
    boxes = [b.reshape(-1, 4) for b in boxes]
    counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long, device=device)
    n_max = int(counts.max()) if n > 0 else 0
    if n_max == 0:
        fg = torch.zeros(n, h, w, dtype=dtype, device=device)
    else:
        fdtype = boxes[0].dtype if boxes[0].is_floating_point() else torch.float32
        padded = pad_sequence([b.to(device=device, dtype=fdtype) for b in boxes],
                              batch_first=True)  # N x B x 4
        valid = torch.arange(n_max, device=device)[None, :] < counts[:, None]  # N x B
        # Map to the grid as the original does: x / W_img * W, y / H_img * H (box dtype), then
        # the inclusive integer range. The per-cell value comes from the unclamped range; only
        # the covered cells are clamped to the grid.
        x_lo = torch.floor(padded[..., 0] / w_img * w).long()
        y_lo = torch.floor(padded[..., 1] / h_img * h).long()
        x_hi = torch.ceil(padded[..., 2] / w_img * w).long()
        y_hi = torch.ceil(padded[..., 3] / h_img * h).long()
        value = 1.0 / (y_hi - y_lo + 1).clamp(min=1).to(dtype) / (x_hi - x_lo + 1).clamp(min=1).to(dtype)
        x_lo, y_lo = x_lo.clamp(min=0), y_lo.clamp(min=0)
        x_hi, y_hi = x_hi.clamp(max=w - 1), y_hi.clamp(max=h - 1)
        valid = valid & (x_lo <= x_hi) & (y_lo <= y_hi)
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        in_rows = (rows >= y_lo[..., None]) & (rows <= y_hi[..., None]) & valid[..., None]
        in_cols = (cols >= x_lo[..., None]) & (cols <= x_hi[..., None])  # N x B x W
        inside = in_rows[..., :, None] & in_cols[..., None, :]  # N x B x H x W
        zero = torch.zeros((), dtype=dtype, device=device)
        fg = torch.where(inside, value[..., None, None], zero).amax(dim=1)
    uncovered = (fg == 0).to(dtype)
    count = uncovered.sum(dim=(1, 2), keepdim=True)
    bg = uncovered / count.clamp(min=1)
    return fg, bg


def _context_block(channels: int) -> nn.Sequential:
    hidden = channels // 2
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=1),
        nn.LayerNorm([hidden, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=1),
    )


class DFDLoss(nn.Module):
    """DFD loss of one FPN level (formulas in the module docstring).

    Args:
        channels: teacher channel count C (FGD.TEACHER_CHANNELS[level]).
        temp: attention temperature tau (FGD.TEMP).
        alpha, beta, gamma, lam: weights of fg, bg, attention and global terms
            (FGD.ALPHA_FGD, FGD.BATE_FGD, FGD.GAMMA_FGD, FGD.LAMBDA_FGD).
        student_channels: student width; when given and different from `channels`, a 1x1
            conv `align` maps the student map to the teacher's width first.
    """

    def __init__(self, channels: int, temp: float = 0.5, alpha: float = 5e-5,
                 beta: float = 2.5e-5, gamma: float = 5e-5, lam: float = 5e-7,
                 student_channels: int | None = None):
        super().__init__()
        if channels < 2:
            raise ValueError("DFDLoss needs at least 2 channels (the context block halves C)")
        self.channels = int(channels)
        self.student_channels = int(student_channels) if student_channels else self.channels
        self.temp = float(temp)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lam = float(lam)
        if self.student_channels != self.channels:
            self.align = nn.Conv2d(self.student_channels, self.channels, kernel_size=1)
        else:
            self.align = None
        self.conv_mask_s = nn.Conv2d(self.channels, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(self.channels, 1, kernel_size=1)
        self.channel_add_conv_s = _context_block(self.channels)
        self.channel_add_conv_t = _context_block(self.channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_in) C->1 convs with zero bias; zero last conv of each transform."""
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for block in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    @staticmethod
    def channel_add(x: Tensor, conv_mask: nn.Conv2d, transform: nn.Sequential) -> Tensor:
        """channel_add_conv(context) of the context block: N x C x 1 x 1 (G(F) = F + this)."""
        n, c, h, w = x.shape
        weights = torch.softmax(conv_mask(x).reshape(n, 1, h * w), dim=2)  # N x 1 x HW
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2))  # N x C x 1
        return transform(context.reshape(n, c, 1, 1))

    @classmethod
    def global_context(cls, x: Tensor, conv_mask: nn.Conv2d, transform: nn.Sequential) -> Tensor:
        """G(F) = F + channel_add_conv(context)."""
        return x + cls.channel_add(x, conv_mask, transform)

    def forward_terms(self, feat_s: Tensor, feat_t: Tensor, boxes: Sequence[Tensor],
                      image_size: tuple[int, int]) -> dict[str, Tensor]:
        """The four unweighted terms {"fg", "bg", "attention", "global"} (scalars), computed in
        float32 with autocast off (under AMP the convolutions and products would otherwise run
        in half precision again)."""
        with torch.autocast(device_type=feat_t.device.type, enabled=False):
            return self._forward_terms(feat_s, feat_t, boxes, image_size)

    def _forward_terms(self, feat_s: Tensor, feat_t: Tensor, boxes: Sequence[Tensor],
                       image_size: tuple[int, int]) -> dict[str, Tensor]:
        if feat_s.dim() != 4 or feat_t.dim() != 4:
            raise ValueError("DFDLoss expects N x C x H x W feature maps")
        if len(boxes) != feat_t.shape[0]:
            raise ValueError(f"{len(boxes)} box lists for a batch of {feat_t.shape[0]}")
        if feat_s.shape[1] != self.student_channels or feat_t.shape[1] != self.channels:
            raise ValueError(
                f"DFDLoss built for {self.student_channels} -> {self.channels} channels, got "
                f"student {feat_s.shape[1]} and teacher {feat_t.shape[1]}")
        feat_t = feat_t.detach().float()
        feat_s = feat_s.float()
        if self.align is not None:
            feat_s = self.align(feat_s)
        if feat_s.shape != feat_t.shape:
            raise ValueError(
                f"student map {tuple(feat_s.shape)} and teacher map {tuple(feat_t.shape)} differ")
        n, _, h, w = feat_t.shape
        if n == 0:
            zero = feat_s.sum() * 0.0
            return {"fg": zero, "bg": zero, "attention": zero, "global": zero}

        a_sp_s, a_ch_s = dfd_attention(feat_s, self.temp)
        a_sp_t, a_ch_t = dfd_attention(feat_t, self.temp)
        m_fg, m_bg = dfd_masks(boxes, (h, w), image_size, device=feat_t.device,
                               dtype=feat_t.dtype)

        # sum(M * A_sp_t * A_ch_t * (F_s - F_t)^2): the channel weights are contracted first
        # (N x H x W), which avoids N x C x H x W temporaries per mask.
        diff = feat_s - feat_t
        diff_sq = diff.pow(2)
        per_cell = torch.einsum("nchw,nc->nhw", diff_sq, a_ch_t) * a_sp_t
        fg = (per_cell * m_fg).sum() / n
        bg = (per_cell * m_bg).sum() / n
        attention = ((a_ch_s - a_ch_t).abs().sum() + (a_sp_s - a_sp_t).abs().sum()) / n
        glob = self.global_term(feat_s, feat_t, diff, diff_sq)
        return {"fg": fg, "bg": bg, "attention": attention, "global": glob}

    def global_term(self, feat_s: Tensor, feat_t: Tensor, diff: Tensor, diff_sq: Tensor) -> Tensor:
        """sum (G_s(F_s) - G_t(F_t))^2 / N, given D = F_s - F_t and D^2.

        With G(F) = F + a (a: N x C x 1 x 1, one value per channel) it is sum (D + da)^2 =
        sum D^2 + 2 sum_nc da_nc sum_hw D_nchw + HW sum da^2 for da = a_s - a_t: the same value
        without the four N x C x H x W passes (and their backward) of building G_s(F_s), G_t(F_t)
        and their difference; D^2 is the one the focal terms use."""
        n, _, h, w = diff.shape
        delta = (self.channel_add(feat_s, self.conv_mask_s, self.channel_add_conv_s)
                 - self.channel_add(feat_t, self.conv_mask_t, self.channel_add_conv_t)).reshape(n, -1)
        return (diff_sq.sum() + 2.0 * (delta * diff.sum(dim=(2, 3))).sum() + h * w * delta.pow(2).sum()) / n

    def forward(self, feat_s: Tensor, feat_t: Tensor, boxes: Sequence[Tensor],
                image_size: tuple[int, int]) -> Tensor:
        """Weighted level loss alpha*fg + beta*bg + gamma*attention + lam*global."""
        t = self.forward_terms(feat_s, feat_t, boxes, image_size)
        return (self.alpha * t["fg"] + self.beta * t["bg"] + self.gamma * t["attention"]
                + self.lam * t["global"])

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, student_channels={self.student_channels}, "
                f"temp={self.temp}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
                f"lam={self.lam}")


@register_term("dfd")
class DFDTerm(DistillTerm):
    """DDPS's DFD on the four FPN outputs '0'..'3' (the outputs of fpn.layer_blocks.0-3), one
    ``DFDLoss`` per level. Each level's loss and its parts in a checkpoint's "fgd" entry are named
    as in the original, ``loss_fgd_fpn_layer_{i}``, so the original's {"student", "fgd"} layout is
    kept. Config: FGD.* (FGD.WEIGHT multiplies every level's loss)."""

    needs = frozenset({"features"})
    checkpoint_key = "fgd"

    def __init__(self, levels: "dict[str, DFDLoss]", weight: float = 1.0):
        super().__init__()
        self.levels = nn.ModuleDict(levels)
        self.weight = float(weight)

    @staticmethod
    def loss_name(level: str) -> str:
        return f"loss_fgd_fpn_layer_{level}"

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        f = cfg.FGD
        levels = {}
        for i, level in enumerate(FPN_LEVELS):
            t_ch, s_ch = int(f.TEACHER_CHANNELS[i]), int(f.STUDENT_CHANNELS[i])
            if (s_ch, t_ch) != (student_channels, teacher_channels):
                raise ValueError(
                    f"FGD.STUDENT_CHANNELS[{i}] / FGD.TEACHER_CHANNELS[{i}] are {s_ch} / {t_ch} but the "
                    f"student's and the teacher's FPN maps have {student_channels} / {teacher_channels} channels")
            levels[cls.loss_name(level)] = DFDLoss(t_ch, temp=f.TEMP, alpha=f.ALPHA_FGD, beta=f.BATE_FGD,
                                                   gamma=f.GAMMA_FGD, lam=f.LAMBDA_FGD, student_channels=s_ch)
        return cls(levels, weight=f.WEIGHT)

    def forward(self, student, teacher):
        boxes = [t["boxes"] for t in student.targets]
        padded_size = tuple(student.images.tensors.shape[-2:])
        return {self.loss_name(level): self.weight * self.levels[self.loss_name(level)](
                    student.features[level], teacher.features[level], boxes, padded_size)
                for level in FPN_LEVELS}

    def checkpoint_state(self):
        return {name: module.state_dict() for name, module in self.levels.items()}

    def load_checkpoint_state(self, state):
        if set(state) != set(self.levels):
            raise CheckpointMismatchError(
                f"DFD parts in the checkpoint {sorted(state)} differ from this config's {sorted(self.levels)}",
                missing=sorted(set(self.levels) - set(state)), unexpected=sorted(set(state) - set(self.levels)))
        for name, module in self.levels.items():
            module.load_state_dict(state[name], strict=True)
