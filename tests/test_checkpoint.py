"""Tests of models/checkpoint.py: the original's checkpoint layouts and key names (SPEC 4.4),
strict loading, dropping the OIM tables, and atomic saving."""

import os
import re

import pytest
import torch

import models
from models.checkpoint import (CheckpointMismatchError, extract_model_state, load_model_weights,
                               rename_legacy_keys, save_checkpoint)
from tests.test_models import make_batch, make_cfg


def _legacy_names(sd):
    """Rename a current state dict to torchvision 0.12's names (the released checkpoints)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\2",
                   k)
        k = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", k)
        out[k] = v
    return out


def _original(sd):
    """The original's state dict: no header_cq (it kept the queue head out of it)."""
    return {k: v for k, v in sd.items() if k != "roi_heads.reid_loss.header_cq"}


@pytest.fixture(scope="module")
def source_model():
    """A model whose weights and OIM tables differ from a fresh model's."""
    torch.manual_seed(11)
    model = models.build_model(make_cfg("resnet18_x05"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        oim = model.roi_heads.reid_loss
        oim.lut.copy_(torch.nn.functional.normalize(torch.randn_like(oim.lut), dim=1))
        oim.cq.copy_(torch.nn.functional.normalize(torch.randn_like(oim.cq), dim=1))
        oim.header_cq.fill_(3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def source_outputs(source_model):
    return _outputs(source_model)


def fresh_model():
    torch.manual_seed(12)
    return models.build_model(make_cfg("resnet18_x05")).eval()


def _outputs(model):
    images, targets = make_batch()
    with torch.no_grad():
        return model(images[:1]), model(images, targets)


def _assert_same_state(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


LAYOUTS = ["single", "single_legacy", "distillation", "distillation_legacy", "bare"]


def _payload(sd, layout):
    legacy = layout.endswith("legacy")
    sd = _legacy_names(sd) if legacy else dict(sd)
    if layout.startswith("single"):
        return {"model": sd, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"milestones": {16: 1}}, "epoch": 19}
    if layout.startswith("distillation"):
        fgd = {"loss_fgd_fpn_layer_0": {"conv_mask_s.weight": torch.zeros(1, 256, 1, 1)}}
        return {"model": {"student": sd, "fgd": fgd}, "optimizer": {}, "epoch": 19}
    return sd


@pytest.mark.parametrize("layout", LAYOUTS)
def test_original_layouts_load_strictly_with_identical_outputs(source_model, source_outputs,
                                                               layout, tmp_path):
    payload = _payload(_original(source_model.state_dict()), layout)
    if layout == "distillation_legacy":  # through a file (the others in memory: faster)
        path = tmp_path / "epoch_19.pth"
        torch.save(payload, path)
        payload = str(path)
    model = fresh_model()
    with pytest.warns(UserWarning, match="header_cq"):
        dropped = load_model_weights(model, payload)
    assert dropped == []
    _assert_same_state(model, source_model, skip={"roi_heads.reid_loss.header_cq"})
    assert int(model.roi_heads.reid_loss.header_cq) == 0  # not in the original: reset, said so
    (dets_a, q_a), (dets_b, q_b) = _outputs(model), source_outputs
    for a, b in zip(dets_a, dets_b):
        for k in ("boxes", "scores", "embeddings"):
            assert torch.equal(a[k], b[k]), k
    for a, b in zip(q_a, q_b):
        assert torch.equal(a, b)


def test_own_checkpoint_keeps_the_queue_head(source_model, tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"model": source_model.state_dict(), "epoch": 3})
    model = fresh_model()
    assert load_model_weights(model, path) == []
    _assert_same_state(model, source_model)
    assert int(model.roi_heads.reid_loss.header_cq) == 3
    # an already loaded object works too
    model2 = fresh_model()
    load_model_weights(model2, torch.load(path, weights_only=True))
    _assert_same_state(model2, source_model)


def test_legacy_key_rules():
    sd = {"backbone.fpn.inner_blocks.2.weight": torch.zeros(1),
          "backbone.fpn.layer_blocks.3.bias": torch.zeros(1),
          "rpn.head.conv.weight": torch.zeros(1), "rpn.head.cls_logits.weight": torch.zeros(1),
          "backbone.body.layer1.0.conv1.weight": torch.zeros(1)}
    out, changed = rename_legacy_keys(sd)
    assert list(out) == ["backbone.fpn.inner_blocks.2.0.weight",
                         "backbone.fpn.layer_blocks.3.0.bias", "rpn.head.conv.0.0.weight",
                         "rpn.head.cls_logits.weight", "backbone.body.layer1.0.conv1.weight"]
    assert changed == 3
    # DataParallel prefix
    out, _ = rename_legacy_keys({"module." + k: v for k, v in sd.items()})
    assert "rpn.head.conv.0.0.weight" in out
    state, layout = extract_model_state({"model": {"student": sd, "fgd": {}}})
    assert layout == "distillation" and set(state) == set(sd)
    with pytest.raises(CheckpointMismatchError, match="no model state dict"):
        extract_model_state({"epoch": 3})


def test_missing_unexpected_and_mismatched_keys_are_errors(source_model):
    sd = dict(source_model.state_dict())
    model = fresh_model()

    broken = dict(sd)
    del broken["roi_heads.box_head.fc6.bias"]
    broken["roi_heads.extra.weight"] = torch.zeros(3)
    broken["rpn.head.cls_logits.weight"] = torch.zeros(6, 256, 1, 1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(model, {"model": broken})
    msg = str(err.value)
    assert "missing 1 keys: roi_heads.box_head.fc6.bias" in msg
    assert "unexpected 1 keys: roi_heads.extra.weight" in msg
    assert "rpn.head.cls_logits.weight (checkpoint (6, 256, 1, 1) vs model (3, 256, 1, 1))" in msg
    assert err.value.missing == ["roi_heads.box_head.fc6.bias"]
    assert err.value.unexpected == ["roi_heads.extra.weight"]
    assert err.value.mismatched == ["rpn.head.cls_logits.weight"]
    assert not err.value.only_under("roi_heads.")
    # nothing was loaded
    assert not torch.equal(model.rpn.head.conv[0][0].weight, source_model.rpn.head.conv[0][0].weight)

    # many missing keys are grouped by prefix
    partial = {k: v for k, v in sd.items() if not k.startswith("backbone.body.layer")}
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.body\.layer1\.\* \(\d+ keys\)"):
        load_model_weights(model, partial)


def test_drop_prefixes_for_tables_that_do_not_fit(source_model):
    sd = dict(source_model.state_dict())
    # an original PRW checkpoint: tables sized 482/500 while the model's class map needs another
    sd["roi_heads.reid_loss.lut"] = torch.zeros(482, 256)
    sd["roi_heads.reid_loss.cq"] = torch.zeros(500, 256)
    del sd["roi_heads.reid_loss.header_cq"]
    model = fresh_model()
    own_lut = model.roi_heads.reid_loss.lut.clone()
    with pytest.raises(CheckpointMismatchError, match="roi_heads.reid_loss.lut") as err:
        load_model_weights(model, sd)
    assert err.value.mismatched == ["roi_heads.reid_loss.cq", "roi_heads.reid_loss.lut"]
    assert err.value.only_under("roi_heads.reid_loss.") and not err.value.only_under("backbone.")
    dropped = load_model_weights(model, sd, drop_prefixes=("roi_heads.reid_loss.",))
    assert dropped == ["roi_heads.reid_loss.cq", "roi_heads.reid_loss.lut"]
    assert torch.equal(model.roi_heads.reid_loss.lut, own_lut)
    _assert_same_state(model, source_model, skip={"roi_heads.reid_loss.lut",
                                                  "roi_heads.reid_loss.cq",
                                                  "roi_heads.reid_loss.header_cq"})


@pytest.mark.filterwarnings("ignore:checkpoint has no")
def test_batchnorm_checkpoint_into_frozen_bn_model():
    """A teacher trained with FROZENBN2d False, built with FROZENBN2d True (the DISTILLER.TEACHER
    default): same weights, num_batches_tracked counters ignored, same outputs in eval mode."""
    torch.manual_seed(13)
    trained = models.build_model(make_cfg("resnet18", frozen_bn=False)).eval()
    with torch.no_grad():
        for m in trained.backbone.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = {"model": _legacy_names(_original(trained.state_dict()))}
    frozen = models.build_model(make_cfg("resnet18", frozen_bn=True)).eval()
    with pytest.warns(UserWarning, match="num_batches_tracked"):
        load_model_weights(frozen, ckpt)
    images, targets = make_batch()
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        fa, fb = frozen.extract_features(x), trained.extract_features(x)
        qa, qb = frozen(images, targets), trained(images, targets)
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=1e-4), k
    for a, b in zip(qa, qb):
        assert torch.allclose(a, b, atol=1e-4)
    # the reverse (FrozenBN checkpoint into a BatchNorm model) misses the counters: an error
    with pytest.raises(CheckpointMismatchError, match="num_batches_tracked"):
        load_model_weights(models.build_model(make_cfg("resnet18", frozen_bn=False)),
                           frozen.state_dict())


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out" / "epoch_1.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4)})
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # something reaches the disk, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.arange(8)})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["epoch_1.pth"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["epoch"] == 1

    save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert os.listdir(path.parent) == ["epoch_1.pth"]


class _RunsCode:
    """An object whose unpickling would run code (it writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_files_never_run_code(tmp_path):
    """An original checkpoint's scheduler state (its milestones are a collections.Counter) loads;
    a file holding any other Python object is refused with a message, and nothing in it runs."""
    import collections

    from models.checkpoint import UnsafeCheckpointError, load_checkpoint_file

    ok = tmp_path / "original.pth"
    torch.save({"model": {"w": torch.ones(2)}, "lr_scheduler": {"milestones": collections.Counter({16: 1})},
                "epoch": 19}, ok)
    loaded = load_checkpoint_file(str(ok))
    assert loaded["epoch"] == 19 and loaded["lr_scheduler"]["milestones"] == {16: 1}
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _RunsCode(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match=r"bad.pth holds Python objects .*_RunsCode|bad.pth holds Python objects .*open"):
        load_checkpoint_file(str(bad))
    assert not marker.exists()
