"""The training loop (SPEC 5): SGD with warm-up and steps, clipping, checkpoints, resume, logs.

The loop knows nothing of person search: it trains any `module` whose forward(images, targets)
returns a dict of (already weighted) losses; the baseline model and the distiller both are such
modules. What goes into a checkpoint's "model" entry is the module's `checkpoint_state()` when it
has one (the distiller's {"student", "fgd"} layout), else its state_dict (SPEC 4.4).
"""
import contextlib
import io
import math
import os
import sys
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from utils.dist import any_across_ranks, barrier, is_main_process
from utils.misc import atomic_write_bytes, autocast, get_rng_states, move_to_device, set_rng_states


def accumulation_steps(cfg):
    """Micro-batches (loader batches) per optimizer step: SOLVER.ACCUMULATION_STEPS."""
    return max(int(getattr(cfg.SOLVER, "ACCUMULATION_STEPS", 1)), 1)


def steps_per_epoch(cfg, loader):
    """Optimizer steps of one epoch: the loader's batches over SOLVER.ACCUMULATION_STEPS (a last
    incomplete group is left out, as an incomplete batch is), cut to SOLVER.MAX_ITERS_PER_EPOCH
    when it is set."""
    n = len(loader) // accumulation_steps(cfg)
    return n if cfg.SOLVER.MAX_ITERS_PER_EPOCH <= 0 else min(n, cfg.SOLVER.MAX_ITERS_PER_EPOCH)


def progress_interval():
    """Seconds between progress-bar refreshes: live in a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite: training stops before the weights are touched."""


def model_state(module):
    module = getattr(module, "module", module)  # unwrap DistributedDataParallel
    if hasattr(module, "checkpoint_state"):
        return module.checkpoint_state()
    return module.state_dict()


def save_training_checkpoint(path, module, optimizer, scheduler, epoch, scaler=None, extra=None):
    """Write everything a resume needs, atomically (a crash leaves the previous file intact)."""
    payload = {
        "model": model_state(module),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng_states": get_rng_states(),
    }
    if scaler is not None:
        payload["grad_scaler"] = scaler.state_dict()
    if extra:
        payload.update(extra)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def restore_training_state(ckpt, optimizer, scheduler, scaler=None, restore_rng=True):
    """Restore optimizer, scheduler, scaler and RNG states; return the next epoch to run.

    The RNG states saved are rank 0's: distributed runs restore them on rank 0 only
    (``restore_rng=False`` elsewhere) so that the ranks keep distinct random streams."""
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in ckpt]
    if missing:
        raise KeyError(f"cannot resume: the checkpoint has no {', '.join(missing)} entry")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if scaler is not None and "grad_scaler" in ckpt:
        scaler.load_state_dict(ckpt["grad_scaler"])
    if restore_rng and "rng_states" in ckpt:
        set_rng_states(ckpt["rng_states"])
    return int(ckpt["epoch"]) + 1


def check_finite(losses, epoch, iteration):
    """Raise NonFiniteLossError if a loss is NaN/inf. Distributed: on every rank as soon as one
    rank sees one (one scalar all-reduce), so that no rank is left waiting in a collective.

    Only the losses are checked, before backward: with fp16 the GradScaler skips steps whose
    gradients overflow and lowers its scale, which is not an error."""
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if any_across_ranks(bool(bad)):
        if not bad:
            raise NonFiniteLossError(f"non-finite loss on another process at epoch {epoch}, iteration "
                                     f"{iteration}. Training stopped; the last checkpoint written is intact.")
        terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, iteration {iteration}: {sorted(bad)} "
            f"(all terms: {terms}). Training stopped; the last checkpoint written is intact."
        )


class Trainer:
    """Runs epochs of `module` on `loader`; evaluation and checkpoints are decided by the config."""

    def __init__(self, cfg, module, loader, optimizer, scheduler, device, evaluate_fn=None,
                 tb_writer=None, is_main=None, scaler=None, log=print):
        self.cfg = cfg
        self.module = module
        self.loader = loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.evaluate_fn = evaluate_fn
        self.tb = tb_writer
        # logs, TensorBoard, checkpoints and evaluation: rank 0 only (None: ask torch.distributed)
        self.is_main = is_main_process() if is_main is None else bool(is_main)
        self.scaler = scaler
        self.log = log
        self.history = []  # mean losses per epoch, for callers and tests

    def iters_per_epoch(self):
        return steps_per_epoch(self.cfg, self.loader)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train_step(self, micro_batches, epoch, i):
        """One optimisation step over `micro_batches`, a list of (images, targets) loader batches
        (SOLVER.ACCUMULATION_STEPS of them): each one's loss, divided by their number, is
        back-propagated in turn, so the gradient is that of the mean of their losses; clipping,
        the optimizer and the LR schedule then act once. The OIM tables are updated in every
        micro-batch's forward, as in a step of that batch size. Distributed, the gradient is
        all-reduced once, in the last micro-batch's backward (DDP's no_sync before).

        Returns the loss values (floats, means over the micro-batches, with their sum as "loss")
        and the learning rate the step used."""
        k = len(micro_batches)
        sums = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        for j, (images, targets) in enumerate(micro_batches):
            images, targets = move_to_device(images, targets, self.device)
            last = j == k - 1
            no_sync = getattr(self.module, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(self.device, self.cfg.SOLVER.AMP):
                    losses = self.module(images, targets)
                losses = {name: v.float() for name, v in losses.items()}
                check_finite(losses, epoch, i)
                total = sum(losses.values())
                scaled = total / k
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            for name, v in losses.items():
                sums[name] += float(v.detach()) / k
            sums["loss"] += float(total.detach()) / k
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.SOLVER.CLIP_GRADIENTS > 0:
            torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.SOLVER.CLIP_GRADIENTS)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return dict(sums), lr

    def optimizer_steps(self):
        """The loader's batches grouped into the micro-batches of each optimizer step."""
        k = accumulation_steps(self.cfg)
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == k:
                yield group
                group = []

    def train_epoch(self, epoch):
        self.module.train()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n_iters = self.iters_per_epoch()
        sums, count = defaultdict(float), 0
        start = time.time()
        # a context manager closes the bar when a step raises (a non-finite loss), so its last state
        # is not printed later by the interpreter's shutdown
        with tqdm(total=n_iters, desc=f"epoch {epoch}", disable=not self.is_main, dynamic_ncols=True,
                  mininterval=progress_interval()) as bar:
            for i, micro_batches in enumerate(self.optimizer_steps()):
                if i >= n_iters:
                    break
                values, lr = self.train_step(micro_batches, epoch, i)
                for k, v in values.items():
                    sums[k] += v
                count += 1
                step = epoch * n_iters + i
                if self.is_main:
                    bar.update(1)
                    if i % max(self.cfg.DISP_PERIOD, 1) == 0 or i == n_iters - 1:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}",
                                        **{k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()
                                           if k != "loss"})
                    if self.tb is not None:
                        for k, v in values.items():
                            self.tb.add_scalar(f"train/{k}", v, step)
                        self.tb.add_scalar("train/lr", lr, step)
        elapsed = time.time() - start
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if self.is_main:
            self.log(f"epoch {epoch}: {count} iterations in {elapsed:.1f} s "
                     f"({elapsed / max(count, 1):.2f} s/it), mean loss {means.get('loss', math.nan):.4f}")
            if self.tb is not None:
                self.tb.add_scalar("train/seconds_per_iter", elapsed / max(count, 1), epoch)
        self.history.append(means)
        return means

    def fit(self, start_epoch=0):
        cfg = self.cfg
        last = cfg.SOLVER.MAX_EPOCHS - 1
        metrics = None
        for epoch in range(start_epoch, cfg.SOLVER.MAX_EPOCHS):
            self.train_epoch(epoch)
            ckpt_path = None
            if (epoch + 1) % cfg.CKPT_PERIOD == 0 or epoch == last:
                ckpt_path = os.path.join(cfg.OUTPUT_DIR, f"epoch_{epoch}.pth")
                if self.is_main:
                    save_training_checkpoint(ckpt_path, self.module, self.optimizer, self.scheduler, epoch,
                                             self.scaler)
                    self.log(f"saved {ckpt_path}")
            wants_eval = epoch == last or (epoch >= cfg.EVAL_START_EPOCH and (epoch + 1) % cfg.EVAL_PERIOD == 0)
            if self.evaluate_fn is not None and wants_eval:
                # every process evaluates its share of the images; process 0 gets the metrics
                metrics = self.evaluate_fn(epoch, ckpt_path)
                if self.is_main and self.tb is not None and metrics:
                    for k in ("det_recall", "det_ap", "mAP", "top1", "top5", "top10"):
                        self.tb.add_scalar(f"eval/{k}", metrics[k], epoch)
            barrier()  # distributed: the other ranks wait while rank 0 saves
        return metrics
