"""Distillation: the terms of DDPS and of the methods it is compared with, and the distiller.

Each term is one module, registered under a name (``registry.register_term``), with its own
learnable parts; the ``Distiller`` runs the configured ones (``DISTILLER.TERMS``, or the
original's ``DISTILLER.TYPE``). Importing a term's module is what registers it: the imports
below are the registry's entries.

- ``dfd``: DFD, disaggregation feature distillation (``DFDLoss`` of one FPN level, with
  ``dfd_masks`` and ``dfd_attention``);
- ``ld``: LD, decoupled KD on the first-stage logits (``ld_loss``, ``tckd_nckd``);
- ``cd``: CD, correlation distillation of person embeddings (``cd_loss``, ``select_cd_persons``,
  ``oim_scores``);
- ``pkd``: PKD, Pearson-correlation distillation of the FPN maps (``pkd_loss``);
- ``reviewkd``: ReviewKD, attention-based fusion of the student's FPN maps and the HCL loss
  (``ABF``, ``hcl_loss``);
- ``cwd``: CWD, channel-wise distillation of the FPN maps (``cwd_loss``);
- ``mgd``: MGD, masked generative distillation of the FPN maps (``mgd_loss``, ``random_spatial_mask``).

Adding a method: docs/ARCHITECTURE.md, "Adding a distillation method".
"""

from . import registry
from .base import ALL_FPN_LEVELS, FPN_LEVELS, TEACHER_OUTPUTS, DistillTerm, TeacherOutputs, teacher_outputs
from .cd import UNLABELED_PID, CDTerm, cd_loss, oim_scores, select_cd_persons
from .cwd import CWDTerm, cwd_loss
from .dfd import DFDLoss, DFDTerm, dfd_attention, dfd_masks
from .distiller import Distiller
from .ld import LDTerm, ld_loss, tckd_nckd
from .mgd import MGDTerm, mgd_loss, random_spatial_mask
from .pkd import PKDTerm, pkd_loss
from .reviewkd import ABF, ReviewKDTerm, hcl_loss
from .registry import LEGACY_TYPES, TERMS, build_terms, known_terms, register_term, term_names

__all__ = [
    "ABF",
    "ALL_FPN_LEVELS",
    "CDTerm",
    "CWDTerm",
    "DFDLoss",
    "DFDTerm",
    "Distiller",
    "DistillTerm",
    "FPN_LEVELS",
    "LDTerm",
    "LEGACY_TYPES",
    "MGDTerm",
    "PKDTerm",
    "ReviewKDTerm",
    "TEACHER_OUTPUTS",
    "TERMS",
    "TeacherOutputs",
    "UNLABELED_PID",
    "build_terms",
    "cd_loss",
    "cwd_loss",
    "dfd_attention",
    "dfd_masks",
    "hcl_loss",
    "known_terms",
    "ld_loss",
    "mgd_loss",
    "oim_scores",
    "pkd_loss",
    "random_spatial_mask",
    "register_term",
    "registry",
    "select_cd_persons",
    "tckd_nckd",
    "teacher_outputs",
    "term_names",
]
