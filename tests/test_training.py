"""The single-model training path (SPEC 4.1, 5): one SGD step, OIM table updates, exact resume,
non-finite losses, CUDA.

Runs on the synthetic world of conftest (`synthetic_root`) at its native 160 x 120 size with a
ResNet-18 x0.5 and a few iterations; evaluation is switched off or patched out here (it is
tested in test_cli.py).
"""

import os

import numpy as np
import pytest
import torch

import engine.trainer
import train_ddps
from datasets.loaders import build_train_loader
from engine.schedule import build_lr_scheduler, build_optimizer
from engine.trainer import NonFiniteLossError, Trainer
from models import build_model
from models.oim import UNLABELED_PID
from models.seqnet import SeqNetFPN
from tests.helpers import one_torch_thread, small_cfg, small_opts, state_dicts_equal, straight_and_resumed  # noqa: F401,E501
from utils.misc import set_seed

HEADER_KEY = "roi_heads.reid_loss.header_cq"


def _reference_oim_update(lut, cq, head, feats, labels, momentum):
    """SPEC 4.1 literally, one sample after the other: a labeled feature moves its row toward
    itself (m row + (1-m) x, re-normalised); an unlabeled one is written at the queue head,
    which advances circularly; background (0) is ignored."""
    lut, cq, head = lut.clone(), cq.clone(), int(head)
    for x, y in zip(feats, labels.tolist()):
        if y == 0:
            continue
        if y == UNLABELED_PID:
            cq[head] = x
            head = (head + 1) % cq.shape[0]
        else:
            row = momentum * lut[y - 1] + (1 - momentum) * x
            lut[y - 1] = row / row.norm()
    return lut, cq, head


def test_one_training_step_moves_weights_and_oim_tables(synthetic_root, tmp_path):
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, SOLVER__MAX_ITERS_PER_EPOCH=1,
                    SOLVER__BASE_LR=0.1, SOLVER__WARMUP_FACTOR=0.5, MODEL__LOSS__CQ_SIZE=64,
                    BASELINE__FREEZE=True, INPUT__BATCH_SIZE_TRAIN=3)
    set_seed(cfg.SEED)
    loader = build_train_loader(cfg)
    model = build_model(cfg, "baseline")
    oim = model.roi_heads.reid_loss
    # known, non-trivial tables: random unit rows, the queue head near the end (wrap-around)
    with torch.no_grad():
        oim.lut.copy_(torch.nn.functional.normalize(torch.randn_like(oim.lut), dim=1))
        oim.cq.copy_(torch.nn.functional.normalize(torch.randn_like(oim.cq), dim=1))
        oim.header_cq.fill_(oim.cq_size - 3)
    seen = []
    hook = oim.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].detach().clone(), args[1].clone(), mod.lut.clone(),
                                       mod.cq.clone(), int(mod.header_cq))))
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_lr_scheduler(cfg, optimizer, 1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    model.eval()  # the trainer must switch the model to training mode itself
    trainer = Trainer(cfg, model, loader, optimizer, scheduler, torch.device("cpu"), log=lambda *a: None)
    means = trainer.train_epoch(0)
    hook.remove()
    assert model.training
    assert np.isfinite(means["loss"]) and len(seen) == 1

    # --- OIM tables (SPEC 4.1)
    feats, labels, lut0, cq0, head0 = seen[0]
    n_labeled = int(((labels > 0) & (labels != UNLABELED_PID)).sum())
    n_unlabeled = int((labels == UNLABELED_PID).sum())
    assert n_labeled > 0 and n_unlabeled > 3  # the batch exercises both updates and the wrap
    lut, cq, head = _reference_oim_update(lut0, cq0, head0, feats, labels, cfg.MODEL.LOSS.OIM_MOMENTUM)
    assert torch.allclose(oim.lut, lut, atol=1e-6)
    assert torch.equal(oim.cq, cq)
    assert int(oim.header_cq) == head == (head0 + n_unlabeled) % oim.cq_size
    touched = sorted({int(y) - 1 for y in labels if 0 < int(y) != UNLABELED_PID})
    untouched = [r for r in range(oim.lut_size) if r not in touched]
    assert torch.equal(oim.lut[untouched], lut0[untouched])
    assert torch.allclose(oim.lut[touched].norm(dim=1), torch.ones(len(touched)), atol=1e-5)
    for r in touched:  # each touched row moved toward the mean of its features
        x = feats[labels == r + 1].mean(0)
        assert torch.dot(oim.lut[r], x) > torch.dot(lut0[r], x)
    sd = model.state_dict()
    assert HEADER_KEY in sd and int(sd[HEADER_KEY]) == head
    # a checkpoint carries the tables and the head
    path = engine.trainer.save_training_checkpoint(str(tmp_path / "step.pth"), model, optimizer, scheduler, 0)
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert int(saved[HEADER_KEY]) == head and torch.equal(saved["roi_heads.reid_loss.cq"], oim.cq)

    # --- weights: one SGD step at the warm-up learning rate (SPEC 5), clipped gradients
    lr0 = cfg.SOLVER.BASE_LR * cfg.SOLVER.WARMUP_FACTOR
    wd = cfg.SOLVER.WEIGHT_DECAY
    grads = [p.grad for k, p in model.named_parameters() if k in trainable and p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= cfg.SOLVER.CLIP_GRADIENTS * (1 + 1e-4)
    changed, unused = 0, set()
    for name, p in model.named_parameters():
        if name not in trainable:  # FREEZE: conv1 / bn1 stay, and are not optimised
            assert torch.equal(p, before[name]), name
            continue
        if p.grad is None:  # outside every loss (box_predictor, rescaler: SPEC 4): SGD skips it
            assert torch.equal(p, before[name]), name
            unused.add(name.rsplit(".", 2)[0] if "bbox_pred" in name else name.rsplit(".", 1)[0])
            continue
        expected = before[name] - lr0 * (p.grad + wd * before[name])
        # atol for the small weights, plus one float32 ulp for the weights near 1 (BatchNorm scales),
        # where torch's SGD and this formula may round the last bit differently
        assert torch.allclose(p, expected, rtol=2 ** -23, atol=5e-8), name
        changed += not torch.equal(p, before[name])
    assert unused == {"roi_heads.box_predictor.bbox_pred", "roi_heads.embedding_head.rescaler"}
    assert changed == len(trainable) - 6
    # the tolerance above does tell the warm-up rate and the weight decay apart
    fc6 = model.roi_heads.reid_head.fc6.weight
    w0 = before["roi_heads.reid_head.fc6.weight"]
    assert not torch.allclose(fc6, w0 - lr0 * fc6.grad, rtol=0, atol=5e-8)
    assert not torch.allclose(fc6, w0 - cfg.SOLVER.BASE_LR * (fc6.grad + wd * w0), rtol=0, atol=5e-8)
    assert any(name.startswith("backbone.body.conv1") for name in before if name not in trainable)
    for prefix in ("backbone.body.layer1", "backbone.fpn", "rpn.head", "roi_heads.box_head",
                   "roi_heads.faster_rcnn_predictor", "roi_heads.reid_head", "roi_heads.embedding_head"):
        grads = [p.grad for k, p in model.named_parameters() if k.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    assert scheduler.last_epoch == 1


def test_resume_reproduces_an_uninterrupted_run(synthetic_root, tmp_path, monkeypatch):
    """2 epochs straight vs 1 epoch, a crash, and `--resume --ckpt epoch_0.pth` in a fresh state:
    the final checkpoints are bitwise equal (weights, OIM lut / cq / head, optimizer momentum,
    scheduler, RNG states)."""
    monkeypatch.setattr(train_ddps, "evaluate", lambda *a, **k: None)  # tested in test_cli.py
    common = dict(SOLVER__MAX_EPOCHS=2, SOLVER__MAX_ITERS_PER_EPOCH=2, SOLVER__BASE_LR=0.01,
                  SOLVER__LR_DECAY_MILESTONES="[1]", SEED=5)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a, b, first = straight_and_resumed(small_opts(synthetic_root, "PRW", straight, **common),
                                       small_opts(synthetic_root, "PRW", resumed, **common), resumed, monkeypatch)
    assert b["epoch"] == a["epoch"] == 1
    assert b["lr_scheduler"]["last_epoch"] == a["lr_scheduler"]["last_epoch"] == 4
    assert state_dicts_equal(a, b) == []
    # and the run really moved between the two checkpoints (the comparison is not vacuous)
    assert int(first["model"][HEADER_KEY]) != int(a["model"][HEADER_KEY]) or not torch.equal(
        first["model"]["roi_heads.reid_loss.cq"], a["model"]["roi_heads.reid_loss.cq"])
    assert not torch.equal(first["model"]["roi_heads.reid_head.fc6.weight"],
                           a["model"]["roi_heads.reid_head.fc6.weight"])
    assert state_dicts_equal(first["optimizer"], a["optimizer"]) != []


def test_non_finite_loss_stops_with_the_term_and_keeps_the_checkpoint(synthetic_root, tmp_path, monkeypatch):
    real_forward_train = SeqNetFPN.forward_train
    calls = {"n": 0}
    at_failure = {}

    def forward_train(self, images, targets):
        calls["n"] += 1
        losses, record = real_forward_train(self, images, targets)
        if calls["n"] == 4:  # epoch 1 (2 iterations per epoch), iteration 1
            at_failure.update({k: v.detach().clone() for k, v in self.named_parameters()})
            at_failure["model"] = self
            losses["loss_proposal_reg"] = losses["loss_proposal_reg"] * float("nan")
        return losses, record

    saved = {}
    real_save = engine.trainer.save_training_checkpoint

    def save(path, *args, **kwargs):
        out = real_save(path, *args, **kwargs)
        with open(path, "rb") as f:
            saved[os.path.basename(path)] = f.read()
        return out

    monkeypatch.setattr(SeqNetFPN, "forward_train", forward_train)
    monkeypatch.setattr(engine.trainer, "save_training_checkpoint", save)
    monkeypatch.setattr(train_ddps, "evaluate", lambda *a, **k: pytest.fail("no evaluation expected"))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train_ddps.main(small_opts(synthetic_root, "CUHK-SYSU", out, SOLVER__MAX_EPOCHS=2))
    message = str(info.value)
    assert "epoch 1" in message and "iteration 1" in message and "loss_proposal_reg" in message
    assert "loss_box_reid" not in message.split("(all terms")[0]  # only the bad term is named first
    # the previous epoch's checkpoint is there, unchanged and loadable; nothing else was written
    assert sorted(os.listdir(out)) == ["config.yaml", "epoch_0.pth"]
    with open(out / "epoch_0.pth", "rb") as f:
        assert f.read() == saved["epoch_0.pth"]
    ckpt = torch.load(out / "epoch_0.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and HEADER_KEY in ckpt["model"]
    # the step with the bad loss did not touch the weights
    model = at_failure.pop("model")
    for name, p in model.named_parameters():
        assert torch.equal(p, at_failure[name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_training_step_on_cuda(synthetic_root, tmp_path):
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, DEVICE="cuda", SOLVER__MAX_ITERS_PER_EPOCH=1)
    device = torch.device("cuda")
    set_seed(cfg.SEED)
    loader = build_train_loader(cfg)
    model = build_model(cfg, "baseline").to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_lr_scheduler(cfg, optimizer, 1)
    before = model.roi_heads.box_head.fc6.weight.detach().clone()
    head = int(model.roi_heads.reid_loss.header_cq)
    means = Trainer(cfg, model, loader, optimizer, scheduler, device, log=lambda *a: None).train_epoch(0)
    assert np.isfinite(means["loss"])
    assert model.roi_heads.box_head.fc6.weight.is_cuda
    assert not torch.equal(model.roi_heads.box_head.fc6.weight, before)
    assert int(model.roi_heads.reid_loss.header_cq) != head or model.roi_heads.reid_loss.cq.abs().sum() > 0
