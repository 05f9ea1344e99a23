"""Builds what the commands need from a config: the trained module, the evaluation model.

The distinction between single-model and distillation runs lives here and only here:
- single model (BASELINE.PROJECT): the trained module is the model itself;
- distillation (DISTILLER.PROJECT): the trained module is a distiller holding the student, the
  frozen teacher (loaded from DISTILLER.TEACHER.CKPT) and the configured distillation terms with
  their learnable parts; evaluation and the demo use the student alone.
Every checkpoint loaded for a run is loaded here: the evaluated model, the teacher.
"""
import os

from configs import ConfigError, is_distillation, model_cfg_for_role
from models import build_model
from models.checkpoint import CheckpointMismatchError, CheckpointNotFoundError, load_checkpoint_file, load_model_weights
from models.distill import Distiller, build_terms, term_names

OIM_TABLES = "roi_heads.reid_loss."


def eval_role(cfg):
    return "student" if is_distillation(cfg) else "baseline"


def without_imagenet_weights(cfg, role):
    """A copy of cfg whose `role` backbone does not ask for ImageNet weights.

    A checkpoint will overwrite them anyway, and fetching them would fail offline for nothing.
    """
    cfg = cfg.clone()
    cfg.defrost()
    model_cfg_for_role(cfg, role).BACKBONE_PRETRAIN = False
    cfg.freeze()
    return cfg


def load_for_evaluation(model, ckpt, path, log=print):
    """Load weights strictly; only the OIM tables may be dropped, and only when they do not fit.

    Inference never reads the OIM tables. An original PRW checkpoint has 482-row tables while
    this project sizes them from the remapped training identities (SPEC 4.1), so such tables are
    dropped by name, with a notice. Any other missing or unfitting weight is an error.
    """
    try:
        load_model_weights(model, ckpt)
    except CheckpointMismatchError as err:
        if not err.only_under(OIM_TABLES):
            raise CheckpointMismatchError(f"{path}: {err}", err.missing, err.unexpected, err.mismatched) from None
        dropped = load_model_weights(model, ckpt, drop_prefixes=(OIM_TABLES,))
        log(f"{path}: the OIM tables do not fit this config ({err}); dropped {len(dropped)} entries "
            f"({', '.join(sorted(dropped))}): evaluation does not use them.")


def build_eval_model(cfg, ckpt_path, device, log=print):
    """The model that evaluation and the demo run: the single model or the distilled student."""
    role = eval_role(cfg)
    ckpt = load_checkpoint_file(ckpt_path)  # a file that is not a checkpoint stops before the model is built
    model = build_model(without_imagenet_weights(cfg, role), role=role)
    try:
        load_for_evaluation(model, ckpt, ckpt_path, log=log)
    except CheckpointMismatchError as err:
        backbone = model_cfg_for_role(cfg, role).BACKBONE_NAME
        raise CheckpointMismatchError(
            f"the checkpoint does not fit the {backbone} {'student' if role == 'student' else 'model'} of this "
            f"config: {err}", err.missing, err.unexpected, err.mismatched) from None
    model.to(device).eval()
    return model, {"role": role, "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None}


def teacher_checkpoint_path(cfg):
    """DISTILLER.TEACHER.CKPT, checked to name an existing file (cheap: done before any model is
    built)."""
    path = cfg.DISTILLER.TEACHER.CKPT
    if not path:
        raise ConfigError("DISTILLER.TEACHER.CKPT is empty: distillation needs the teacher's checkpoint "
                         "(set it in the config or on the command line: DISTILLER.TEACHER.CKPT path/epoch_19.pth)")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"teacher checkpoint not found: {path} (DISTILLER.TEACHER.CKPT)")
    return path


def build_teacher(cfg, log=print):
    """Build DISTILLER.TEACHER and load DISTILLER.TEACHER.CKPT strictly and completely (its OIM
    tables included: CD scores people with them)."""
    path = teacher_checkpoint_path(cfg)
    teacher = build_model(without_imagenet_weights(cfg, "teacher"), role="teacher")
    ckpt = load_checkpoint_file(path, what="teacher checkpoint (DISTILLER.TEACHER.CKPT)")
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


def check_training_inputs(cfg):
    """The cheap checks of what a training run will read, before the data or a model is built:
    a distillation run's teacher checkpoint must exist."""
    if is_distillation(cfg) and term_names(cfg):
        teacher_checkpoint_path(cfg)


def build_distiller(cfg, log=print):
    """The distiller of a distillation config: student, teacher and the configured terms."""
    names = term_names(cfg)  # an unknown method or a missing teacher stops here, before any model is built
    if names:
        teacher_checkpoint_path(cfg)
    student = build_model(cfg, role="student")
    if not names:
        log("distillation config without distillation terms: the student trains alone")
        return Distiller(student, None, {})
    teacher = build_teacher(cfg, log)
    terms = build_terms(cfg, names, student.backbone.out_channels, teacher.backbone.out_channels)
    log(f"distillation terms: {', '.join(names)}")
    return Distiller(student, teacher, terms)


def build_train_module(cfg, device, log=print):
    """(module to train, model to evaluate): the model itself, or the distiller and its student."""
    if is_distillation(cfg):
        distiller = build_distiller(cfg, log=log).to(device)
        return distiller, distiller.student
    model = build_model(cfg, role="baseline").to(device)
    return model, model
