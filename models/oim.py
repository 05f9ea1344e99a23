"""Online Instance Matching loss (SPEC 4.1).

Buffers (all in the state dict):
- ``lut`` (LUT_SIZE x D): one row per labeled identity (class = label - 1);
- ``cq`` (CQ_SIZE x D): circular queue of recent unlabeled features;
- ``header_cq`` (int64 scalar): the queue head. The original kept it in a Python attribute, so
  its checkpoints carry only ``lut``/``cq``; ``models.checkpoint.load_model_weights`` fills a
  missing ``header_cq`` with 0 and says so.

Labels: 0 background (ignored), 1..LUT_SIZE labeled, ``UNLABELED_PID`` (5555) unlabeled (no loss
term, but its feature enters the queue). Any other label is an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.dist import all_gather_variable

__all__ = ["OIMLoss", "UNLABELED_PID", "gather_for_update"]

UNLABELED_PID = 5555


class OIMLoss(nn.Module):
    """``forward(features, labels) -> loss`` computes the loss (float32 even under autocast) on the
    local features, then (in training mode) updates the tables with the foreground features and
    labels of *every* rank, gathered in rank order (``gather_for_update``), so that distributed
    processes apply the same update and keep identical tables. ``update_in_forward = False``
    leaves the update to the caller."""

    def __init__(self, num_features: int = 256, lut_size: int = 5532, cq_size: int = 5000,
                 momentum: float = 0.5, scalar: float = 30.0):
        super().__init__()
        self.num_features = int(num_features)
        self.lut_size = int(lut_size)
        self.cq_size = int(cq_size)
        self.momentum = float(momentum)
        self.scalar = float(scalar)
        self.update_in_forward = True
        self.register_buffer("lut", torch.zeros(self.lut_size, self.num_features))
        self.register_buffer("cq", torch.zeros(self.cq_size, self.num_features))
        self.register_buffer("header_cq", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, lut_size={self.lut_size}, "
                f"cq_size={self.cq_size}, momentum={self.momentum}, scalar={self.scalar}")

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, labels: torch.Tensor) -> None:
        """labels are foreground labels (> 0)."""
        bad = (labels > self.lut_size) & (labels != UNLABELED_PID)
        if bool(bad.any()):
            values = sorted(set(labels[bad].tolist()))[:10]
            raise ValueError(
                f"OIM: person labels {values} exceed LUT_SIZE = {self.lut_size} (MODEL.LOSS."
                f"LUT_SIZE): the lookup table needs one row per training identity (labels 1..C, "
                f"{UNLABELED_PID} = unlabeled); raise LUT_SIZE to the number of classes")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``OIM_SCALAR * features @ [LUT; CQ]^T`` in float32: (N, LUT_SIZE + CQ_SIZE)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            # torch.cat copies the tables, so later in-place updates cannot disturb autograd
            table = torch.cat([self.lut, self.cq], dim=0).float()
            return self.scalar * features.float().mm(table.t())

    # ------------------------------------------------------------------ loss / update
    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the labeled foreground features against class label - 1 (mean over
        them); 0 (connected to ``features``) when there is none."""
        labels = labels.reshape(-1).long()
        fg = labels > 0
        x, y = features[fg], labels[fg]
        self._check_labels(y)
        labeled = y != UNLABELED_PID
        if not bool(labeled.any()):
            return features.float().sum() * 0.0
        logits = self.logits(x[labeled])
        with torch.autocast(device_type=features.device.type, enabled=False):
            return F.cross_entropy(logits, y[labeled] - 1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Update the tables with the foreground features, with the same result as the original
        sequential loop over the samples in order: labeled -> ``row = m*row + (1-m)*x`` then
        re-normalised (the k-th occurrence of a label sees the row left by the (k-1)-th);
        unlabeled -> written at the queue head, which advances circularly."""
        labels = labels.reshape(-1).long().to(features.device)
        x = features.detach().float()
        fg = labels > 0
        x, y = x[fg], labels[fg]
        if y.numel() == 0:
            return
        self._check_labels(y)
        labeled = y != UNLABELED_PID
        xl, cls = x[labeled], y[labeled] - 1
        if cls.numel():
            lut = self.lut
            rank = _occurrence_rank(cls)
            m = self.momentum
            for r in range(int(rank.max()) + 1):
                sel = rank == r
                rows = cls[sel]  # distinct within a round
                new = m * lut[rows].float() + (1.0 - m) * xl[sel]
                new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
                lut[rows] = new.to(lut.dtype)
        xu = x[~labeled]
        k = xu.shape[0]
        q = self.cq_size
        if k and q:
            head = self.header_cq
            skip = max(k - q, 0)  # with more than q of them, only the last q survive
            idx = torch.arange(skip, k, device=head.device)
            pos = (head + idx) % q
            self.cq[pos.to(self.cq.device)] = xu[skip:].to(self.cq.dtype)
            head.copy_((head + k) % q)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss(features, labels)
        if self.update_in_forward and self.training:
            self.update(*gather_for_update(features, labels))
        return loss


def gather_for_update(features: torch.Tensor, labels: torch.Tensor):
    """(features, labels) of the foreground boxes of all ranks, rank 0's first, as float32 /
    int64; the local foreground ones when the run is not distributed. Every rank must call it
    (it is a collective), with its own number of rows."""
    labels = labels.reshape(-1).long().to(features.device)
    fg = labels > 0
    return all_gather_variable(features.detach()[fg].float(), labels[fg])


def _occurrence_rank(values: torch.Tensor) -> torch.Tensor:
    """For each element, how many equal elements precede it (0 for the first occurrence)."""
    n = values.numel()
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    pos = torch.arange(n, device=values.device)
    is_start = torch.ones(n, dtype=torch.bool, device=values.device)
    is_start[1:] = sorted_vals[1:] != sorted_vals[:-1]
    group_start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start
    return rank
