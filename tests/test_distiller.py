"""The distiller (SPEC 6, 6.1): a frozen teacher, the student and the registered terms.

- data flow: the teacher is frozen, gradients reach the student and every term's parts only, and
  the teacher computes only what the configured terms declare, once;
- properties instead of re-running the distiller's own calls: a teacher that is an exact copy of
  the student gives LD = CD = 0 and DFD fg = bg = attention = 0; the config's weights and
  thresholds change the terms as their formulas say (hand-computed on small records);
- every term's learnable parts are in the optimizer and move in one step; checkpoints hold the
  student and every term's state ({"student", "fgd", ...}) and resume is bitwise exact;
- the registry and the config's method names, and their error paths.
"""
import copy
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_ddps
from configs import ConfigError, load_config
from engine.build import build_distiller, build_eval_model
from engine.schedule import build_optimizer
from models import build_model
from models.checkpoint import CheckpointMismatchError
from models.distill import (LEGACY_TYPES, TERMS, CDTerm, DFDTerm, Distiller, DistillTerm, LDTerm, TeacherOutputs,
                            build_terms, known_terms, register_term, term_names)
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.helpers import small_opts, state_dicts_equal, straight_and_resumed

TEACHER = "resnet18_x05"  # CPU-sized; SPEC's teacher is resnet50, the wiring is the same
STUDENT = "resnet18_x05"
DFD_LOSSES = {f"loss_fgd_fpn_layer_{i}" for i in range(4)}


def quiet(*args, **kwargs):
    pass


def distill_opts(world, teacher_ckpt, output_dir=None, frozen_bn=False, **overrides):
    opts = small_opts(world, output_dir=output_dir, **overrides)
    opts += ["BASELINE.PROJECT", "False", "DISTILLER.PROJECT", "True", "DISTILLER.TYPE", "FGD_DKD_Relation",
             "DISTILLER.TEACHER.BACKBONE_NAME", TEACHER, "DISTILLER.TEACHER.BACKBONE_PRETRAIN", "False",
             "DISTILLER.TEACHER.FROZENBN2d", str(frozen_bn), "DISTILLER.TEACHER.CKPT", str(teacher_ckpt),
             "DISTILLER.STUDENT.BACKBONE_NAME", STUDENT, "DISTILLER.STUDENT.BACKBONE_PRETRAIN", "False",
             "DISTILLER.STUDENT.FROZENBN2d", str(frozen_bn)]
    return opts


@pytest.fixture(scope="module")
def teacher_ckpt(synthetic_root, tmp_path_factory):
    """A teacher checkpoint in the original single-model layout, with non-trivial OIM tables."""
    torch.manual_seed(0)
    cfg = load_config(None, small_opts(synthetic_root, BASELINE__BACKBONE_NAME=TEACHER))
    teacher = build_model(cfg)
    lut = torch.nn.functional.normalize(torch.randn_like(teacher.roi_heads.reid_loss.lut), dim=1)
    cq = torch.nn.functional.normalize(torch.randn_like(teacher.roi_heads.reid_loss.cq), dim=1)
    teacher.roi_heads.reid_loss.lut.copy_(lut)
    teacher.roi_heads.reid_loss.cq.copy_(cq)
    path = tmp_path_factory.mktemp("teacher") / "epoch_19.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 19}, path)
    return path


def batch(cfg, n=2):
    from datasets import build_dataset
    from datasets.transforms import build_transforms

    ds = build_dataset("CUHK-SYSU", cfg.INPUT.DATA_ROOT, build_transforms(False), "train")
    items = [ds[i] for i in range(n)]
    return [im for im, _ in items], [t for _, t in items]


STUDENT_SEED = 11  # not the teacher fixture's seed: the student must differ from that teacher


def seeded_losses(cfg, seed=5, prepare=None):
    """Losses of one forward of a freshly built distiller (same student init and sampling for the
    same seed, whatever the config), as floats."""
    torch.manual_seed(STUDENT_SEED)
    distiller = build_distiller(cfg, log=quiet)
    distiller.train()
    if prepare is not None:
        prepare(distiller)
    images, targets = batch(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        losses = distiller(images, targets)
    return {k: float(v) for k, v in losses.items()}


# ----------------------------------------------------------------------------------------------
# data flow


def test_teacher_frozen_and_gradients_reach_student_and_terms_only(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt))
    distiller = build_distiller(cfg, log=quiet)
    distiller.train()
    assert not distiller.teacher.training, "the teacher must stay in eval mode"
    assert list(distiller.terms) == ["dfd", "ld", "cd"]
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    images, targets = batch(cfg)
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        losses = distiller(images, targets)
        assert DFD_LOSSES | {"loss_ld", "loss_cd"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in distiller.teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
        dfd_grads = [p.grad for p in distiller.terms["dfd"].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in dfd_grads)
        opt.step()
    # weights, BatchNorm statistics and OIM tables of the teacher are untouched
    after = distiller.teacher.state_dict()
    assert [k for k, v in teacher_before.items() if not torch.equal(v, after[k])] == []
    assert torch.equal(after["roi_heads.reid_loss.lut"], torch.load(teacher_ckpt)["model"]["roi_heads.reid_loss.lut"])


class _FeaturesOnly(DistillTerm):
    """A term of this test module (registered by the fixture below): needs the FPN maps only."""

    needs = frozenset({"features"})

    @classmethod
    def from_config(cls, cfg, student_channels, teacher_channels):
        return cls()

    def forward(self, student, teacher):
        return {"loss_test_features": (student.features["0"] - teacher.features["0"]).pow(2).mean()}


@pytest.fixture
def features_only_term():
    """`_FeaturesOnly` registered as "test_features_only" for one test, then removed again."""
    register_term("test_features_only")(_FeaturesOnly)
    yield "test_features_only"
    TERMS.pop("test_features_only")


def _count_calls(monkeypatch, obj, name, calls):
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)


@pytest.mark.parametrize("terms, expected", [
    ("['test_features_only']", {"extract_features": 1}),
    ("['dfd', 'ld', 'cd', 'test_features_only']",
     {"extract_features": 1, "proposal_logits": 1, "box_embeddings": 1, "logits": 1}),
])
def test_teacher_computes_each_declared_output_once(synthetic_root, teacher_ckpt, monkeypatch, features_only_term,
                                                   terms, expected):
    """A term needing the FPN maps only does not make the teacher run its RoI heads; with several
    terms, each teacher output is computed once per step."""
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TERMS", terms])
    distiller = build_distiller(cfg, log=quiet).train()
    teacher, calls = distiller.teacher, {}
    _count_calls(monkeypatch, teacher, "extract_features", calls)
    for name in ("proposal_logits", "box_embeddings"):
        _count_calls(monkeypatch, teacher.roi_heads, name, calls)
    _count_calls(monkeypatch, teacher.roi_heads.reid_loss, "logits", calls)
    images, targets = batch(cfg)
    losses = distiller(images, targets)
    assert calls == expected
    assert "loss_test_features" in losses


def test_undeclared_teacher_output_is_an_error():
    outputs = TeacherOutputs({"features": {}})
    assert outputs.features == {}
    with pytest.raises(AttributeError, match="proposal_logits.*not computed.*needs"):
        outputs.proposal_logits


# ----------------------------------------------------------------------------------------------
# properties of the DDPS terms


def copy_teacher_ckpt(cfg, path):
    """A teacher checkpoint that is an exact copy of the student the distiller of `cfg` builds
    in `seeded_losses`."""
    torch.manual_seed(STUDENT_SEED)
    student = build_model(cfg, role="student")
    torch.save({"model": student.state_dict()}, path)
    return path


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_teacher_identical_to_the_student_gives_zero_terms(synthetic_root, tmp_path, temperature):
    """With FrozenBatchNorm2d (identical in train and eval mode) and the student's embedding head
    in eval mode (its BatchNorm1d then uses the same statistics as the teacher's), the teacher's
    outputs equal the student's: LD = 0, CD = 0, DFD's fg = bg = attention = 0 on every level."""
    base = distill_opts(synthetic_root, "unused", frozen_bn=True)
    cfg = load_config(None, base)
    ckpt = copy_teacher_ckpt(cfg, tmp_path / "copy.pth")

    def student_heads_eval(distiller):
        distiller.student.roi_heads.embedding_head.eval()

    for component, key in (("fg", "ALPHA_FGD"), ("bg", "BATE_FGD"), ("attention", "GAMMA_FGD")):
        weights = {k: "0.0" for k in ("ALPHA_FGD", "BATE_FGD", "GAMMA_FGD", "LAMBDA_FGD")}
        weights[key] = "1.0"
        opts = distill_opts(synthetic_root, ckpt, frozen_bn=True) + ["DKD.T", str(temperature)]
        for k, v in weights.items():
            opts += [f"FGD.{k}", v]
        losses = seeded_losses(load_config(None, opts), prepare=student_heads_eval)
        for name in DFD_LOSSES:
            assert abs(losses[name]) < 1e-8, (component, name, losses[name])
        assert abs(losses["loss_ld"]) < 1e-7 and abs(losses["loss_cd"]) < 1e-7


@pytest.mark.filterwarnings("ignore:ignoring .* num_batches_tracked")  # a BatchNorm teacher, frozen here
def test_ddps_terms_are_not_zero_with_another_teacher(synthetic_root, teacher_ckpt):
    """The counterpart of the zero test: the same student, heads in eval mode, another teacher."""
    losses = seeded_losses(load_config(None, distill_opts(synthetic_root, teacher_ckpt, frozen_bn=True)),
                           prepare=lambda d: d.student.roi_heads.embedding_head.eval())
    assert all(losses[n] > 1e-4 for n in DFD_LOSSES)
    assert losses["loss_ld"] > 1e-4 and losses["loss_cd"] > 1e-4


def test_ld_config_alpha_beta_weight(synthetic_root, teacher_ckpt):
    """LD = DKD.WEIGHT * (ALPHA * TCKD + BETA * NCKD), and NCKD = 0 for two classes."""
    base = distill_opts(synthetic_root, teacher_ckpt)
    ref = seeded_losses(load_config(None, base))["loss_ld"]
    assert ref > 1e-4
    assert seeded_losses(load_config(None, base + ["DKD.ALPHA", "2.0"]))["loss_ld"] == pytest.approx(2 * ref, rel=1e-5)
    assert seeded_losses(load_config(None, base + ["DKD.BETA", "7.0"]))["loss_ld"] == pytest.approx(ref, rel=1e-6)
    assert seeded_losses(load_config(None, base + ["DKD.WEIGHT", "3.0"]))["loss_ld"] == pytest.approx(3 * ref, rel=1e-5)
    assert seeded_losses(load_config(None, base + ["DKD.T", "1.0"]))["loss_ld"] != pytest.approx(ref, rel=1e-3)


def _binary_kl_ld(logits_s, logits_t, labels, temperature, alpha):
    """alpha * T^2 * mean_n KL(p_t || p_s), softmax at temperature T, written from SPEC 6."""
    total = 0.0
    for zs, zt, y in zip(logits_s.tolist(), logits_t.tolist(), labels.tolist()):
        ps = np.exp(np.array(zs) / temperature)
        ps /= ps.sum()
        pt = np.exp(np.array(zt) / temperature)
        pt /= pt.sum()
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        total += sum(t * (np.log(t) - np.log(s)) for s, t in zip(bs, bt))
    return alpha * temperature ** 2 * total / len(labels)


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 1.5), (4.0, 0.5)])
def test_ld_term_follows_its_config_by_hand(synthetic_root, temperature, alpha):
    cfg = load_config(None, small_opts(synthetic_root) + ["DKD.T", str(temperature), "DKD.ALPHA", str(alpha)])
    term = LDTerm.from_config(cfg, 256, 256)
    logits_s = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]])
    logits_t = torch.tensor([[1.1, -0.4], [0.2, 0.9], [-2.0, 1.5]])
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    student = SimpleNamespace(proposal_logits=logits_s, proposal_labels=labels)
    loss = term(student, TeacherOutputs({"proposal_logits": logits_t}))["loss_ld"]
    assert float(loss) == pytest.approx(_binary_kl_ld(logits_s, logits_t, torch.cat(labels), temperature, alpha),
                                        rel=1e-5)


def _cd_record():
    """One image: A and B (pid 1, IoU 0.8, A scored higher by the teacher), C (pid 2), D background."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [20.0, 0.0, 30.0, 10.0],
                          [40.0, 0.0, 50.0, 10.0]])
    labels = torch.tensor([1, 1, 2, 0])
    emb_s = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    emb_t = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    # teacher OIM logits of the three person boxes: columns = LUT (3) + CQ (2)
    oim = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0, 0.0]])
    student = SimpleNamespace(reid_boxes=[boxes], reid_labels=[labels], embeddings=emb_s)
    teacher = TeacherOutputs({"box_embeddings": emb_t, "oim_logits": oim})
    return student, teacher, emb_s, emb_t


def _gram_distance(es, et, rows):
    es, et = es[rows].double().numpy(), et[rows].double().numpy()
    return float(((es @ es.T - et @ et.T) ** 2).sum())


@pytest.mark.parametrize("nms, weight, rows", [(0.7, 0.01, [0, 2]), (0.9, 0.01, [0, 1, 2]), (0.7, 0.5, [0, 2])])
def test_cd_term_follows_its_config_by_hand(synthetic_root, nms, weight, rows):
    """GRAPHRELA.NMSTHRES decides whether B (IoU 0.8 with the better-scored A, same id) is kept;
    GRAPHRELA.WEIGHT multiplies the sum of squared differences of the kept people's similarity
    matrices; background boxes never enter."""
    cfg = load_config(None, small_opts(synthetic_root, MODEL__LOSS__LUT_SIZE=3, MODEL__LOSS__CQ_SIZE=2)
                      + ["GRAPHRELA.NMSTHRES", str(nms), "GRAPHRELA.WEIGHT", str(weight)])
    term = CDTerm.from_config(cfg, 256, 256)
    student, teacher, emb_s, emb_t = _cd_record()
    loss = term(student, teacher)["loss_cd"]
    assert float(loss) == pytest.approx(weight * _gram_distance(emb_s, emb_t, rows), rel=1e-5)


def test_cd_weight_scales_the_distilled_term(synthetic_root, teacher_ckpt):
    base = distill_opts(synthetic_root, teacher_ckpt)
    ref = seeded_losses(load_config(None, base))["loss_cd"]
    assert ref > 0
    scaled = seeded_losses(load_config(None, base + ["GRAPHRELA.WEIGHT", "0.5"]))["loss_cd"]
    assert scaled == pytest.approx(50 * ref, rel=1e-5)


def test_dfd_weights_combine_its_four_components(synthetic_root, teacher_ckpt):
    """Each level's DFD loss = FGD.WEIGHT * (ALPHA fg + BATE bg + GAMMA attention + LAMBDA global):
    the components measured one at a time (unit weight, others 0) recombine into the loss of
    arbitrary weights."""
    base = distill_opts(synthetic_root, teacher_ckpt)
    keys = ("ALPHA_FGD", "BATE_FGD", "GAMMA_FGD", "LAMBDA_FGD")

    def run(weights, extra=()):
        opts = base + list(extra)
        for k, v in zip(keys, weights):
            opts += [f"FGD.{k}", str(v)]
        return seeded_losses(load_config(None, opts))

    parts = [run([1.0 if i == j else 0.0 for j in range(4)]) for i in range(4)]
    weights = (3e-3, 2e-2, 5e-4, 7e-6)
    mixed = run(weights, ["FGD.WEIGHT", "2.0"])
    for name in DFD_LOSSES:
        assert all(p[name] > 0 for p in parts), name
        expected = 2.0 * sum(w * p[name] for w, p in zip(weights, parts))
        assert mixed[name] == pytest.approx(expected, rel=1e-4), name


# ----------------------------------------------------------------------------------------------
# every term: optimizer, checkpoints, resume


def all_terms_opts(world, teacher_ckpt, output_dir=None, **overrides):
    names = known_terms()
    return distill_opts(world, teacher_ckpt, output_dir, **overrides) + ["DISTILLER.TERMS", str(names)], names


# A bias added before a softmax over positions (DFD's context-mask convs, C -> 1) cannot change a
# softmax: its gradient is identically zero, in the original too. Everything else must learn.
NO_GRADIENT_BY_CONSTRUCTION = ("conv_mask_s.bias", "conv_mask_t.bias")


def test_every_learnable_part_of_every_term_is_trained(synthetic_root, teacher_ckpt):
    """The optimizer built by training gets every parameter of every term, and within two steps
    each receives a gradient and moves (a part the optimizer never sees, as ReviewKD's ABF modules
    in the original, would stay at its initial value). Two steps: DFD's zero-initialised last
    context conv passes no gradient to the layers before it in the first step."""
    opts, names = all_terms_opts(synthetic_root, teacher_ckpt)
    cfg = load_config(None, opts)
    distiller = build_distiller(cfg, log=quiet).train()
    assert list(distiller.terms) == names
    optimizer = build_optimizer(cfg, distiller.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = {f"{n}.{pn}": p for n, t in distiller.terms.items() for pn, p in t.named_parameters()}
    missing = [k for k, p in params.items() if id(p) not in in_optimizer]
    assert missing == [], "not given to the optimizer"
    assert not any(id(p) in in_optimizer for p in distiller.teacher.parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    had_gradient = dict.fromkeys(params, False)
    images, targets = batch(cfg)
    for _ in range(2):
        losses = distiller(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        for k, p in params.items():
            had_gradient[k] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        optimizer.step()
    no_gradient = [k for k, v in had_gradient.items() if not v and not k.endswith(NO_GRADIENT_BY_CONSTRUCTION)]
    assert no_gradient == []
    assert [k for k, v in before.items() if torch.equal(v, params[k])
            and not k.endswith(NO_GRADIENT_BY_CONSTRUCTION)] == []


def test_checkpoint_layout_and_student_evaluation(synthetic_root, teacher_ckpt, tmp_path):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt, output_dir=tmp_path))
    distiller = build_distiller(cfg, log=quiet)
    state = distiller.checkpoint_state()
    assert set(state) == {"student", "fgd"}  # the original's layout
    assert set(state["fgd"]) == DFD_LOSSES
    assert "conv_mask_s.weight" in state["fgd"]["loss_fgd_fpn_layer_0"]
    path = tmp_path / "epoch_0.pth"
    torch.save({"model": state, "epoch": 0}, path)
    # evaluation needs no teacher: point the teacher at nothing and load the student alone
    eval_cfg = load_config(None, distill_opts(synthetic_root, "/nonexistent/teacher.pth", output_dir=tmp_path))
    model, info = build_eval_model(eval_cfg, str(path), torch.device("cpu"), log=quiet)
    assert info["role"] == "student"
    assert state_dicts_equal(model.state_dict(), distiller.student.state_dict()) == []


def test_every_term_round_trips_through_a_checkpoint(synthetic_root, teacher_ckpt):
    opts, names = all_terms_opts(synthetic_root, teacher_ckpt)
    cfg = load_config(None, opts)
    torch.manual_seed(1)
    trained = build_distiller(cfg, log=quiet).train()
    images, targets = batch(cfg)
    optimizer = build_optimizer(cfg, trained.parameters())
    sum(trained(images, targets).values()).backward()
    optimizer.step()  # moves every part (and BatchNorm statistics) away from a fresh build
    state = copy.deepcopy(trained.checkpoint_state())
    keys = {trained.terms[n].state_key for n in names if len(trained.terms[n].state_dict())}
    assert set(state) == {"student"} | keys and "fgd" in keys
    torch.manual_seed(2)
    fresh = build_distiller(cfg, log=quiet)
    assert state_dicts_equal(fresh.checkpoint_state(), state) != []
    fresh.load_checkpoint_state(state)
    assert state_dicts_equal(fresh.checkpoint_state(), state) == []
    # a checkpoint of other terms is refused, naming the parts
    other = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TERMS", "['ld', 'cd']"])
    with pytest.raises(CheckpointMismatchError, match="fgd"):
        build_distiller(other, log=quiet).load_checkpoint_state(state)


def test_resume_with_every_term_reproduces_an_uninterrupted_run(synthetic_root, teacher_ckpt, tmp_path, monkeypatch):
    """2 epochs straight vs 1 epoch, a crash and --resume: the final checkpoints are bitwise equal,
    every term's parts and the RNG (MGD's masks) included."""
    monkeypatch.setattr(train_ddps, "evaluate", lambda *a, **k: None)
    common = dict(SOLVER__MAX_EPOCHS=2, SOLVER__MAX_ITERS_PER_EPOCH=1, SOLVER__BASE_LR=0.01, SEED=5)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts_s, _ = all_terms_opts(synthetic_root, teacher_ckpt, straight, **common)
    opts_r, _ = all_terms_opts(synthetic_root, teacher_ckpt, resumed, **common)
    a, b, first = straight_and_resumed(opts_s, opts_r, resumed, monkeypatch)
    assert state_dicts_equal(a, b) == []
    assert state_dicts_equal(first["model"], a["model"]) != []  # the run moved in between


def test_short_distillation_run_end_to_end(synthetic_root, teacher_ckpt, tmp_path):
    import json

    out = tmp_path / "run"
    opts = distill_opts(synthetic_root, teacher_ckpt, output_dir=out, SOLVER__MAX_ITERS_PER_EPOCH=2)
    metrics = train_ddps.main(opts)
    assert os.path.isfile(out / "epoch_0.pth")
    ckpt = torch.load(out / "epoch_0.pth", weights_only=True)
    assert set(ckpt["model"]) == {"student", "fgd"}
    saved = json.load(open(out / "metrics.json"))
    for k in ("det_recall", "det_ap", "mAP", "top1", "top5", "top10"):
        assert 0.0 <= saved[k] <= 1.0
    assert metrics["mAP"] == saved["mAP"]


# ----------------------------------------------------------------------------------------------
# registry, method names, error paths


def test_original_type_names_select_their_terms(synthetic_root, teacher_ckpt):
    expected = {"FGD_DKD_Relation": ["dfd", "ld", "cd"], "PKD": ["pkd"], "PKD_DKD_Relation": ["pkd", "ld", "cd"],
                "ReviewKD": ["reviewkd"], "ReviewKD_DKD_Relation": ["reviewkd", "ld", "cd"], "NONE": []}
    for type_name, terms in expected.items():
        assert list(LEGACY_TYPES[type_name]) == terms
        if all(t in TERMS for t in terms):
            cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TYPE", type_name])
            assert term_names(cfg) == terms
    # the switches of earlier versions still remove a DDPS term; TERMS overrides TYPE
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DKD.ENABLED", "False"])
    assert term_names(cfg) == ["dfd", "cd"]
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TERMS", "['cd', 'dfd']"])
    assert term_names(cfg) == ["cd", "dfd"]


def test_unknown_method_names_stop_at_config_load(synthetic_root, teacher_ckpt):
    with pytest.raises(ConfigError, match=r"DISTILLER.TYPE: unknown 'Det'; known: NONE, FGD_DKD_Relation"):
        load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TYPE", "Det"])
    with pytest.raises(ConfigError, match=r"DISTILLER.TERMS: unknown 'fgd'; known: .*\bcd\b.*\bdfd\b.*\bld\b"):
        load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TERMS", "['fgd']"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TERMS", "['ld', 'ld']"])


def test_registry_error_paths():
    with pytest.raises(TypeError, match="not a DistillTerm"):
        register_term("test_not_a_term")(object)
    with pytest.raises(ValueError, match="already registered"):
        register_term("dfd")(_FeaturesOnly)
    assert TERMS["dfd"] is DFDTerm and "test_not_a_term" not in TERMS
    with pytest.raises(ValueError, match="unknown 'nope'"):
        build_terms(None, ["nope"], 256, 256)
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(torch.nn.Linear(1, 1), None, {"x": _FeaturesOnly()})


def test_dfd_channels_must_fit_the_fpn(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["FGD.STUDENT_CHANNELS", "[128, 256, 256, 256]"])
    with pytest.raises(ValueError, match=r"FGD.STUDENT_CHANNELS\[0\].*128.*256"):
        build_distiller(cfg, log=quiet)


def test_no_term_trains_the_student_alone(synthetic_root, tmp_path):
    cfg = load_config(None, distill_opts(synthetic_root, tmp_path / "not_needed.pth") + ["DISTILLER.TYPE", "NONE"])
    distiller = build_distiller(cfg, log=quiet)
    assert distiller.teacher is None and len(distiller.terms) == 0
    images, targets = batch(cfg)
    assert set(distiller.train()(images, targets)) == {"loss_rpn_reg", "loss_rpn_cls", "loss_proposal_reg",
                                                        "loss_proposal_cls", "loss_box_reid"}


def test_missing_teacher_checkpoint(synthetic_root, tmp_path):
    cfg = load_config(None, distill_opts(synthetic_root, tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth.*DISTILLER.TEACHER.CKPT"):
        build_distiller(cfg, log=quiet)
    cfg = load_config(None, distill_opts(synthetic_root, ""))
    with pytest.raises(ValueError, match="DISTILLER.TEACHER.CKPT is empty"):
        build_distiller(cfg, log=quiet)


def test_teacher_of_another_architecture(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TEACHER.BACKBONE_NAME", "resnet18"])
    with pytest.raises(CheckpointMismatchError, match=r"teacher checkpoint .*epoch_19.pth does not fit.*resnet18"):
        build_distiller(cfg, log=quiet)


def test_teacher_without_oim_tables_is_refused(synthetic_root, teacher_ckpt, tmp_path):
    """The original dropped the teacher's OIM tables; here they are required (CD scores them)."""
    sd = torch.load(teacher_ckpt)["model"]
    sd = {k: v for k, v in sd.items() if not k.startswith("roi_heads.reid_loss.")}
    path = tmp_path / "no_tables.pth"
    torch.save({"model": sd}, path)
    cfg = load_config(None, distill_opts(synthetic_root, path))
    with pytest.raises(CheckpointMismatchError, match="reid_loss.lut"):
        build_distiller(cfg, log=quiet)


def test_a_missing_teacher_stops_training_before_the_data_is_read(synthetic_root, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the training data was read before the teacher checkpoint was checked")

    monkeypatch.setattr(train_ddps, "build_train_loader", no_data)
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="nope.pth.*DISTILLER.TEACHER.CKPT"):
        train_ddps.main(distill_opts(synthetic_root, tmp_path / "nope.pth", output_dir=out))
    assert not out.exists()  # nothing written either
