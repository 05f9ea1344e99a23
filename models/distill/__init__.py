"""DDPS distillation terms (SPEC 6, 10).

- `DFDLoss` (dfd.py): disaggregation feature distillation of one FPN level, with the helpers
  `dfd_masks` (person/background masks) and `dfd_attention` (spatial/channel attention);
- `ld_loss` (ld.py): logit distillation, decoupled KD on the first-stage logits
  (`tckd_nckd` gives the two unweighted parts);
- `cd_loss` (cd.py): correlation distillation of person embeddings, with the person selection
  `select_cd_persons` and its scores `oim_scores`.

The distiller that wires these terms to the teacher and student models lives elsewhere.
"""

from .cd import UNLABELED_PID, cd_loss, oim_scores, select_cd_persons
from .dfd import DFDLoss, dfd_attention, dfd_masks
from .ld import ld_loss, tckd_nckd

__all__ = [
    "DFDLoss",
    "UNLABELED_PID",
    "cd_loss",
    "dfd_attention",
    "dfd_masks",
    "ld_loss",
    "oim_scores",
    "select_cd_persons",
    "tckd_nckd",
]
