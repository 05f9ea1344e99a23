"""Mixed precision (SOLVER.AMP "bf16" | "fp16"): torch.autocast around the training forward and
inference, float32 losses and OIM tables, DDPS terms in float32, the fp16 GradScaler (its state in
checkpoints; a step it skips because gradients overflowed is not a fatal error).

On the CPU bf16 is the reduced precision that matters; fp16 runs there too (slowly, with a notice).
The memory saving is checked on CUDA only.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import engine.trainer
import train_ddps
from datasets import build_dataset
from datasets.loaders import build_train_loader, collate_fn
from datasets.transforms import build_transforms
from engine.inference import run_inference
from engine.schedule import build_lr_scheduler, build_optimizer
from engine.trainer import Trainer, restore_training_state
from models import build_model
from models.distill import Distiller, build_terms, known_terms
from tests.helpers import small_cfg
from utils.misc import set_seed

CPU = torch.device("cpu")


def _quiet(*args, **kwargs):
    pass


def _test_loaders(root, n_gallery=3, n_query=2):
    transforms = build_transforms(False)
    gallery = build_dataset("CUHK-SYSU", str(root), transforms, "gallery")
    query = build_dataset("CUHK-SYSU", str(root), transforms, "query")
    return (DataLoader(Subset(gallery, range(n_gallery)), batch_size=1, collate_fn=collate_fn),
            DataLoader(Subset(query, range(n_query)), batch_size=1, collate_fn=collate_fn))


@pytest.mark.slow
def test_bf16_training_step_and_inference_on_cpu(synthetic_root, tmp_path):
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, SOLVER__AMP="bf16", SOLVER__MAX_ITERS_PER_EPOCH=1,
                    MODEL__LOSS__CQ_SIZE=64, SOLVER__BASE_LR=0.1, SOLVER__WARMUP_FACTOR=0.5)
    set_seed(cfg.SEED)
    loader = build_train_loader(cfg)
    model = build_model(cfg, "baseline")
    oim = model.roi_heads.reid_loss
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_lr_scheduler(cfg, optimizer, 1)
    before = model.roi_heads.reid_head.fc6.weight.detach().clone()

    # the forward under bf16 autocast gives float32 losses
    images, targets = next(iter(loader))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(list(images), list(targets))
    assert losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    oim.lut.zero_(), oim.cq.zero_(), oim.header_cq.zero_()

    means = Trainer(cfg, model, loader, optimizer, scheduler, CPU, log=_quiet).train_epoch(0)
    assert all(np.isfinite(v) for v in means.values()), means
    # weights and OIM tables stay float32, and the step moved them
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert oim.lut.dtype == oim.cq.dtype == torch.float32
    assert int(oim.header_cq) > 0 and oim.lut.abs().sum() > 0
    assert not torch.equal(model.roi_heads.reid_head.fc6.weight, before)

    gallery_loader, query_loader = _test_loaders(synthetic_root / "CUHK-SYSU")
    raw = run_inference(model, gallery_loader, query_loader, CPU, amp="bf16", progress=False)
    assert len(raw["gallery_dets"]) == 3 and len(raw["query_box_feats"]) == 2
    for key in ("gallery_dets", "gallery_feats", "query_dets", "query_feats", "query_box_feats"):
        for arr in raw[key]:
            assert arr.dtype == np.float32 and np.isfinite(arr).all(), key
    assert all(f.shape == (1, 256) for f in raw["query_box_feats"])
    assert all(f.shape[1] == 256 for f in raw["gallery_feats"] if len(f))


@pytest.mark.slow
def test_every_distillation_term_is_float32_under_bf16(synthetic_root, tmp_path):
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, BASELINE__PROJECT=False, DISTILLER__PROJECT=True,
                    DISTILLER__TEACHER__BACKBONE_NAME="resnet18_x05", DISTILLER__TEACHER__BACKBONE_PRETRAIN=False,
                    DISTILLER__STUDENT__BACKBONE_NAME="resnet18_x05", DISTILLER__STUDENT__BACKBONE_PRETRAIN=False)
    set_seed(cfg.SEED)
    student, teacher = build_model(cfg, "student"), build_model(cfg, "teacher")
    names = known_terms()  # every registered method at once
    terms = build_terms(cfg, names, student.backbone.out_channels, teacher.backbone.out_channels)
    distiller = Distiller(student, teacher, terms).train()
    images, targets = next(iter(build_train_loader(cfg)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = distiller(list(images), list(targets))
    assert {"loss_fgd_fpn_layer_0", "loss_ld", "loss_cd"} <= set(losses)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), (k, v)
    sum(losses.values()).backward()
    for name in names:
        grads = [p.grad for p in distiller.terms[name].parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads), name


def test_dfd_ld_cd_compute_in_float32_under_autocast():
    from models.distill import DFDLoss, cd_loss, ld_loss

    g = torch.Generator().manual_seed(0)
    feat_s, feat_t = torch.randn(2, 16, 12, 10, generator=g), torch.randn(2, 16, 12, 10, generator=g)
    boxes = [torch.tensor([[4.0, 8.0, 30.0, 60.0]]), torch.zeros(0, 4)]
    dfd = DFDLoss(16)
    with torch.no_grad():  # non-zero context transforms, so that the global term runs its convs
        for block in (dfd.channel_add_conv_s, dfd.channel_add_conv_t):
            block[-1].weight.normal_(generator=g)
    emb_s, emb_t = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    logits_s, logits_t = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)
    labels = torch.tensor([0, 1, 1, 0, 0, 1, 0])

    def terms():
        return [dfd(feat_s, feat_t, boxes, (48, 40)), cd_loss(emb_s, emb_t), ld_loss(logits_s, logits_t, labels)]

    exact = terms()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = terms()
    for a, b in zip(exact, mixed):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=0), (a, b)


@pytest.mark.slow
def test_fp16_step_on_cpu_with_grad_scaler_saved_in_checkpoints(synthetic_root, tmp_path):
    cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, SOLVER__AMP="fp16", SOLVER__MAX_ITERS_PER_EPOCH=1)
    notices = []
    train_ddps.check_amp(cfg, CPU, log=notices.append)
    assert len(notices) == 1 and "fp16" in notices[0] and "bf16" in notices[0]
    set_seed(cfg.SEED)
    model = build_model(cfg, "baseline")
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_lr_scheduler(cfg, optimizer, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = Trainer(cfg, model, build_train_loader(cfg), optimizer, scheduler, CPU, scaler=scaler, log=_quiet)
    means = trainer.train_epoch(0)
    assert all(np.isfinite(v) for v in means.values()), means
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.roi_heads.reid_loss.lut.dtype == torch.float32

    scaler.update(2.0**7)  # a scale the defaults would not give back
    path = engine.trainer.save_training_checkpoint(str(tmp_path / "amp.pth"), model, optimizer, scheduler, 0,
                                                   scaler)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["grad_scaler"]["scale"] == 2.0**7
    fresh = torch.amp.GradScaler("cpu")
    assert restore_training_state(ckpt, optimizer, scheduler, fresh) == 1
    assert fresh.get_scale() == 2.0**7 and fresh.state_dict() == scaler.state_dict()


class _OverflowingGradient(nn.Module):
    """A finite loss (1) whose gradient is infinite: d sqrt(w) / dw at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, images, targets):
        return {"loss_sqrt": torch.sqrt(self.w.float()).sum() + 1.0}


def test_a_step_skipped_by_the_grad_scaler_is_not_fatal(tmp_path):
    cfg = small_cfg(tmp_path, "CUHK-SYSU", tmp_path, SOLVER__AMP="fp16")
    module = _OverflowingGradient()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(cfg, optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = [([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(0, 4)}])] * 2
    trainer = Trainer(cfg, module, batches, optimizer, scheduler, CPU, scaler=scaler, log=_quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": expected here
        means = trainer.train_epoch(0)  # no NonFiniteLossError: the losses are finite
    assert means["loss"] == 1.0
    assert torch.equal(module.w.detach(), torch.zeros(3))  # both steps skipped
    assert scaler.get_scale() == 2.0**6  # halved twice (backoff)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_cuts_peak_training_memory_on_cuda(synthetic_root, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    device = torch.device("cuda")
    peaks = {}
    for amp in ("none", "bf16"):
        # 160 x 120 images resized to 600 x 800 inside the model: activations dominate
        cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, DEVICE="cuda", SOLVER__AMP=amp,
                        SOLVER__MAX_ITERS_PER_EPOCH=1, INPUT__MIN_SIZE=600, INPUT__MAX_SIZE=1000,
                        INPUT__BATCH_SIZE_TRAIN=4, BASELINE__BACKBONE_NAME="resnet18")
        set_seed(cfg.SEED)
        model = build_model(cfg, "baseline").to(device)
        optimizer = build_optimizer(cfg, model.parameters())
        scheduler = build_lr_scheduler(cfg, optimizer, 1)
        trainer = Trainer(cfg, model, build_train_loader(cfg), optimizer, scheduler, device, log=_quiet)
        trainer.train_epoch(0)  # warm-up: cuDNN workspaces, optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        means = trainer.train_epoch(1)
        torch.cuda.synchronize()
        peaks[amp] = torch.cuda.max_memory_allocated(device) - base
        assert all(np.isfinite(v) for v in means.values()), (amp, means)
        del model, optimizer, scheduler, trainer
        torch.cuda.empty_cache()
    assert peaks["bf16"] < 0.85 * peaks["none"], peaks
