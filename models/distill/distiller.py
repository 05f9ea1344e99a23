"""The distiller: a frozen teacher, a student and the configured distillation terms (SPEC 6).

One training step:
1. the student runs its normal training forward and returns its losses and a `TrainRecord`
   (transformed batch, FPN maps, sampled proposals with labels and logits, sampled second-stage
   boxes with pid labels and embeddings);
2. without gradients, the teacher computes, once, the outputs the terms declared they need
   (`base.teacher_outputs`: its FPN maps of the student's image tensor, its logits on the
   student's proposals, its embeddings and OIM logits on the student's boxes);
3. each term turns the two into named losses that join the student's.

The distiller knows no method: DDPS is the terms dfd, ld and cd, PKD is pkd, and so on
(`registry`). The teacher stays in eval mode whatever `train()` is called with and has no
trainable parameter; the student and every term's parts are this module's parameters, so the
optimizer built from them trains them all. Checkpoints (`checkpoint_state`): {"student":
student state dict, <term's entry>: <term's state>, ...} for every term that has state; DFD's
entry is "fgd" (the original's {"student", "fgd"} layout), the others are named after the term
("reviewkd", "mgd", ...).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

from torch import nn

from models.checkpoint import CheckpointMismatchError, load_model_weights

from .base import DistillTerm, teacher_outputs

__all__ = ["Distiller"]


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teacher: Optional[nn.Module],
                 terms: "Mapping[str, DistillTerm]"):
        super().__init__()
        if terms and teacher is None:
            raise ValueError("distillation terms need a teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.terms = nn.ModuleDict(OrderedDict(terms))
        self.teacher_needs = frozenset().union(*(t.needs for t in self.terms.values()))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics of the teacher never move
        return self

    def forward(self, images, targets):
        losses, record = self.student.forward_train(images, targets)
        if not len(self.terms):
            return losses
        teacher = teacher_outputs(self.teacher, record, self.teacher_needs)
        for name, term in self.terms.items():
            for key, value in term(record, teacher).items():
                if key in losses:
                    raise RuntimeError(f"distillation term {name!r} returns the loss {key!r}, "
                                       f"which another loss already has")
                losses[key] = value
        return losses

    # checkpoints ---------------------------------------------------------------------------
    def _state_terms(self):
        return {term.state_key: term for term in self.terms.values() if len(term.state_dict())}

    def checkpoint_state(self) -> dict:
        state = {"student": self.student.state_dict()}
        for key, term in self._state_terms().items():
            state[key] = term.checkpoint_state()
        return state

    def load_checkpoint_state(self, state) -> None:
        if not isinstance(state, Mapping) or "student" not in state:
            raise KeyError("a distillation checkpoint's 'model' entry needs a 'student' entry")
        expected = set(self._state_terms())
        found = set(state) - {"student"}
        if found != expected:
            raise CheckpointMismatchError(
                f"the checkpoint holds the parts of {sorted(found) or 'no term'} but this config's "
                f"terms ({', '.join(self.terms) or 'none'}) have {sorted(expected) or 'none'}",
                missing=sorted(expected - found), unexpected=sorted(found - expected), mismatched=[])
        load_model_weights(self.student, state["student"])
        for key, term in self._state_terms().items():
            term.load_checkpoint_state(state[key])
