"""CD: correlation distillation of person embeddings, and its person selection (SPEC 6).

Loss. For the M selected people of a batch, with student embeddings E_s (M x D_s) and teacher
embeddings E_t (M x D_t), each row L2-normalised inside (so callers may pass raw or already
normalised embeddings; D_s and D_t may differ since only the M x M matrices are compared):

    CD = sum_{i,j} ( (E_s E_s^T)[i, j] - (E_t E_t^T)[i, j] )^2

i.e. the squared Frobenius distance of the two cosine-similarity matrices. The weight
GRAPHRELA.WEIGHT (0.01) is applied by the caller. Teacher embeddings are detached inside.

Selection. Among the second-stage boxes that carry a person id (labels 1..C labeled, 5555
unlabeled; 0 = background is excluded), each box is scored by the teacher's OIM softmax
probabilities P (rows = boxes, columns = [LUT (lut_size) ; CQ (cq_size)]):

    score = P[i, pid - 1]              for a labeled id (1 <= pid <= lut_size)
    score = max_{j >= lut_size} P[i, j]  for an unlabeled box (pid == 5555)

Then, per image, boxes with width or height < min_size are dropped and non-maximum suppression
(IoU > nms_thresh) runs separately for every (image, id) group, so that near-duplicate boxes of
one person collapse to the best-scored one. One vectorised `torchvision.ops.batched_nms` call
does it for the whole batch, with the group index = a dense renumbering of
image_index * BIG + pid (BIG > every pid).

Implementation note on batched_nms: for small inputs torchvision separates groups by shifting
each group's boxes by group_index * (max coordinate + 1). With raw image_index * BIG + pid
indices the shifts would reach ~1e8 where float32 has a resolution of several pixels and the
IoUs inside a group would be wrong; the groups are therefore renumbered densely (0..G-1,
torch.unique) and the NMS runs on float64 boxes, which keeps the IoUs exact.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .base import DistillTerm
from .registry import register_term

__all__ = ["CDTerm", "UNLABELED_PID", "cd_loss", "oim_scores", "select_cd_persons"]

# Person id of unlabeled people in the training targets (equal to datasets.UNLABELED_PID).
UNLABELED_PID = 5555

TensorOrList = Union[Tensor, Sequence[Tensor]]


def cd_loss(emb_s: Tensor, emb_t: Tensor) -> Tensor:
    """Unweighted correlation distillation: sum((E_s E_s^T - E_t E_t^T)^2).

    Args:
        emb_s: M x D_s student embeddings of the selected people.
        emb_t: M x D_t teacher embeddings of the same people, same order (detached inside).

    Rows are L2-normalised inside (F.normalize, eps 1e-12). Returns a scalar; 0 (still
    differentiable into emb_s) when M = 0. Computed in float32 at least.
    """
    if emb_s.dim() != 2 or emb_t.dim() != 2 or emb_s.shape[0] != emb_t.shape[0]:
        raise ValueError(
            f"cd_loss expects M x D_s and M x D_t embeddings, got {tuple(emb_s.shape)} and "
            f"{tuple(emb_t.shape)}")
    if emb_s.shape[0] == 0:
        return emb_s.sum() * 0.0
    dtype = torch.float32 if emb_s.dtype in (torch.float16, torch.bfloat16) else emb_s.dtype
    # autocast off: under AMP the products below would otherwise run in half precision again
    with torch.autocast(device_type=emb_s.device.type, enabled=False):
        e_s = F.normalize(emb_s.to(dtype), dim=1)
        e_t = F.normalize(emb_t.detach().to(dtype), dim=1)
        g_s = e_s @ e_s.t()
        g_t = e_t @ e_t.t()
        return (g_s - g_t).pow(2).sum()


def _scores_from_probs(probs: Tensor, pids: Tensor, lut_size: int,
                       unlabeled_pid: int = UNLABELED_PID) -> Tensor:
    """Score of every row (see the module docstring); rows with pid 0 get score 0."""
    if probs.dim() != 2 or probs.shape[0] != pids.shape[0]:
        raise ValueError(
            f"OIM probabilities must be M x (lut_size + cq_size) with one row per box, got "
            f"{tuple(probs.shape)} for {pids.shape[0]} boxes")
    if lut_size < 0 or probs.shape[1] < lut_size:
        raise ValueError(f"lut_size {lut_size} does not fit {probs.shape[1]} OIM columns")
    if lut_size >= unlabeled_pid:
        raise ValueError(f"lut_size {lut_size} collides with the unlabeled id {unlabeled_pid}")
    pids = pids.to(probs.device).long()
    labeled = (pids > 0) & (pids != unlabeled_pid)
    unlabeled = pids == unlabeled_pid
    bad = (pids < 0) | (labeled & (pids > lut_size))
    if bool(bad.any()):
        raise ValueError(
            f"person ids outside 0..{lut_size} and {unlabeled_pid}: "
            f"{sorted(set(pids[bad].tolist()))} (is MODEL.LOSS.LUT_SIZE too small?)")
    cq_size = probs.shape[1] - lut_size
    if cq_size == 0 and bool(unlabeled.any()):
        raise ValueError("unlabeled boxes need OIM queue columns beyond lut_size")

    col = (pids - 1).clamp(min=0, max=max(lut_size - 1, 0))
    if lut_size > 0:
        own = probs.gather(1, col[:, None]).squeeze(1)
    else:
        own = probs.new_zeros(pids.shape[0])
    if cq_size > 0:
        queue_max = probs[:, lut_size:].amax(dim=1)
    else:
        queue_max = probs.new_zeros(pids.shape[0])
    zero = probs.new_zeros(())
    return torch.where(labeled, own, torch.where(unlabeled, queue_max, zero))


def oim_scores(oim_logits: Tensor, pids: Tensor, lut_size: int,
               unlabeled_pid: int = UNLABELED_PID) -> Tensor:
    """Per-box CD scores from OIM logits (M x (lut_size + cq_size), e.g. 30 * emb @ [LUT;CQ]^T).

    Softmax over all columns, then: own-class probability (column pid - 1) for labeled ids,
    the largest queue probability (columns lut_size:) for unlabeled ones, 0 for background.
    Raises ValueError for an id that is neither background, 1..lut_size nor unlabeled_pid.
    """
    with torch.no_grad():
        probs = torch.softmax(oim_logits.detach().float(), dim=1)
        return _scores_from_probs(probs, pids.reshape(-1), lut_size, unlabeled_pid)


def _cat(x: TensorOrList) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(list(x), dim=0)


def select_cd_persons(boxes: TensorOrList, pids: TensorOrList, oim_probs: TensorOrList,
                      lut_size: int, nms_thresh: float = 0.7, min_size: float = 0.01,
                      image_ids: Tensor | None = None,
                      unlabeled_pid: int = UNLABELED_PID) -> Tensor:
    """Choose the people whose embeddings enter CD (vectorised over the whole batch).

    Two input forms, both describing the second-stage sampled boxes of a batch:
      * per image lists: `boxes` = [n_i x 4], `pids` = [n_i], `oim_probs` = [n_i x L] (or
        one already concatenated sum(n_i) x L tensor); the image of each box is its list
        position and `image_ids` must be None;
      * concatenated tensors: `boxes` M x 4, `pids` M, `oim_probs` M x L, with `image_ids`
        (M,) giving the image of every box (None = all boxes from one image).

    Args:
        boxes: (x1, y1, x2, y2) boxes.
        pids: person labels of the boxes (0 background, 1..lut_size labeled, 5555 unlabeled).
        oim_probs: the teacher's OIM softmax probabilities, one row per box (background rows
            are ignored), L = lut_size + cq_size columns.
        lut_size: number of labeled identities (OIM table rows; MODEL.LOSS.LUT_SIZE).
        nms_thresh: IoU threshold of the per (image, id) NMS (GRAPHRELA.NMSTHRES).
        min_size: boxes with width or height below it are dropped.

    Returns the kept indices into the concatenated boxes (int64, ascending order, on the
    boxes' device). Scores use `_scores_from_probs` (see the module docstring).
    """
    if image_ids is not None and not isinstance(boxes, Tensor):
        raise ValueError("image_ids is only used with concatenated tensors")
    if image_ids is None and not isinstance(boxes, Tensor):
        counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long)
        image_ids = torch.repeat_interleave(torch.arange(len(counts)), counts)
    boxes = _cat(boxes).reshape(-1, 4)
    pids = _cat(pids).reshape(-1).long()
    oim_probs = _cat(oim_probs)
    device = boxes.device
    m = boxes.shape[0]
    if image_ids is None:
        image_ids = torch.zeros(m, dtype=torch.long, device=device)
    image_ids = image_ids.to(device).long().reshape(-1)
    pids = pids.to(device)
    if pids.shape[0] != m or image_ids.shape[0] != m:
        raise ValueError(f"{m} boxes but {pids.shape[0]} pids and {image_ids.shape[0]} image ids")

    with torch.no_grad():
        scores = _scores_from_probs(oim_probs.detach().to(device), pids, lut_size, unlabeled_pid)
        b = boxes.detach().double()
        wh = b[:, 2:] - b[:, :2]
        cand = (pids > 0) & (wh[:, 0] >= min_size) & (wh[:, 1] >= min_size)
        idx = torch.nonzero(cand).squeeze(1)
        if idx.numel() == 0:
            return idx
        big = max(lut_size, unlabeled_pid) + 1
        group_key = image_ids[idx] * big + pids[idx]
        _, groups = torch.unique(group_key, return_inverse=True)  # dense 0..G-1
        keep = batched_nms(b[idx], scores[idx].double(), groups, nms_thresh)
        return torch.sort(idx[keep]).values


@register_term("cd")
class CDTerm(DistillTerm):
    """DDPS's CD: among the student's second-stage boxes with a person id, the ones
    `select_cd_persons` keeps (scored by the teacher's OIM softmax, per-image per-id NMS at
    GRAPHRELA.NMSTHRES), the student's similarity matrix of their embeddings is pulled to the
    teacher's. Loss name: loss_cd = GRAPHRELA.WEIGHT * cd_loss. The table size is the configured
    MODEL.LOSS.LUT_SIZE (the original hard-coded PRW's 482)."""

    needs = frozenset({"box_embeddings", "oim_logits"})

    def __init__(self, lut_size: int, nms_thresh: float = 0.7, weight: float = 0.01):
        super().__init__()
        self.lut_size = int(lut_size)
        self.nms_thresh = float(nms_thresh)
        self.weight = float(weight)

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        g = cfg.GRAPHRELA
        return cls(cfg.MODEL.LOSS.LUT_SIZE, nms_thresh=g.NMSTHRES, weight=g.WEIGHT)

    def forward(self, student, teacher):
        labels = torch.cat(student.reid_labels)
        counts = torch.tensor([len(b) for b in student.reid_boxes], device=labels.device)
        image_ids = torch.repeat_interleave(torch.arange(len(counts), device=labels.device), counts)
        fg = torch.nonzero(labels > 0).squeeze(1)
        with torch.no_grad():
            probs = torch.softmax(teacher.oim_logits.float(), dim=1)
            keep = select_cd_persons(torch.cat(student.reid_boxes)[fg], labels[fg], probs, self.lut_size,
                                     nms_thresh=self.nms_thresh, image_ids=image_ids[fg])
        chosen = fg[keep]
        return {"loss_cd": self.weight * cd_loss(student.embeddings[chosen], teacher.box_embeddings[chosen])}

    def extra_repr(self) -> str:
        return f"lut_size={self.lut_size}, nms_thresh={self.nms_thresh}, weight={self.weight}"
