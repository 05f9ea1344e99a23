"""LD: logit distillation with decoupled knowledge distillation (SPEC 6).

Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) splits the classical
KL(p_t || p_s) between teacher and student class distributions into two parts.

For N samples with K classes, logits z_s, z_t (N x K), targets y (N,) and temperature T:

    p = softmax(z / T)                                     (per row, for student and teacher)

    TCKD ("target class"):   b = [p_y, 1 - p_y]            (binary target / non-target pair)
        TCKD = T^2 * (1/N) * sum_n sum_{j in {0,1}} b_t[n, j] * (log b_t[n, j] - log b_s[n, j])

    NCKD ("non-target classes"): q = softmax over the K-1 non-target logits z[n, j != y] / T
        NCKD = T^2 * (1/N) * sum_n sum_{j != y} q_t[n, j] * (log q_t[n, j] - log q_s[n, j])

    LD = alpha * TCKD + beta * NCKD

With K = 2 (DDPS: person / background first-stage logits) there is a single non-target class,
q is identically [1] and NCKD is exactly 0, so LD = alpha * TCKD.

Numerics: every log-probability is computed from log-softmax / logsumexp of the logits (never
log of a probability): log b_y = log_softmax(z/T)[y], log(1 - p_y) = logsumexp(z_nt/T) -
logsumexp(z/T). The non-target distribution is formed by gathering the K-1 non-target columns
(an exact masking, equivalent to the "subtract 1000 from the target logit" trick of the DKD
paper without its dependence on the logit scale). Computation runs in float32 at least
(half/bfloat16 inputs are promoted; float64 stays float64).

The teacher logits are detached inside: only the student receives gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillTerm
from .registry import register_term

__all__ = ["LDTerm", "ld_loss", "tckd_nckd"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, otherwise the input's own floating dtype."""
    if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
        return torch.float32
    return t.dtype


def _kl_from_logs(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """sum over all entries of exp(log_p_t) * (log_p_t - log_p_s) (KL(p_t || p_s) summed)."""
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)


def tckd_nckd(logits_s: Tensor, logits_t: Tensor, labels: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Return the unweighted (TCKD, NCKD) pair of decoupled KD (see the module docstring).

    logits_s, logits_t: N x K (K >= 2); labels: N integer targets in 0..K-1.
    Both terms are already multiplied by T^2 and divided by N. Empty input gives two zeros
    that still backpropagate (into logits_s).
    """
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape:
        raise ValueError(
            f"ld_loss expects two N x K logit tensors of the same shape, got "
            f"{tuple(logits_s.shape)} and {tuple(logits_t.shape)}")
    n, k = logits_s.shape
    labels = labels.reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"ld_loss: {labels.numel()} labels for {n} rows of logits")
    if n == 0:
        zero = logits_s.sum() * 0.0
        return zero, zero.clone()
    if k < 2:
        raise ValueError("ld_loss needs at least two classes (target and non-target)")

    dtype = _compute_dtype(logits_s)
    zs = logits_s.to(dtype) / temperature
    zt = logits_t.detach().to(dtype) / temperature
    labels = labels.to(device=zs.device, dtype=torch.long)
    target = F.one_hot(labels, k).bool()  # N x K; raises on labels outside 0..K-1

    def binary_logs(z: Tensor) -> Tensor:
        # log [p_y, 1 - p_y] computed from logsumexp terms.
        lse_all = torch.logsumexp(z, dim=1)
        z_y = z.gather(1, labels[:, None]).squeeze(1)
        z_nt = z[~target].reshape(n, k - 1)
        lse_nt = torch.logsumexp(z_nt, dim=1)
        return torch.stack([z_y - lse_all, lse_nt - lse_all], dim=1)

    scale = temperature ** 2 / n
    tckd = _kl_from_logs(binary_logs(zt), binary_logs(zs)) * scale

    log_q_s = F.log_softmax(zs[~target].reshape(n, k - 1), dim=1)
    log_q_t = F.log_softmax(zt[~target].reshape(n, k - 1), dim=1)
    nckd = _kl_from_logs(log_q_t, log_q_s) * scale
    return tckd, nckd


def ld_loss(logits_s: Tensor, logits_t: Tensor, labels: Tensor, alpha: float = 1.0,
            beta: float = 0.5, temperature: float = 4.0) -> Tensor:
    """Decoupled KD between student and teacher logits: alpha * TCKD + beta * NCKD.

    Args:
        logits_s: N x K student logits (DDPS: first-stage person/background logits, K = 2).
        logits_t: N x K teacher logits on the same samples (detached inside).
        labels: N targets in 0..K-1 (DDPS: the 0/1 labels of the sampled proposals).
        alpha, beta: weights of TCKD and NCKD (config DKD.ALPHA, DKD.BETA).
        temperature: T (config DKD.T); both terms carry the usual T^2 factor.

    Returns a scalar; 0 (differentiable) for N = 0. See the module docstring for the formulas.
    """
    tckd, nckd = tckd_nckd(logits_s, logits_t, labels, temperature)
    return alpha * tckd + beta * nckd


@register_term("ld")
class LDTerm(DistillTerm):
    """DDPS's LD: decoupled KD between the student's first-stage logits on its sampled proposals
    and the teacher's logits on the same proposals, target = their 0/1 labels. Config: DKD.ALPHA,
    DKD.BETA, DKD.T, and DKD.WEIGHT multiplying the term. Loss name: loss_ld."""

    needs = frozenset({"proposal_logits"})

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, temperature: float = 4.0, weight: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.weight = float(weight)

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        d = cfg.DKD
        return cls(alpha=d.ALPHA, beta=d.BETA, temperature=d.T, weight=d.WEIGHT)

    def forward(self, student, teacher):
        labels = torch.cat(student.proposal_labels)
        loss = ld_loss(student.proposal_logits, teacher.proposal_logits, labels,
                       alpha=self.alpha, beta=self.beta, temperature=self.temperature)
        return {"loss_ld": self.weight * loss}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, weight={self.weight}"
