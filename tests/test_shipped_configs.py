"""Every shipped config builds its training module, and every kind of run it describes trains.

Each YAML file under configs/ (the shared files under configs/common/ are only inherited) is
loaded as a user would, with small inputs on the synthetic world, no ImageNet weights (offline)
and, for distillation, a synthetic teacher checkpoint of the architecture the file names. The
training module (the model, or the distiller with its student, teacher and terms) is built from
it; one optimisation step (forward, backward, SGD) runs for each distinct kind of run (method and
student backbone), so that no shipped config can be unrunnable again.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from configs import is_distillation, load_config
from datasets import build_train_loader
from engine.build import build_train_module
from engine.schedule import build_optimizer
from models import build_model
from models.distill import term_names
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "common" not in p.relative_to(CONFIG_DIR).parts)
ROLES = ("BASELINE", "DISTILLER.TEACHER", "DISTILLER.STUDENT")

SMALL = ["INPUT.MIN_SIZE", "96", "INPUT.MAX_SIZE", "128", "INPUT.NUM_WORKERS_TRAIN", "0",
         "INPUT.NUM_WORKERS_TEST", "0", "INPUT.BATCH_SIZE_TRAIN", "2",
         "MODEL.RPN.PRE_NMS_TOPN_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPN_TRAIN", "100",
         "MODEL.ROI_HEAD.BATCH_SIZE_TRAIN", "32", "DEVICE", "cpu"]


def rel(path):
    return str(pathlib.Path(path).relative_to(CONFIG_DIR))


def test_the_file_list_is_complete():
    names = {rel(p) for p in SHIPPED}
    assert len(names) >= 45
    for expected in ("cuhk_sysu/resnet18/ddps.yaml", "cuhk_sysu/resnet18/reviewkd_ld_cd.yaml",
                     "cuhk_sysu/resnet18/cwd.yaml", "prw/resnet18/mgd.yaml",
                     "cuhk_sysu/resnet18/ablation/ld.yaml", "synthetic/table/teacher.yaml"):
        assert expected in names


@pytest.fixture(scope="module")
def teacher_ckpts(tmp_path_factory):
    """Synthetic teacher checkpoints, one per (backbone, BatchNorm kind, OIM table sizes): the
    weights of a freshly built teacher of the config."""
    folder = tmp_path_factory.mktemp("teachers")
    made = {}

    def get(cfg):
        t = cfg.DISTILLER.TEACHER
        key = (t.BACKBONE_NAME, t.FROZENBN2d, cfg.MODEL.LOSS.LUT_SIZE, cfg.MODEL.LOSS.CQ_SIZE)
        if key not in made:
            torch.manual_seed(0)
            path = folder / "{}_{}_{}_{}.pth".format(*key)
            torch.save({"model": build_model(cfg, role="teacher").state_dict()}, path)
            made[key] = str(path)
        return made[key]

    return get


def shipped_cfg(path, synthetic_root, teacher_ckpts, tmp_path):
    raw = load_config(str(path))
    opts = ["INPUT.DATA_ROOT", str(synthetic_root / raw.INPUT.DATASET), "OUTPUT_DIR", str(tmp_path)] + SMALL
    for role in ROLES:
        opts += [role + ".BACKBONE_PRETRAIN", "False"]
    cfg = load_config(str(path), opts, freeze=False)
    if is_distillation(cfg) and term_names(cfg):
        cfg.DISTILLER.TEACHER.CKPT = teacher_ckpts(cfg)
    cfg.freeze()
    return cfg


def kind_of_run(cfg):
    if not is_distillation(cfg):
        return ("single", cfg.BASELINE.BACKBONE_NAME)
    return ("distill", tuple(term_names(cfg)), cfg.DISTILLER.STUDENT.BACKBONE_NAME,
            cfg.DISTILLER.TEACHER.BACKBONE_NAME)


_STEPPED = set()


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_config_builds_and_trains(path, synthetic_root, teacher_ckpts, tmp_path):
    cfg = shipped_cfg(path, synthetic_root, teacher_ckpts, tmp_path)
    device = torch.device("cpu")
    module, eval_model = build_train_module(cfg, device, log=lambda *a: None)
    assert eval_model is (module.student if is_distillation(cfg) else module)
    if is_distillation(cfg):
        assert list(module.terms) == term_names(cfg)
        assert (module.teacher is None) == (not term_names(cfg))
    kind = kind_of_run(cfg)
    if kind in _STEPPED:
        return  # one step per kind of run: building catches the rest
    _STEPPED.add(kind)
    torch.manual_seed(0)
    loader = build_train_loader(cfg)
    images, targets = next(iter(loader))
    module.train()
    optimizer = build_optimizer(cfg, module.parameters())
    losses = module(list(images), list(targets))
    assert losses and all(torch.isfinite(v) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
