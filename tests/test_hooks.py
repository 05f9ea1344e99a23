"""Trainer hooks (engine/hooks.py): the loop calls them in order around every step and epoch;
checkpoints, evaluation, curves and timing are hooks with the config's schedule; a user's hook
needs no change to the loop."""

import os

import torch

from configs import load_config
from engine.hooks import CheckpointHook, EvalHook, HookBase, TimingHook
from engine.trainer import Trainer
from tests.test_accumulation import _Toy, _toy_batches


def _cfg(tmp_path, **opts):
    pairs = {"SOLVER.MAX_EPOCHS": 4, "CKPT_PERIOD": 2, "EVAL_PERIOD": 1, "EVAL_START_EPOCH": 2,
             "OUTPUT_DIR": str(tmp_path), "TF_BOARD": False, **opts}
    return load_config(None, [str(x) for kv in pairs.items() for x in kv])


def _trainer(cfg, hooks=None, evaluate_fn=None, is_main=True, tb_writer=None):
    module = _Toy()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(cfg, module, _toy_batches(3), optimizer, scheduler, torch.device("cpu"), hooks=hooks,
                   evaluate_fn=evaluate_fn, is_main=is_main, tb_writer=tb_writer, log=lambda *a: None)


class _Recorder(HookBase):
    def __init__(self):
        self.events, self.scalars = [], {}

    def before_train(self, trainer):
        self.events.append("before_train")

    def before_epoch(self, trainer, epoch):
        self.events.append(f"before_epoch {epoch}")

    def after_step(self, trainer, epoch, i, values, lr):
        self.events.append(f"step {epoch}.{i} loss={values['loss']:.3f} lr={lr}")

    def after_epoch(self, trainer, epoch):
        self.events.append(f"after_epoch {epoch}")

    def after_train(self, trainer):
        self.events.append("after_train")

    def write_scalars(self, scalars, step):
        self.scalars.update({(k, step): v for k, v in scalars.items()})


def test_a_user_hook_sees_every_step_and_epoch_in_order(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(_cfg(tmp_path, **{"SOLVER.MAX_EPOCHS": 2}), hooks=[recorder])
    assert trainer.fit() is None  # no evaluation hook, no metrics
    names = [e.split(" loss")[0] for e in recorder.events]
    assert names == ["before_train", "before_epoch 0", "step 0.0", "step 0.1", "step 0.2", "after_epoch 0",
                     "before_epoch 1", "step 1.0", "step 1.1", "step 1.2", "after_epoch 1", "after_train"]
    assert not os.listdir(tmp_path)  # without a checkpoint hook nothing is written


def test_default_hooks_follow_the_config_schedule(tmp_path):
    calls = []

    def evaluate(epoch, checkpoint):
        calls.append((epoch, checkpoint and os.path.basename(checkpoint)))
        return {"mAP": 0.1 * epoch, "top1": 0.5, "checkpoint": checkpoint, "cbgm": False}

    recorder = _Recorder()
    trainer = _trainer(_cfg(tmp_path), evaluate_fn=evaluate)
    trainer.register_hooks([recorder])
    metrics = trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pth", "epoch_3.pth"]  # CKPT_PERIOD 2 and the last
    assert calls == [(2, None), (3, "epoch_3.pth")]  # from EVAL_START_EPOCH on, and the last
    assert metrics["mAP"] == 0.1 * 3
    # evaluation numbers (not the strings or flags) become curves, with the step time
    assert recorder.scalars[("eval/mAP", 3)] == metrics["mAP"] and ("eval/cbgm", 3) not in recorder.scalars
    assert ("eval/checkpoint", 3) not in recorder.scalars and ("train/seconds_per_iter", 0) in recorder.scalars


def test_only_process_zero_writes_checkpoints_but_all_know_the_path(tmp_path):
    seen = []
    trainer = _trainer(_cfg(tmp_path, **{"SOLVER.MAX_EPOCHS": 1}), is_main=False,
                       hooks=[TimingHook(), CheckpointHook(str(tmp_path), 1, lambda *a: seen.append(a)),
                              EvalHook(lambda e, c: seen.append(("eval", e, c)), 0, 1)])
    trainer.fit()
    assert not [s for s in seen if s[0] != "eval"] and not os.listdir(tmp_path)
    assert seen == [("eval", 0, str(tmp_path / "epoch_0.pth"))]  # every process evaluates


def test_tensorboard_hook_writes_steps_and_published_scalars(tmp_path):
    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, step))

        def flush(self):
            self.rows.append(("flushed", -1))

    writer = Writer()
    trainer = _trainer(_cfg(tmp_path, **{"SOLVER.MAX_EPOCHS": 1}), tb_writer=writer,
                       evaluate_fn=lambda e, c: {"mAP": 0.5})
    trainer.fit()
    tags = {t for t, _ in writer.rows}
    assert {"train/loss", "train/loss_fit", "train/lr", "train/seconds_per_iter", "eval/mAP", "flushed"} <= tags
    assert [s for t, s in writer.rows if t == "train/loss"] == [0, 1, 2]
    not_main = Writer()
    _trainer(_cfg(tmp_path / "b", **{"SOLVER.MAX_EPOCHS": 1}), tb_writer=not_main, is_main=False).fit()
    assert not_main.rows == []
