"""What every distillation term is and what it may ask of the teacher (docs/ARCHITECTURE.md).

A term is one method's loss: a small ``nn.Module`` holding its own learnable parts (if any),
built from the config, that turns the student's ``TrainRecord`` of a training step and the
teacher's outputs on the same batch into named, already weighted losses. It declares which
teacher outputs it needs (``needs``); the distiller computes the union of those once per step,
without gradients, and hands every term the same ``TeacherOutputs``.

Teacher outputs (all on the student's transformed batch, SPEC 6 step 2):
- ``features``: the teacher's FPN maps ('0'..'3', 'pool') of the student's image tensor;
- ``proposal_logits``: first-stage class logits (sum n_i x 2) of the student's sampled proposals;
- ``box_embeddings``: embeddings (sum m_i x 256) of the student's sampled second-stage boxes;
- ``oim_logits``: the teacher's OIM logits (30 x emb x [LUT; CQ]^T) of those boxes that carry a
  person id (labels > 0), in their order.
Asking for an output that was not declared is an error, so a term cannot silently make the
teacher run heads that its declaration says it does not need.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Dict, FrozenSet, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ALL_FPN_LEVELS", "FPN_LEVELS", "TEACHER_OUTPUTS", "DistillTerm", "TeacherOutputs", "check_levels", "float32_losses",
           "teacher_outputs"]

TEACHER_OUTPUTS = ("features", "proposal_logits", "box_embeddings", "oim_logits")
# the four FPN outputs of fpn.layer_blocks.0-3 (strides 4-32) and the five with the pooled level
FPN_LEVELS = ("0", "1", "2", "3")
ALL_FPN_LEVELS = ("0", "1", "2", "3", "pool")

# what each output is computed from (besides the student's record)
_REQUIRES = {"features": (), "proposal_logits": ("features",), "box_embeddings": ("features",),
             "oim_logits": ("box_embeddings",)}


def check_levels(levels: Sequence[str], key: str) -> tuple:
    """The FPN levels a config key names, validated: non-empty, known names, no repeats."""
    levels = tuple(str(level) for level in levels)
    unknown = [level for level in levels if level not in ALL_FPN_LEVELS]
    if unknown or not levels or len(set(levels)) != len(levels):
        raise ValueError(f"{key} must name distinct FPN levels among {', '.join(ALL_FPN_LEVELS)}; "
                         f"got {list(levels)}" + (f" (unknown: {unknown})" if unknown else ""))
    return levels


class TeacherOutputs:
    """The teacher outputs of one step that the configured terms declared (read-only)."""

    def __init__(self, values: Dict[str, object]):
        self._values = dict(values)

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        if name in TEACHER_OUTPUTS:
            raise AttributeError(
                f"teacher output {name!r} was not computed: add it to the term's `needs` "
                f"(computed this step: {sorted(values)})")
        raise AttributeError(name)

    @property
    def computed(self) -> FrozenSet[str]:
        return frozenset(self._values)


def _closure(needs: Iterable[str]) -> FrozenSet[str]:
    out, todo = set(), list(needs)
    while todo:
        name = todo.pop()
        if name not in _REQUIRES:
            raise ValueError(f"unknown teacher output {name!r}; known: {', '.join(TEACHER_OUTPUTS)}")
        if name not in out:
            out.add(name)
            todo.extend(_REQUIRES[name])
    return frozenset(out)


@torch.no_grad()
def teacher_outputs(teacher, record, needs: Iterable[str]) -> TeacherOutputs:
    """Run the frozen ``teacher`` on the student's ``record`` for the declared ``needs`` (and
    what they are computed from), each exactly once."""
    wanted = _closure(needs)
    values: Dict[str, object] = {}
    if not wanted:
        return TeacherOutputs(values)
    sizes = record.images.image_sizes
    values["features"] = feats = teacher.extract_features(record.images.tensors)
    heads = teacher.roi_heads
    if "proposal_logits" in wanted:
        values["proposal_logits"] = heads.proposal_logits(feats, record.proposals, sizes)
    if "box_embeddings" in wanted:
        values["box_embeddings"] = emb = heads.box_embeddings(feats, record.reid_boxes, sizes)
        if "oim_logits" in wanted:
            labels = torch.cat(record.reid_labels)
            values["oim_logits"] = heads.reid_loss.logits(emb[labels > 0])
    return TeacherOutputs(values)


class DistillTerm(nn.Module):
    """Base class of a distillation term (see the module docstring).

    Subclasses set ``needs`` and implement ``from_config`` and ``forward``; ``name`` is set by
    ``registry.register_term``. ``checkpoint_key`` names the entry of a checkpoint's "model"
    dict that holds the term's state (default: its registry name); ``checkpoint_state`` /
    ``load_checkpoint_state`` default to the module's state dict (strict), and a term without
    any state saves nothing.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[FrozenSet[str]] = frozenset()
    checkpoint_key: ClassVar[Optional[str]] = None

    @classmethod
    def from_config(cls, cfg, student_channels: int, teacher_channels: int) -> "DistillTerm":
        """Build the term from the full config; ``*_channels``: widths of the two FPNs."""
        raise NotImplementedError

    def forward(self, student, teacher: TeacherOutputs) -> Dict[str, Tensor]:
        """Named, weighted losses from the student's TrainRecord and the teacher's outputs."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self.checkpoint_key or self.name

    def checkpoint_state(self) -> dict:
        return self.state_dict()

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state, strict=True)


def float32_losses(fn):
    """Decorator for a term's ``forward``: compute the losses with autocast off (under AMP the
    arithmetic of a loss would otherwise run in half precision), in float32."""

    @functools.wraps(fn)
    def wrapper(self, student, teacher):
        device = student.images.tensors.device.type
        with torch.autocast(device_type=device, enabled=False):
            return fn(self, student, teacher)

    return wrapper
