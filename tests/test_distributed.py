"""Distributed training (torch.distributed with gloo, two CPU processes; utils/dist.py).

- the variable-size all-gather and the OIM update it feeds: every rank applies the update of the
  whole (gathered) batch in rank order, so the tables stay identical and equal to a
  single-process update with the concatenated batch; the loss uses the local features only;
- `train_ddps.main` in two processes (what `torchrun --nproc_per_node 2 train_ddps.py ...` runs),
  single model and DDPS distillation: OIM tables and weights identical on both ranks, one
  checkpoint per epoch written by rank 0 alone, evaluation called on every rank, resume;
- `train_ddps.main --eval` in two processes: the images are split between the ranks and the
  metrics.json and eval_cache.pth of rank 0 equal those of a single process.

The processes are started with torch.multiprocessing (spawn) and the environment torchrun would
give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). In the training tests
evaluation is patched out inside the workers (it is tested in test_cli.py) and records who
called it.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models.oim import UNLABELED_PID, OIMLoss
from tests.helpers import small_cfg, small_opts, state_dicts_equal

WORLD = 2
TABLES = ("lut", "cq", "header_cq")
OIM_PREFIX = "roi_heads.reid_loss."


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    mp.spawn(fn, args=(WORLD, _free_port()) + args, nprocs=WORLD, join=True)


def _torchrun_env(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: two processes share the cores


# --------------------------------------------------------------------------- gather + OIM
def _rank_batch(rank):
    """Rank r's features (3 + 2r rows: the sizes differ) and labels (background, labeled,
    unlabeled; label 2 on both ranks, so the order of the update matters)."""
    g = torch.Generator().manual_seed(100 + rank)
    labels = [torch.tensor([0, 2, UNLABELED_PID]), torch.tensor([2, 0, 4, UNLABELED_PID, UNLABELED_PID])][rank]
    feats = torch.nn.functional.normalize(torch.randn(len(labels), 8, generator=g), dim=1)
    return feats, labels


def _gather_worker(rank, world, port, out_dir):
    _torchrun_env(rank, world, port)
    from utils.dist import (all_gather_variable, any_across_ranks, cleanup, get_rank, get_world_size,
                            init_distributed, is_main_process)

    device = init_distributed("cpu")
    try:
        feats, labels = _rank_batch(rank)
        gathered = all_gather_variable(feats, labels.float()[:, None])
        single = all_gather_variable(torch.arange(rank + 1))
        empty = all_gather_variable(torch.zeros(0, 3))
        oim = OIMLoss(num_features=8, lut_size=5, cq_size=4).train()
        x = feats.clone().requires_grad_(True)
        loss = oim(x, labels)
        loss.backward()
        torch.save({
            "device": str(device), "rank": get_rank(), "world": get_world_size(), "main": is_main_process(),
            "feats": gathered[0], "labels": gathered[1], "single": single, "empty": tuple(empty.shape),
            "any_one": any_across_ranks(rank == 1), "any_none": any_across_ranks(False),
            "loss": loss.detach(), "grad": x.grad, "tables": {k: v.clone() for k, v in oim.state_dict().items()},
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


@pytest.mark.slow
def test_all_gather_variable_and_identical_oim_updates(tmp_path):
    _spawn(_gather_worker, str(tmp_path))
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]
    batches = [_rank_batch(i) for i in range(WORLD)]
    all_feats = torch.cat([b[0] for b in batches])
    all_labels = torch.cat([b[1] for b in batches])
    for i, res in enumerate(r):
        assert (res["device"], res["rank"], res["world"], res["main"]) == ("cpu", i, WORLD, i == 0)
        # rank 0's rows, then rank 1's, cut back to their own sizes (3 and 5)
        assert torch.equal(res["feats"], all_feats)
        assert torch.equal(res["labels"][:, 0].long(), all_labels)
        assert res["single"].tolist() == [0, 0, 1] and res["empty"] == (0, 3)
        assert res["any_one"] is True and res["any_none"] is False
    # the tables: identical on both ranks, and what one process gets from the concatenated batch
    reference = OIMLoss(num_features=8, lut_size=5, cq_size=4)
    reference.update(all_feats, all_labels)
    assert state_dicts_equal(r[0]["tables"], r[1]["tables"]) == []
    for k in TABLES:
        assert torch.allclose(r[0]["tables"][k].float(), reference.state_dict()[k].float(), atol=1e-6), k
    assert int(r[0]["tables"]["header_cq"]) == 3 % 4  # three unlabeled features in all
    # the loss (and its gradient) is each rank's own, computed before the update
    for i, (feats, labels) in enumerate(batches):
        fresh = OIMLoss(num_features=8, lut_size=5, cq_size=4)
        x = feats.clone().requires_grad_(True)
        expected = fresh.loss(x, labels)
        expected.backward()
        assert torch.allclose(r[i]["loss"], expected.detach()) and torch.allclose(r[i]["grad"], x.grad)


# --------------------------------------------------------------------------- resume with another world size
def test_resumed_schedule_keeps_epoch_boundaries_with_another_number_of_steps(tmp_path):
    from engine.schedule import align_scheduler, build_lr_scheduler

    cfg = small_cfg(tmp_path, "CUHK-SYSU", tmp_path, SOLVER__BASE_LR=0.1, SOLVER__WARMUP_FACTOR=0.01,
                    SOLVER__LR_DECAY_MILESTONES="[2, 3]", SOLVER__GAMMA=0.1)

    def schedule(iters):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR, momentum=0.9)
        return optimizer, build_lr_scheduler(cfg, optimizer, iters)

    # two processes: 3 steps per epoch; two epochs, then a checkpoint
    optimizer, scheduler = schedule(3)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
    for iters, lr in ((3, 0.01), (6, 0.01), (1, 0.01)):  # 2 processes again, 1 process, 6 processes
        optimizer, scheduler = schedule(iters)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["lr_scheduler"])
        align_scheduler(scheduler, 2, iters)
        assert scheduler.last_epoch == 2 * iters
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr) and scheduler.get_last_lr() == [
            optimizer.param_groups[0]["lr"]]
        for i in range(iters):  # the whole of epoch 2 at the decayed rate, then the next decay
            optimizer.step()
            scheduler.step()
            assert optimizer.param_groups[0]["lr"] == pytest.approx(lr if i < iters - 1 else lr * 0.1)
    # with the same number of steps it is exactly the restored state
    optimizer, scheduler = schedule(3)
    scheduler.load_state_dict(saved["lr_scheduler"])
    before = scheduler.state_dict()
    align_scheduler(scheduler, 2, 3)
    assert state_dicts_equal(scheduler.state_dict(), before) == []


# --------------------------------------------------------------------------- train_ddps.main
def _train_worker(rank, world, port, runs, markers, own_group):
    """Run train_ddps.main once per argv in `runs`, as rank `rank` of a torchrun job.

    own_group: start the process group here (so that several runs share it); otherwise
    train_ddps.main starts and destroys it, as under torchrun."""
    _torchrun_env(rank, world, port)
    import torch.distributed as dist

    import engine.trainer
    import train_ddps

    def mark(name):
        open(os.path.join(markers, name), "w").close()

    def fake_evaluate(model, cfg, gallery_loader, query_loader, device, checkpoint=None, epoch=None, **kwargs):
        mark(f"eval_rank{rank}_epoch{epoch}")
        return {k: 0.0 for k in ("det_recall", "det_ap", "mAP", "top1", "top5", "top10")}

    real_save = engine.trainer.save_training_checkpoint

    def save(path, *args, **kwargs):
        mark(f"saved_rank{rank}_{os.path.basename(path)}")
        return real_save(path, *args, **kwargs)

    class RecordingTrainer(train_ddps.Trainer):
        def fit(self, start_epoch=0):
            metrics = super().fit(start_epoch)
            module = getattr(self.module, "module", self.module)
            model = getattr(module, "student", module)
            torch.save({
                "ddp": isinstance(self.module, torch.nn.parallel.DistributedDataParallel),
                "distributed": dist.is_initialized() and dist.get_world_size() == world,
                "is_main": self.is_main,
                "device": str(next(module.parameters()).device),
                "params": {k: v.detach().cpu().clone() for k, v in module.named_parameters()},
                "tables": {k: v.cpu().clone() for k, v in model.roi_heads.reid_loss.state_dict().items()},
                "teacher_tables": ({k: v.cpu().clone() for k, v in module.teacher.roi_heads.reid_loss.state_dict().items()}
                                   if hasattr(module, "teacher") else None),
            }, os.path.join(markers, f"state_rank{rank}_from{start_epoch}.pt"))
            return metrics

    train_ddps.evaluate = fake_evaluate
    train_ddps.Trainer = RecordingTrainer
    engine.trainer.save_training_checkpoint = save
    if own_group:
        dist.init_process_group("gloo", init_method="env://")
    try:
        for argv in runs:
            train_ddps.main(argv)
            assert dist.is_initialized() == own_group  # main destroys only a group it started
    except BaseException:
        import traceback
        with open(os.path.join(markers, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_states(markers, start_epoch):
    return [torch.load(os.path.join(markers, f"state_rank{r}_from{start_epoch}.pt"), weights_only=True)
            for r in range(WORLD)]


def _check_identical_ranks(states):
    assert [s["ddp"] for s in states] == [True] * WORLD
    assert [s["distributed"] for s in states] == [True] * WORLD
    assert [s["is_main"] for s in states] == [True] + [False] * (WORLD - 1)
    assert state_dicts_equal(states[0]["tables"], states[1]["tables"]) == []
    assert state_dicts_equal(states[0]["params"], states[1]["params"]) == []
    tables = states[0]["tables"]
    assert int(tables["header_cq"]) > 0 and tables["lut"].abs().sum() > 0  # updated, not vacuous


@pytest.mark.slow
def test_two_process_training_single_model_and_resume(synthetic_root, tmp_path):
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    common = dict(SOLVER__MAX_ITERS_PER_EPOCH=3, EVAL_START_EPOCH=0, MODEL__LOSS__CQ_SIZE=64)
    first = small_opts(synthetic_root, "CUHK-SYSU", out, **common)
    resume = ["--resume", "--ckpt", str(out / "epoch_0.pth")] + small_opts(
        synthetic_root, "CUHK-SYSU", out, SOLVER__MAX_EPOCHS=2, **common)
    _spawn(_train_worker, [first, resume], str(markers), True)

    # one checkpoint per epoch, written by rank 0; evaluation on every rank (each its share)
    assert sorted(os.listdir(out)) == ["config.yaml", "epoch_0.pth", "epoch_1.pth"]
    done = sorted(f for f in os.listdir(markers) if not f.startswith("state_"))
    assert done == ["eval_rank0_epoch0", "eval_rank0_epoch1", "eval_rank1_epoch0", "eval_rank1_epoch1",
                    "saved_rank0_epoch_0.pth", "saved_rank0_epoch_1.pth"]

    before, after = _load_states(markers, 0), _load_states(markers, 1)
    _check_identical_ranks(before)
    _check_identical_ranks(after)
    # the checkpoint is the unwrapped model (no "module." prefix) of rank 0, OIM tables included
    for epoch, states in ((0, before), (1, after)):
        ckpt = torch.load(out / f"epoch_{epoch}.pth", map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == epoch and not any(k.startswith("module.") for k in ckpt["model"])
        for k, v in states[0]["params"].items():
            assert torch.equal(ckpt["model"][k], v), k
        for k in TABLES:
            assert torch.equal(ckpt["model"][OIM_PREFIX + k], states[0]["tables"][k]), k
        # 3 steps per process and epoch, each a global batch of 2 x 2 images
        assert ckpt["lr_scheduler"]["last_epoch"] == 3 * (epoch + 1)
    assert not torch.equal(before[0]["tables"]["cq"], after[0]["tables"]["cq"])  # the resumed run trained


@pytest.mark.slow
def test_two_process_ddps_distillation(synthetic_root, tmp_path):
    from models import build_model

    # teacher: a freshly built ResNet-18 (same class map and table sizes), with non-trivial tables
    teacher_cfg = small_cfg(synthetic_root, "CUHK-SYSU", tmp_path, BASELINE__BACKBONE_NAME="resnet18")
    torch.manual_seed(0)
    teacher = build_model(teacher_cfg, "baseline")
    with torch.no_grad():
        oim = teacher.roi_heads.reid_loss
        oim.lut.copy_(torch.nn.functional.normalize(torch.randn_like(oim.lut), dim=1))
        oim.cq.copy_(torch.nn.functional.normalize(torch.randn_like(oim.cq), dim=1))
    teacher_path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, teacher_path)

    out, markers = tmp_path / "ddps", tmp_path / "markers"
    markers.mkdir()
    argv = small_opts(
        synthetic_root, "CUHK-SYSU", out, SOLVER__MAX_ITERS_PER_EPOCH=3, EVAL_START_EPOCH=0,
        BASELINE__PROJECT=False, DISTILLER__PROJECT=True, DISTILLER__TYPE="FGD_DKD_Relation",
        DISTILLER__TEACHER__BACKBONE_NAME="resnet18", DISTILLER__TEACHER__BACKBONE_PRETRAIN=False,
        DISTILLER__TEACHER__FROZENBN2d=False, DISTILLER__TEACHER__CKPT=str(teacher_path),
        DISTILLER__STUDENT__BACKBONE_NAME="resnet18_x05", DISTILLER__STUDENT__BACKBONE_PRETRAIN=False,
        DISTILLER__STUDENT__FROZENBN2d=False,
    )
    _spawn(_train_worker, [argv], str(markers), False)

    assert sorted(os.listdir(out)) == ["config.yaml", "epoch_0.pth"]
    done = sorted(f for f in os.listdir(markers) if not f.startswith("state_"))
    assert done == ["eval_rank0_epoch0", "eval_rank1_epoch0", "saved_rank0_epoch_0.pth"]
    states = _load_states(markers, 0)
    _check_identical_ranks(states)  # the student's tables and every trained weight (student + DFD)
    assert any(k.startswith("terms.dfd.") for k in states[0]["params"])
    teacher_state = teacher.state_dict()
    for k, v in states[0]["params"].items():  # the frozen teacher did not move
        if k.startswith("teacher."):
            assert torch.equal(v, teacher_state[k[len("teacher."):]]), k
    # the teacher's tables are never updated: still those of its checkpoint, on both ranks
    for s in states:
        assert state_dicts_equal(s["teacher_tables"], {k: teacher.roi_heads.reid_loss.state_dict()[k]
                                                       for k in TABLES}) == []
    ckpt = torch.load(out / "epoch_0.pth", map_location="cpu", weights_only=True)
    assert set(ckpt["model"]) == {"student", "fgd"}
    for k in TABLES:
        assert torch.equal(ckpt["model"]["student"][OIM_PREFIX + k], states[0]["tables"][k]), k


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_nccl_training(synthetic_root, tmp_path):
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    argv = small_opts(synthetic_root, "CUHK-SYSU", out, DEVICE="cuda", SOLVER__MAX_ITERS_PER_EPOCH=3,
                      EVAL_START_EPOCH=0, MODEL__LOSS__CQ_SIZE=64)
    _spawn(_train_worker, [argv], str(markers), False)  # train_ddps.main starts NCCL itself
    assert sorted(os.listdir(out)) == ["config.yaml", "epoch_0.pth"]
    states = _load_states(markers, 0)
    assert [s["device"] for s in states] == ["cuda:0", "cuda:1"]  # cuda -> cuda:LOCAL_RANK
    _check_identical_ranks(states)


# --------------------------------------------------------------------------- evaluation
def _eval_worker(rank, world, port, argv):
    _torchrun_env(rank, world, port)
    import train_ddps

    train_ddps.main(argv)


def _metrics_and_cache(folder):
    import json

    from engine.evaluator import read_cache

    with open(folder / "metrics.json") as f:
        metrics = json.load(f)
    metrics.pop("inference_seconds")
    return metrics, read_cache(str(folder / "eval_cache.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["CUHK-SYSU", "PRW"])
def test_two_process_evaluation_equals_one_process(tmp_path, dataset):
    from engine.raw_outputs import KEYS
    from models import build_model
    from tests.helpers import mini_world
    import train_ddps

    synthetic_root = mini_world(tmp_path / "world")
    # an untrained model with every detection kept: many boxes and features per image to compare
    opts = dict(MODEL__ROI_HEAD__SCORE_THRESH_TEST=0.0, EVAL_GALLERY_SIZE=50)
    cfg = small_cfg(synthetic_root, dataset, tmp_path, **opts)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, ckpt)
    argv = lambda out: ["--eval", "--ckpt", str(ckpt)] + small_opts(synthetic_root, dataset, out, **opts)  # noqa: E731

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        train_ddps.main(argv(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_eval_worker, args=(WORLD, _free_port(), argv(tmp_path / "two")), nprocs=WORLD, join=True)

    one_metrics, one = _metrics_and_cache(tmp_path / "one")
    two_metrics, two = _metrics_and_cache(tmp_path / "two")
    assert two_metrics == one_metrics
    assert one_metrics["num_gallery_images"] > 2 * WORLD
    n_boxes = sum(len(d) for d in one["gallery_dets"])
    assert n_boxes > 5 * one_metrics["num_gallery_images"]  # not a comparison of empty outputs
    for key in KEYS:
        assert len(one[key]) == len(two[key])
        for a, b in zip(one[key], two[key]):
            assert a.shape == b.shape and np.array_equal(a, b), key
    assert one.meta == two.meta
