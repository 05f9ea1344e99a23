"""Trainer hooks, as detectron2's HookBase: what happens around the optimisation steps.

The training loop (engine.trainer.Trainer) only runs steps and calls its hooks; checkpoints,
evaluation, logs and curves are hooks. A hook overrides any of

    before_train(trainer)                 after_train(trainer)
    before_epoch(trainer, epoch)          after_epoch(trainer, epoch)
    after_step(trainer, epoch, i, values, lr)

and is passed to ``Trainer(..., hooks=[...])`` (or ``trainer.register_hooks``); hooks run in
order, on every process (a hook that writes files checks ``trainer.is_main``). What one hook
produces for others goes through ``trainer.storage`` (e.g. the checkpoint path of the epoch,
the last metrics) and ``trainer.put_scalars`` (curves: every scalar hook receives them).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

__all__ = ["HookBase", "CheckpointHook", "EvalHook", "TensorBoardHook", "TimingHook", "default_hooks"]


class HookBase:
    def before_train(self, trainer):
        pass

    def after_train(self, trainer):
        pass

    def before_epoch(self, trainer, epoch):
        pass

    def after_epoch(self, trainer, epoch):
        pass

    def after_step(self, trainer, epoch, i, values, lr):
        pass

    def write_scalars(self, scalars: Dict[str, float], step: int):
        """Receives what any hook publishes with ``trainer.put_scalars`` (override to record)."""


class CheckpointHook(HookBase):
    """Every ``period`` epochs and after the last: OUTPUT_DIR/epoch_{e}.pth (process 0 writes it
    atomically; every process learns its path in ``trainer.storage["checkpoint"]``)."""

    def __init__(self, output_dir: str, period: int, save: Callable):
        self.output_dir, self.period, self.save = output_dir, int(period), save

    def after_epoch(self, trainer, epoch):
        trainer.storage["checkpoint"] = None
        if (epoch + 1) % self.period == 0 or epoch == trainer.max_epochs - 1:
            path = os.path.join(self.output_dir, f"epoch_{epoch}.pth")
            if trainer.is_main:
                self.save(path, trainer.module, trainer.optimizer, trainer.scheduler, epoch, trainer.scaler)
                trainer.log(f"saved {path}")
            trainer.storage["checkpoint"] = path


class EvalHook(HookBase):
    """After every ``period`` epochs from ``start`` on, and after the last: ``evaluate(epoch,
    checkpoint)`` on every process (each runs its share of the images). The metrics it returns
    on process 0 go to ``trainer.storage["metrics"]`` and, numbers only, to the curves under
    ``eval/``."""

    def __init__(self, evaluate: Callable, start: int, period: int):
        self.evaluate, self.start, self.period = evaluate, int(start), int(period)

    def after_epoch(self, trainer, epoch):
        last = epoch == trainer.max_epochs - 1
        if not (last or (epoch >= self.start and (epoch + 1) % self.period == 0)):
            return
        metrics = self.evaluate(epoch, trainer.storage.get("checkpoint"))
        trainer.storage["metrics"] = metrics
        if metrics:
            trainer.put_scalars({f"eval/{k}": v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, epoch)


class TensorBoardHook(HookBase):
    """Process 0: the step losses and learning rate (``train/``) and every published scalar."""

    def __init__(self, writer):
        self.writer = writer

    def after_step(self, trainer, epoch, i, values, lr):
        step = epoch * trainer.iters_per_epoch() + i
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.add_scalar("train/lr", lr, step)

    def write_scalars(self, scalars, step):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def after_train(self, trainer):
        self.writer.flush()


class TimingHook(HookBase):
    """Seconds per optimizer step and the epoch's mean loss: logged, and published as
    ``train/seconds_per_iter``."""

    def before_epoch(self, trainer, epoch):
        self.start = time.time()

    def after_epoch(self, trainer, epoch):
        elapsed = time.time() - self.start
        count = trainer.storage.get("steps", 0)
        mean = trainer.storage.get("mean_losses", {}).get("loss", float("nan"))
        per_step = elapsed / max(count, 1)
        if trainer.is_main:
            trainer.log(f"epoch {epoch}: {count} iterations in {elapsed:.1f} s ({per_step:.2f} s/it), "
                        f"mean loss {mean:.4f}")
        trainer.put_scalars({"train/seconds_per_iter": per_step}, epoch)


def default_hooks(cfg, save: Callable, evaluate: Optional[Callable] = None, tb_writer=None):
    """The hooks of a training run: timing, checkpoints, evaluation (when given) and curves."""
    hooks = [TimingHook(), CheckpointHook(cfg.OUTPUT_DIR, cfg.CKPT_PERIOD, save)]
    if evaluate is not None:
        hooks.append(EvalHook(evaluate, cfg.EVAL_START_EPOCH, cfg.EVAL_PERIOD))
    if tb_writer is not None:
        hooks.append(TensorBoardHook(tb_writer))
    return hooks
