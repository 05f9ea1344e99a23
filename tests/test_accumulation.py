"""Gradient accumulation (SOLVER.ACCUMULATION_STEPS, engine/trainer.py): one optimizer step over
K loader batches.

Checked against computations written here: the step's gradient is the mean of the K
micro-batches' gradients (each taken alone with torch.autograd.grad, the SeqNet model included,
whose OIM tables move after every micro-batch); clipping acts on that accumulated gradient; the
LR schedule and the epoch length count optimizer steps; the fp16 GradScaler path gives the same
update; under DistributedDataParallel the intermediate micro-batches run under no_sync and the
result equals the plain one.
"""

import copy
import os
import socket

import pytest
import torch

from configs import ConfigError, load_config
from datasets.loaders import build_train_loader
from engine.trainer import Trainer, steps_per_epoch
from models import build_model
from tests.helpers import one_torch_thread, small_cfg  # noqa: F401  (autouse fixture)
from utils.misc import set_seed


class _Toy(torch.nn.Module):
    """forward(images, targets) -> two weighted losses, as the models give them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, images, targets):
        x = torch.stack(images)
        y = torch.stack([t["y"] for t in targets])
        out = self.lin(x)
        return {"loss_fit": ((out - y) ** 2).mean(), "loss_small": 0.1 * out.abs().mean()}


def _toy_batches(n, size=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(4, generator=g) for _ in range(size)],
             [{"y": torch.randn(2, generator=g)} for _ in range(size)]) for _ in range(n)]


def _toy_cfg(k, clip=-1.0, amp="none"):
    return load_config(None, ["SOLVER.ACCUMULATION_STEPS", str(k), "SOLVER.CLIP_GRADIENTS", str(clip),
                              "SOLVER.AMP", amp, "TF_BOARD", "False"])


def _trainer(cfg, module, loader=(), scaler=None, lr=0.5):
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(cfg, module, loader, optimizer, scheduler, torch.device("cpu"), is_main=True,
                   scaler=scaler, log=lambda *a: None)


def _mean_gradient(module, batches):
    """(1/K) sum_j grad(loss_j), each micro-batch's gradient taken on its own."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for images, targets in batches:
        grads = torch.autograd.grad(sum(module(images, targets).values()), params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g / len(batches)
    return params, total


@pytest.mark.parametrize("k", [1, 3])
def test_the_step_follows_the_mean_of_the_micro_batch_gradients(k):
    batches = _toy_batches(k)
    reference = _Toy()
    params, grads = _mean_gradient(reference, batches)
    expected = [p.detach() - 0.5 * g for p, g in zip(params, grads)]
    module = _Toy()
    values, lr = _trainer(_toy_cfg(k), module).train_step(batches, 0, 0)
    assert lr == 0.5
    for p, e in zip(module.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-6)
    # the logged values are the means over the micro-batches
    losses = [{n: float(v.detach()) for n, v in reference(*b).items()} for b in batches]
    assert values["loss_fit"] == pytest.approx(sum(l["loss_fit"] for l in losses) / k, rel=1e-6)
    assert values["loss"] == pytest.approx(sum(sum(l.values()) for l in losses) / k, rel=1e-6)


def test_clipping_acts_on_the_accumulated_gradient():
    batches = _toy_batches(3)
    params, grads = _mean_gradient(_Toy(), batches)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    clip = float(norm) / 4  # only the accumulated norm is above this (not each micro-batch's / 3)
    expected = [p.detach() - 0.5 * g * (clip / (float(norm) + 1e-6)) for p, g in zip(params, grads)]
    module = _Toy()
    _trainer(_toy_cfg(3, clip=clip), module).train_step(batches, 0, 0)
    for p, e in zip(module.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-6)


def test_the_fp16_grad_scaler_path_gives_the_same_step():
    batches = _toy_batches(2)
    plain, scaled = _Toy(), _Toy()
    _trainer(_toy_cfg(2), plain).train_step(batches, 0, 0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _trainer(_toy_cfg(2), scaled, scaler=scaler).train_step(batches, 0, 0)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow: the scale was kept


def test_an_epoch_counts_optimizer_steps_and_the_schedule_follows_them():
    cfg = _toy_cfg(3)
    loader = _toy_batches(7)  # 7 loader batches = 2 full groups of 3; the last batch is left out
    assert steps_per_epoch(cfg, loader) == 2
    module = _Toy()
    trainer = _trainer(cfg, module, loader)
    seen = []
    real_step = trainer.train_step
    trainer.train_step = lambda mbs, e, i: (seen.append(len(mbs)), real_step(mbs, e, i))[1]
    trainer.train_epoch(0)
    assert seen == [3, 3] and trainer.scheduler.last_epoch == 2
    assert steps_per_epoch(load_config(None, ["SOLVER.ACCUMULATION_STEPS", "3", "SOLVER.MAX_ITERS_PER_EPOCH", "1"]),
                           loader) == 1


def test_zero_accumulation_steps_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="SOLVER.ACCUMULATION_STEPS is 0"):
        load_config(None, ["SOLVER.ACCUMULATION_STEPS", "0"])


def test_seqnet_step_equals_the_mean_of_sequential_micro_batch_gradients(synthetic_root, tmp_path):
    """The real model: two micro-batches of 2 images; the second one sees the OIM tables the
    first one's forward wrote, exactly as the reference computed here."""
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, SOLVER__ACCUMULATION_STEPS=2, SOLVER__CLIP_GRADIENTS=-1,
                    MODEL__LOSS__CQ_SIZE=64)
    set_seed(cfg.SEED)
    loader = build_train_loader(cfg)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 2:
            break
    torch.manual_seed(0)
    model = build_model(cfg, "baseline").train()
    reference = copy.deepcopy(model)
    torch.manual_seed(5)  # the proposal sampling draws from the global RNG
    params, grads = _mean_gradient(reference, batches)
    expected = [p.detach() - 0.5 * g for p, g in zip(params, grads)]
    torch.manual_seed(5)
    _trainer(cfg, model, lr=0.5).train_step(batches, 0, 0)
    trained = [p for p in model.parameters() if p.requires_grad]
    moved = 0
    for p, e, p0 in zip(trained, expected, params):
        assert torch.allclose(p.detach(), e, atol=1e-5, rtol=1e-4)
        moved += int(not torch.equal(p.detach(), p0.detach()))
    assert moved > 10
    oim, oim_ref = model.roi_heads.reid_loss.state_dict(), reference.roi_heads.reid_loss.state_dict()
    assert all(torch.equal(oim[k], oim_ref[k]) for k in oim)  # tables updated per micro-batch


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_ddp_only_the_last_micro_batch_synchronises(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        batches = _toy_batches(3)
        plain = _Toy()
        _trainer(_toy_cfg(3), plain).train_step(batches, 0, 0)
        wrapped = DistributedDataParallel(_Toy())
        entered = []
        real_no_sync = wrapped.no_sync

        def counting_no_sync():
            entered.append(1)
            return real_no_sync()

        monkeypatch.setattr(wrapped, "no_sync", counting_no_sync)
        _trainer(_toy_cfg(3), wrapped).train_step(batches, 0, 0)
        assert len(entered) == 2  # micro-batches 1 and 2 of 3
        for a, b in zip(plain.parameters(), wrapped.module.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_ddps_step_accumulates_in_bf16(synthetic_root, tmp_path):
    """The distiller through the same step: every term present and finite, the student moved,
    the frozen teacher not."""
    from engine.build import build_train_module

    teacher_cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, BASELINE__BACKBONE_NAME="resnet18")
    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pth"
    torch.save({"model": build_model(teacher_cfg, "baseline").state_dict()}, teacher_path)
    cfg = small_cfg(
        synthetic_root, "CUHK-SYSU", tmp_path, SOLVER__ACCUMULATION_STEPS=2, SOLVER__AMP="bf16",
        BASELINE__PROJECT=False, DISTILLER__PROJECT=True, DISTILLER__TYPE="FGD_DKD_Relation",
        DISTILLER__TEACHER__BACKBONE_NAME="resnet18", DISTILLER__TEACHER__BACKBONE_PRETRAIN=False,
        DISTILLER__TEACHER__FROZENBN2d=False, DISTILLER__TEACHER__CKPT=str(teacher_path),
        DISTILLER__STUDENT__BACKBONE_NAME="resnet18_x05", DISTILLER__STUDENT__BACKBONE_PRETRAIN=False,
        DISTILLER__STUDENT__FROZENBN2d=False)
    set_seed(cfg.SEED)
    module, student = build_train_module(cfg, torch.device("cpu"), log=lambda *a: None)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    loader = build_train_loader(cfg)
    trainer = _trainer(cfg, module, loader, lr=0.01)
    values, _ = trainer.train_step(next(trainer.optimizer_steps()), 0, 0)
    assert {"loss_ld", "loss_cd", "loss_fgd_fpn_layer_0", "loss_fgd_fpn_layer_3"} <= set(values)  # DFD per level
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
