"""The DDPS distiller: wires a frozen teacher, a student and the three terms (SPEC 6).

One training step (SPEC 6):
1. the student runs its normal training forward and returns its losses and a `TrainRecord`
   (the explicit interface: transformed batch, FPN maps, sampled proposals with labels and
   logits, sampled second-stage boxes with pid labels and embeddings);
2. without gradients, the teacher runs on the *same transformed image tensor*: FPN maps, its
   first-stage logits on the student's proposals, its embeddings on the student's boxes and its
   OIM logits for the foreground ones;
3. DFD on FPN levels '0'-'3' with the transformed ground-truth boxes, LD on the proposal logits,
   CD on the selected person embeddings; each term is a named loss next to the student's.

The teacher is loaded strictly and completely (OIM tables included: CD's person scores need
them) and stays in eval mode whatever `train()` is called with. Only the student and DFD's
context blocks (and align convs) are trainable. `checkpoint_state()` gives the original's
`{"student": ..., "fgd": {...}}` layout. FGD.WARMUP and GRAPHRELA.WARMUP are kept for config
compatibility; SPEC 6 states the terms without a ramp and none is applied.
"""
import os

import torch
from torch import nn

from models import build_model
from models.checkpoint import CheckpointMismatchError, load_checkpoint_file, load_model_weights

from .cd import cd_loss, select_cd_persons
from .dfd import DFDLoss
from .ld import ld_loss

FPN_LEVELS = ("0", "1", "2", "3")
SUPPORTED_TYPES = ("FGD_DKD_Relation",)


def dfd_name(level):
    return f"loss_fgd_fpn_{level}"


class DDPSDistiller(nn.Module):
    def __init__(self, student, teacher, cfg):
        super().__init__()
        self.student = student
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.use_dfd = bool(cfg.FGD.ENABLED)
        self.use_ld = bool(cfg.DKD.ENABLED)
        self.use_cd = bool(cfg.GRAPHRELA.ENABLED)
        f = cfg.FGD
        self.dfd_weight = float(f.WEIGHT)
        self.fgd = nn.ModuleDict()
        if self.use_dfd:
            for i, level in enumerate(FPN_LEVELS):
                self.fgd[dfd_name(level)] = DFDLoss(
                    int(f.TEACHER_CHANNELS[i]), temp=f.TEMP, alpha=f.ALPHA_FGD, beta=f.BATE_FGD,
                    gamma=f.GAMMA_FGD, lam=f.LAMBDA_FGD, student_channels=int(f.STUDENT_CHANNELS[i]),
                )
        d = cfg.DKD
        self.ld_args = dict(alpha=float(d.ALPHA), beta=float(d.BETA), temperature=float(d.T))
        self.ld_weight = float(d.WEIGHT)
        self.cd_weight = float(cfg.GRAPHRELA.WEIGHT)
        self.cd_nms = float(cfg.GRAPHRELA.NMSTHRES)
        self.lut_size = int(cfg.MODEL.LOSS.LUT_SIZE)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never move
        return self

    def forward(self, images, targets):
        losses, rec = self.student.forward_train(images, targets)
        image_sizes = rec.images.image_sizes
        with torch.no_grad():
            t_feats = self.teacher.extract_features(rec.images.tensors)
            if self.use_ld:
                t_logits = self.teacher.roi_heads.proposal_logits(t_feats, rec.proposals, image_sizes)
            if self.use_cd:
                t_emb = self.teacher.roi_heads.box_embeddings(t_feats, rec.reid_boxes, image_sizes)
        if self.use_dfd:
            gt_boxes = [t["boxes"] for t in rec.targets]
            padded_size = tuple(rec.images.tensors.shape[-2:])
            dfd = sum(
                self.fgd[dfd_name(level)](rec.features[level], t_feats[level], gt_boxes, padded_size)
                for level in FPN_LEVELS
            )
            losses["loss_dfd"] = self.dfd_weight * dfd
        if self.use_ld:
            labels = torch.cat(rec.proposal_labels)
            losses["loss_ld"] = self.ld_weight * ld_loss(rec.proposal_logits, t_logits, labels, **self.ld_args)
        if self.use_cd:
            losses["loss_cd"] = self.cd_weight * self._cd(rec, t_emb)
        return losses

    def _cd(self, rec, t_emb):
        labels = torch.cat(rec.reid_labels)
        boxes = torch.cat(rec.reid_boxes)
        image_ids = torch.repeat_interleave(
            torch.arange(len(rec.reid_boxes), device=labels.device),
            torch.tensor([len(b) for b in rec.reid_boxes], device=labels.device),
        )
        fg = torch.nonzero(labels > 0).squeeze(1)
        with torch.no_grad():
            probs = torch.softmax(self.teacher.roi_heads.reid_loss.logits(t_emb[fg]).float(), dim=1)
            keep = select_cd_persons(boxes[fg], labels[fg], probs, self.lut_size, nms_thresh=self.cd_nms,
                                     image_ids=image_ids[fg])
        chosen = fg[keep]
        return cd_loss(rec.embeddings[chosen], t_emb[chosen])

    # checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self):
        """The original's distillation layout: the student and DFD's learnable parts."""
        return {"student": self.student.state_dict(),
                "fgd": {name: module.state_dict() for name, module in self.fgd.items()}}

    def load_checkpoint_state(self, state):
        if not isinstance(state, dict) or "student" not in state:
            raise KeyError("a distillation checkpoint's 'model' entry needs a 'student' entry")
        load_model_weights(self.student, state["student"])
        fgd = state.get("fgd", {})
        if set(fgd) != set(self.fgd.keys()):
            raise CheckpointMismatchError(
                f"DFD parts in the checkpoint {sorted(fgd)} differ from this config's {sorted(self.fgd.keys())}",
                missing=sorted(set(self.fgd.keys()) - set(fgd)), unexpected=sorted(set(fgd) - set(self.fgd.keys())),
                mismatched=[],
            )
        for name, module in self.fgd.items():
            module.load_state_dict(fgd[name], strict=True)


def build_teacher(cfg, log=print):
    """Build DISTILLER.TEACHER and load DISTILLER.TEACHER.CKPT strictly and completely."""
    path = cfg.DISTILLER.TEACHER.CKPT
    if not path:
        raise ValueError("DISTILLER.TEACHER.CKPT is empty: distillation needs the teacher's checkpoint "
                         "(set it in the config or on the command line: DISTILLER.TEACHER.CKPT path/epoch_19.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path} (DISTILLER.TEACHER.CKPT)")
    from engine.build import without_imagenet_weights  # weights come from the checkpoint

    teacher = build_model(without_imagenet_weights(cfg, "teacher"), role="teacher")
    ckpt = load_checkpoint_file(path)
    try:
        load_model_weights(teacher, ckpt)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(
            f"the teacher checkpoint {path} does not fit DISTILLER.TEACHER "
            f"({cfg.DISTILLER.TEACHER.BACKBONE_NAME}, LUT_SIZE {cfg.MODEL.LOSS.LUT_SIZE}): {err}",
            err.missing, err.unexpected, err.mismatched,
        ) from None
    log(f"teacher {cfg.DISTILLER.TEACHER.BACKBONE_NAME} loaded from {path}")
    return teacher


def build_distiller(cfg, log=print):
    if cfg.DISTILLER.TYPE not in SUPPORTED_TYPES:
        raise NotImplementedError(
            f"DISTILLER.TYPE {cfg.DISTILLER.TYPE!r} is not implemented; supported: {SUPPORTED_TYPES} "
            "(DDPS = FGD_DKD_Relation; switch terms with FGD/DKD/GRAPHRELA.ENABLED)"
        )
    teacher = build_teacher(cfg, log)
    student = build_model(cfg, role="student")
    return DDPSDistiller(student, teacher, cfg)
