"""``--resume``: continue a training run from its checkpoint, with the settings of the command.

What the checkpoint restores: the weights (and every distillation term's parts), the optimizer's
momentum buffers, the position in the schedule (the step count), the GradScaler and the random
streams. What the config decides, from the resume point on: the learning-rate schedule
(SOLVER.BASE_LR, WARMUP_FACTOR, LR_DECAY_MILESTONES, GAMMA), the optimizer's SGD_MOMENTUM and
WEIGHT_DECAY, and SOLVER.MAX_EPOCHS. torch's ``load_state_dict`` of the optimizer and scheduler
would silently bring back the values of the run that wrote the checkpoint; they are set from the
config again after loading, so that the run does what its config.yaml records. Each value that
differs from the checkpoint's run is named in the log. Unchanged settings resume bit for bit.

A checkpoint that cannot be resumed into this config (weights only, the other kind of run, other
parameters) stops the run before anything is written, naming the file and what was expected.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import yaml

from configs import ConfigError
from engine.schedule import WarmupMultiStep, align_scheduler
from engine.trainer import restore_training_state
from models.checkpoint import CheckpointFileError, CheckpointMismatchError, extract_model_state, load_checkpoint_file
from models.checkpoint import load_model_weights

__all__ = ["SCHEDULE_KEYS", "resume_training"]

# config keys that a checkpoint's optimizer / scheduler state would otherwise override
SCHEDULE_KEYS = ("SOLVER.BASE_LR", "SOLVER.WARMUP_FACTOR", "SOLVER.LR_DECAY_MILESTONES", "SOLVER.GAMMA",
                 "SOLVER.SGD_MOMENTUM", "SOLVER.WEIGHT_DECAY", "SOLVER.MAX_EPOCHS")


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _saved_settings(ckpt) -> Dict[str, object]:
    """The schedule settings of the run that wrote ``ckpt``: from the config it records (this
    project's checkpoints), else what its optimizer and scheduler states hold (the original's)."""
    if isinstance(ckpt.get("config"), str):
        saved = yaml.safe_load(ckpt["config"]) or {}
        out = {}
        for key in SCHEDULE_KEYS:
            node = saved
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                out[key] = node
        return out
    out = {}
    groups = ckpt["optimizer"].get("param_groups", []) if isinstance(ckpt.get("optimizer"), dict) else []
    if groups:
        out["SOLVER.SGD_MOMENTUM"] = groups[0].get("momentum")
        out["SOLVER.WEIGHT_DECAY"] = groups[0].get("weight_decay")
        out["SOLVER.BASE_LR"] = groups[0].get("initial_lr")
    factors = ckpt["lr_scheduler"].get("lr_lambdas") if isinstance(ckpt.get("lr_scheduler"), dict) else None
    if factors and isinstance(factors[0], dict):
        for key, attr in (("SOLVER.WARMUP_FACTOR", "warmup_factor"), ("SOLVER.LR_DECAY_MILESTONES", "milestones"),
                          ("SOLVER.GAMMA", "gamma")):
            if attr in factors[0]:
                out[key] = factors[0][attr]
    return {k: v for k, v in out.items() if v is not None}


def changed_settings(cfg, ckpt) -> List[Tuple[str, object, object]]:
    """(key, checkpoint's value, config's value) for each schedule setting that differs."""
    saved = _saved_settings(ckpt)
    out = []
    for key, old in saved.items():
        new = _get(cfg, key)
        same = (sorted(map(int, old)) == sorted(map(int, new))) if key.endswith("MILESTONES") else old == new
        if not same:
            out.append((key, old, new))
    return out


def apply_schedule_settings(cfg, optimizer, scheduler) -> None:
    """Set the optimizer's hyper-parameters and the schedule from ``cfg`` (after a state load)."""
    solver = cfg.SOLVER
    for group in optimizer.param_groups:
        group["initial_lr"] = float(solver.BASE_LR)
        group["momentum"] = float(solver.SGD_MOMENTUM)
        group["weight_decay"] = float(solver.WEIGHT_DECAY)
    scheduler.base_lrs = [float(solver.BASE_LR)] * len(optimizer.param_groups)
    for factor in scheduler.lr_lambdas:
        if isinstance(factor, WarmupMultiStep):
            fresh = WarmupMultiStep(factor.iters_per_epoch, solver.WARMUP_FACTOR, solver.LR_DECAY_MILESTONES,
                                    solver.GAMMA)
            factor.__dict__.update(fresh.__dict__)


def _check_layout(path, ckpt, module, cfg_file) -> None:
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("model", "optimizer", "lr_scheduler", "epoch")):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointFileError(
            f"{path} cannot be resumed: a training checkpoint holds 'model', 'optimizer', 'lr_scheduler' and "
            f"'epoch' (found {found}); a file of weights only can be evaluated (--eval) but not continued")
    _, layout = extract_model_state(ckpt)
    distillation = hasattr(module, "load_checkpoint_state")
    if distillation != (layout == "distillation"):
        kinds = {True: "a distillation run (student + its distillation parts)", False: "a single model"}
        raise CheckpointMismatchError(
            f"{path} is the checkpoint of {kinds[layout == 'distillation']}, but the config {cfg_file or ''} "
            f"trains {kinds[distillation]}: resume with the config the checkpoint was trained with "
            f"(the config.yaml beside it)")


def resume_training(path, module, optimizer, scheduler, scaler, cfg, iters_per_epoch, restore_rng=True,
                    cfg_file=None, log=print) -> int:
    """Load ``path`` into the (unwrapped) module, optimizer, scheduler and scaler, apply the
    config's schedule settings from the resume point, and return the epoch to continue at."""
    ckpt = load_checkpoint_file(path)
    _check_layout(path, ckpt, module, cfg_file)
    try:
        if hasattr(module, "load_checkpoint_state"):
            module.load_checkpoint_state(ckpt["model"])
        else:
            load_model_weights(module, ckpt)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path} does not fit the model of this config: {err}",
                                      err.missing, err.unexpected, err.mismatched) from None
    try:
        start_epoch = restore_training_state(ckpt, optimizer, scheduler, scaler, restore_rng=restore_rng)
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(f"the optimizer or scheduler state in {path} does not fit this config's "
                                      f"parameters ({err})") from None
    if start_epoch >= int(cfg.SOLVER.MAX_EPOCHS):
        raise ConfigError(f"{path} ends epoch {start_epoch - 1}, and SOLVER.MAX_EPOCHS is {cfg.SOLVER.MAX_EPOCHS}: "
                          f"nothing is left to train; set SOLVER.MAX_EPOCHS above {start_epoch - 1}")
    changes = changed_settings(cfg, ckpt)
    apply_schedule_settings(cfg, optimizer, scheduler)
    align_scheduler(scheduler, start_epoch, iters_per_epoch)  # LR of the resume step under the new schedule
    for key, old, new in changes:
        log(f"resume: {key} is {new} (the checkpoint's run had {old}); applied from epoch {start_epoch} on")
    log(f"resumed from {path}: continuing at epoch {start_epoch}")
    return start_epoch
