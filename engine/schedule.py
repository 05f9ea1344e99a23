"""Optimizer and learning-rate schedule of SPEC 5.

One LambdaLR stepped every iteration does both phases, so that its whole state is a single
counter that a checkpoint restores exactly:
- epoch 0: linear warm-up from WARMUP_FACTOR x BASE_LR to BASE_LR over the epoch's iterations;
- later epochs: BASE_LR x GAMMA^(number of LR_DECAY_MILESTONES <= epoch) (MultiStepLR on epochs).
"""
import bisect

import torch


class WarmupMultiStep:
    """LR factor of iteration `it` (a picklable callable, as LambdaLR's state needs)."""

    def __init__(self, iters_per_epoch, warmup_factor, milestones, gamma):
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        self.warmup_factor = float(warmup_factor)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, it):
        epoch = it // self.iters_per_epoch
        if epoch == 0:
            # reaches 1 on the epoch's last iteration, as SeqNet's warm-up did
            alpha = min(it / max(self.iters_per_epoch - 1, 1), 1.0)
            return self.warmup_factor * (1 - alpha) + alpha
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)


def build_optimizer(cfg, params):
    return torch.optim.SGD(
        [p for p in params if p.requires_grad],
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.SGD_MOMENTUM,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )


def build_lr_scheduler(cfg, optimizer, iters_per_epoch):
    factor = WarmupMultiStep(
        iters_per_epoch, cfg.SOLVER.WARMUP_FACTOR, cfg.SOLVER.LR_DECAY_MILESTONES, cfg.SOLVER.GAMMA
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def align_scheduler(scheduler, epoch, iters_per_epoch):
    """Continue a restored schedule at the start of `epoch` with the current steps per epoch.

    The schedule counts steps, and a checkpoint stores the step count and the steps per epoch
    of the run that wrote it. Resumed with another number of processes (or another
    MAX_ITERS_PER_EPOCH) an epoch has another number of steps: the warm-up and the
    LR_DECAY_MILESTONES must still fall on epoch boundaries. Checkpoints are written at the end
    of an epoch, so with an unchanged number of steps per epoch this changes nothing.
    """
    iters = max(int(iters_per_epoch), 1)
    for factor in scheduler.lr_lambdas:
        if isinstance(factor, WarmupMultiStep):
            factor.iters_per_epoch = iters
    scheduler.last_epoch = int(epoch) * iters
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
