"""SeqNet-FPN person search model (SPEC 4): ``build_model(cfg, role)``.

``role`` picks the backbone settings: "baseline" -> ``cfg.BASELINE``, "teacher" ->
``cfg.DISTILLER.TEACHER``, "student" -> ``cfg.DISTILLER.STUDENT``; everything else (RPN, RoI
heads, OIM table sizes, input sizes, loss weights) comes from ``cfg.MODEL``, ``cfg.INPUT`` and
``cfg.SOLVER``.
"""

from .checkpoint import load_model_weights, save_checkpoint
from .oim import OIMLoss, UNLABELED_PID
from .seqnet import SeqNetFPN, SeqRoIHeads, TrainRecord, build_seqnet

__all__ = [
    "OIMLoss",
    "SeqNetFPN",
    "SeqRoIHeads",
    "TrainRecord",
    "UNLABELED_PID",
    "backbone_node_for_role",
    "build_model",
    "load_model_weights",
    "save_checkpoint",
]

_ROLE_PATHS = {
    "baseline": ("BASELINE",),
    "teacher": ("DISTILLER", "TEACHER"),
    "student": ("DISTILLER", "STUDENT"),
}


def backbone_node_for_role(cfg, role: str = "baseline"):
    """The config node holding the backbone settings of ``role`` and its dotted name."""
    if role not in _ROLE_PATHS:
        raise ValueError(f"unknown model role '{role}'; expected one of {sorted(_ROLE_PATHS)}")
    node = cfg
    for key in _ROLE_PATHS[role]:
        node = node[key]
    return node, ".".join(_ROLE_PATHS[role])


def build_model(cfg, role: str = "baseline") -> SeqNetFPN:
    """Build the SeqNet-FPN model for ``role`` ("baseline", "teacher" or "student")."""
    node, prefix = backbone_node_for_role(cfg, role)
    return build_seqnet(cfg, node, role_prefix=prefix)
