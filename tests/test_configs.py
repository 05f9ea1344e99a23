"""Tests of configs/: defaults, merging, errors, dumps, _BASE_ inheritance, the shipped YAML files
(SPEC 2)."""

import glob
import os
import re

import pytest
import yaml

import configs
from configs import (
    BASE_KEY,
    ConfigError,
    UnknownKeyError,
    config_layers,
    dump_config,
    get_default_cfg,
    is_distillation,
    load_config,
    merge_dict,
    model_cfg_for_role,
)
from configs import defaults as defaults_module
# the distillation package registers its check of DISTILLER.TERMS / TYPE with load_config: the
# shipped files are tested with it, as training loads them
from models import distill

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
COMMON_DIR = os.path.join(CONFIG_DIR, "common")
ALL_YAML = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
# configs/common/: shared settings that the experiment files inherit (_BASE_), no experiments
FRAGMENT_YAML = [p for p in ALL_YAML if os.path.dirname(p) == COMMON_DIR]
EXPERIMENT_YAML = [p for p in ALL_YAML if p not in FRAGMENT_YAML]
REAL_YAML = [p for p in EXPERIMENT_YAML if os.sep + "synthetic" + os.sep not in p]
SYNTHETIC_YAML = [p for p in ALL_YAML if os.path.dirname(p) == os.path.join(CONFIG_DIR, "synthetic")]
# experiment families on the synthetic world with their own sizes: the quickstart
# (tools/quickstart.py) and the miniature table (tools/reproduce_table.py)
SYNTHETIC_FAMILY_YAML = [p for p in ALL_YAML if os.sep + "synthetic" + os.sep in p and p not in SYNTHETIC_YAML]
# terms that shipped files name but that may not be registered yet (their modules are added
# separately): a file naming one cannot pass load_config's term check until they are
PENDING_TERMS = {"cwd", "mgd"} - set(distill.TERMS)


def rel(path):
    return os.path.relpath(path, CONFIG_DIR)


def merged_unchecked(path):
    """The merged config of a file, without load_config's checks of choices and terms."""
    cfg = get_default_cfg()
    for _, source, data in config_layers(path):
        merge_dict(cfg, data, source)
    cfg.freeze()
    return cfg


def pending_terms(path):
    return sorted(set(merged_unchecked(path).DISTILLER.TERMS) & PENDING_TERMS)


def shipped(path):
    """A shipped file's merged config: load_config's, or (for a file naming a term that is not
    registered yet) the same merge without the term check, so that its values are still tested."""
    if pending_terms(path):
        return merged_unchecked(path)
    return load_config(path)


def skip_if_pending(path):
    missing = pending_terms(path)
    if missing:
        pytest.skip("distillation term(s) {} not registered yet (models.distill.TERMS)".format(
            ", ".join(missing)))


def cfg_of(relpath, opts=()):
    path = os.path.join(CONFIG_DIR, relpath)
    if not opts:
        return shipped(path)
    return load_config(path, opts)


def flat(d, prefix=""):
    """{dotted key: leaf value} of a nested dict (or CfgNode)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# A config.yaml as the original code dumps it (yacs: sorted keys, tuples written as lists) for the
# CUHK-SYSU ResNet-18 DDPS experiment. Every key of SPEC 2's list, original values. The keys SPEC 2
# gives no value for (BACKBONE_NECK, the *_CHANNEL legacy keys, PRETRAINED, ...) hold made-up
# values whose types differ from our defaults: they must load whatever they hold.
ORIGINAL_DUMP = """\
BASELINE:
  BACKBONE_NAME: resnet50
  BACKBONE_NECK: FPN
  BACKBONE_OUTCHANNEL:
  - 256
  - 256
  - 256
  - 256
  BACKBONE_PRETRAIN: true
  BBOXREG_INCHANNEL: 1024
  FASTERHEAD_INCHANNEL: 256
  FREEZE: true
  FROZENBN2d: true
  NAE_INCHANNEL:
  - 256
  - 1024
  PROJECT: false
  RES5HEAD_OUTCHANNEL: 2048
  RETURNED_LAYERS:
  - 1
  - 2
  - 3
  - 4
  TRAINABLE_LABYER: 5
  TYPE: baseline
CKPT_PERIOD: 1
DETKD:
  FROM_T: false
  T: 4
  WARMUP: 20
DEVICE: cuda
DISP_PERIOD: 10
DISTILLER:
  INIT_STUDENT: false
  PROJECT: true
  STUDENT:
    BACKBONE_NAME: resnet18
    BACKBONE_NECK: FPN
    BACKBONE_OUTCHANNEL:
    - 256
    - 256
    - 256
    - 256
    BACKBONE_PRETRAIN: true
    BBOXREG_INCHANNEL: 1024
    CKPT: ''
    FASTERHEAD_INCHANNEL: 256
    FREEZE: true
    FROZENBN2d: false
    NAE_INCHANNEL:
    - 256
    - 1024
    PRETRAINED: ''
    RES5HEAD_OUTCHANNEL: 2048
    RETURNED_LAYERS:
    - 1
    - 2
    - 3
    - 4
    TRAINABLE_LABYER: 5
  TEACHER:
    BACKBONE_NAME: resnet50
    BACKBONE_NECK: FPN
    BACKBONE_OUTCHANNEL:
    - 256
    - 256
    - 256
    - 256
    BACKBONE_PRETRAIN: true
    BBOXREG_INCHANNEL: 1024
    CKPT: ./exp_cuhk/teacher_r50/epoch_19.pth
    FASTERHEAD_INCHANNEL: 256
    FREEZE: true
    FROZENBN2d: true
    NAE_INCHANNEL:
    - 256
    - 1024
    PRETRAINED: true
    RES5HEAD_OUTCHANNEL: 2048
    RETURNED_LAYERS:
    - 1
    - 2
    - 3
    - 4
    TRAINABLE_LABYER: 5
  TYPE: FGD_DKD_Relation
DKD:
  ALPHA: 1.0
  BETA: 0.5
  FROM_T: false
  T: 4.0
EVAL_PERIOD: 1
EVAL_USE_CACHE: false
EVAL_USE_CBGM: false
EVAL_USE_GT: false
FGD:
  ALPHA_FGD: 5.0e-05
  BATE_FGD: 2.5e-05
  DISTILLER_METHOD_NUMBER: 3
  FIND_UNSUED_PARAMETERS: true
  GAMMA_FGD: 5.0e-05
  LAMBDA_FGD: 5.0e-07
  LW_FGD:
  - 0.1
  - 1
  - 1
  - 0.1
  STUDENT_CHANNELS:
  - 256
  - 256
  - 256
  - 256
  TEACHER_CHANNELS:
  - 256
  - 256
  - 256
  - 256
  TEMP: 0.5
  WARMUP: 20
GRAPHRELA:
  FROM_T: false
  NMSTHRES: 0.7
  WARMUP: 20
  WEIGHT: 0.01
INPUT:
  BATCH_SIZE_TEST: 1
  BATCH_SIZE_TRAIN: 5
  DATASET: CUHK-SYSU
  DATA_ROOT: data/CUHK-SYSU
  MAX_SIZE: 1500
  MIN_SIZE: 900
  NUM_WORKERS_TEST: 1
  NUM_WORKERS_TRAIN: 5
MODEL:
  ANCHOR_ASPECT_RATIOS:
  - &id001
    - 0.5
    - 1.0
    - 2.0
  - *id001
  - *id001
  - *id001
  - *id001
  ANCHOR_SIZES:
  - - 32
  - - 64
  - - 128
  - - 256
  - - 512
  LOSS:
    CQ_SIZE: 5000
    LUT_SIZE: 5532
    OIM_MOMENTUM: 0.5
    OIM_SCALAR: 30.0
  ROI_HEAD:
    BATCH_SIZE_TRAIN: 512
    BN_NECK: true
    DETECTIONS_PER_IMAGE_TEST: 100
    NEG_THRESH_TRAIN: 0.5
    NMS_THRESH_TEST: 0.5
    POS_FRAC_TRAIN: 0.25
    POS_THRESH_TRAIN: 0.5
    SCORE_THRESH_TEST: 0.05
  RPN:
    BATCH_SIZE_TRAIN: 256
    NEG_THRESH_TRAIN: 0.3
    NMS_THRESH: 0.7
    POST_NMS_TOPN_TEST: 1000
    POST_NMS_TOPN_TRAIN: 2000
    POS_FRAC_TRAIN: 0.5
    POS_THRESH_TRAIN: 0.7
    PRE_NMS_TOPN_TEST: 1000
    PRE_NMS_TOPN_TRAIN: 2000
    SCORE_THRESH: 0.0
OUTPUT_DIR: ./exp_cuhk/resnet18_ddps
PKD:
  WEIGHT: 6.0
  WHOLE_FGD: false
  WITHFOCAL: true
REIDKD:
  FROM_T: false
  T: 4
  WARMUP: 20
REVIEWKD:
  WEIGHT: 1.2
SEED: 1
SOLVER:
  BASE_LR: 0.003
  CLIP_GRADIENTS: 10.0
  GAMMA: 0.1
  LR_DECAY_MILESTONES:
  - 16
  LW_BOX_CLS: 1
  LW_BOX_REG: 1
  LW_BOX_REID: 1
  LW_PROPOSAL_CLS: 1
  LW_PROPOSAL_REG: 10
  LW_RPN_CLS: 1
  LW_RPN_REG: 1
  MAX_EPOCHS: 20
  SGD_MOMENTUM: 0.9
  WARMUP_FACTOR: 0.001
  WEIGHT_DECAY: 0.0005
TF_BOARD: true
"""


# ------------------------------------------------------------------------------ defaults
def test_get_default_cfg_is_an_independent_mutable_clone():
    a = get_default_cfg()
    b = get_default_cfg()
    a.SOLVER.BASE_LR = 1.0
    a.MODEL.ANCHOR_SIZES[0].append(99)
    assert b.SOLVER.BASE_LR == 0.003
    assert b.MODEL.ANCHOR_SIZES[0] == [32]
    assert get_default_cfg().MODEL.ANCHOR_SIZES[0] == [32]


def test_spec2_default_values():
    c = get_default_cfg()
    assert c.INPUT.MIN_SIZE == 900 and c.INPUT.MAX_SIZE == 1500
    assert (c.INPUT.BATCH_SIZE_TRAIN, c.INPUT.NUM_WORKERS_TRAIN) == (5, 5)
    assert c.SOLVER.WARMUP_FACTOR == pytest.approx(1e-3)
    assert c.SOLVER.LR_DECAY_MILESTONES == [16]
    assert c.SOLVER.LW_PROPOSAL_REG == 10 and c.SOLVER.CLIP_GRADIENTS == 10.0
    assert c.MODEL.RPN.PRE_NMS_TOPN_TRAIN == 12000 and c.MODEL.RPN.POST_NMS_TOPN_TEST == 300
    assert c.MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST == 300
    assert (c.MODEL.LOSS.LUT_SIZE, c.MODEL.LOSS.CQ_SIZE) == (5532, 5000)
    assert c.MODEL.ANCHOR_SIZES == [[32], [64], [128], [256], [512]]
    assert c.MODEL.ANCHOR_ASPECT_RATIOS == [[0.5, 1.0, 2.0]] * 5
    assert c.BASELINE.PROJECT is True and c.BASELINE.TYPE == "baseline"
    assert c.DISTILLER.PROJECT is False and c.DISTILLER.TYPE == "NONE"
    assert c.DISTILLER.TEACHER.BACKBONE_NAME == "resnet50"
    assert c.DISTILLER.TEACHER.FROZENBN2d is True and c.DISTILLER.STUDENT.FROZENBN2d is True
    assert c.FGD.BATE_FGD == 2.5e-5 and c.FGD.LAMBDA_FGD == 5e-7
    assert c.FGD.TEACHER_CHANNELS == [256] * 4 and c.FGD.LW_FGD == [0.1, 1.0, 1.0, 0.1]
    assert (c.DKD.ALPHA, c.DKD.BETA, c.DKD.T) == (1.0, 0.5, 4.0)
    assert (c.GRAPHRELA.WEIGHT, c.GRAPHRELA.NMSTHRES) == (0.01, 0.7)
    assert (c.PKD.WEIGHT, c.REVIEWKD.WEIGHT) == (6.0, 1.2)
    assert (c.DEVICE, c.SEED, c.OUTPUT_DIR) == ("cuda", 1, "./output")


def test_project_keys_and_their_defaults():
    expected = {
        "BASELINE.BACKBONE_WEIGHTS": "",
        "DISTILLER.TEACHER.BACKBONE_WEIGHTS": "",
        "DISTILLER.STUDENT.BACKBONE_WEIGHTS": "",
        "SOLVER.AMP": "none",
        "SOLVER.MAX_ITERS_PER_EPOCH": -1,
        "INPUT.ANNOTATION_CACHE_DIR": "",
        "SOLVER.ACCUMULATION_STEPS": 1,
        "FGD.ENABLED": True,
        "FGD.WEIGHT": 1.0,
        "DKD.ENABLED": True,
        "DKD.WEIGHT": 1.0,
        "GRAPHRELA.ENABLED": True,
        "DISTILLER.TERMS": [],
        "CWD.TAU": 1.0,
        "CWD.WEIGHT": 10.0,
        "CWD.LEVELS": ["0", "1", "2", "3", "pool"],
        "MGD.ALPHA": 2e-5,
        "MGD.MASK_RATIO": 0.65,
        "MGD.LEVELS": ["0", "1", "2", "3", "pool"],
        "EVAL_START_EPOCH": 10,
        "EVAL_GALLERY_SIZE": 100,
        "EVAL_CROSS_CAMERA": False,
    }
    assert set(configs.PROJECT_KEYS) == set(expected)
    values = flat(get_default_cfg())
    for key, value in expected.items():
        assert values[key] == value and type(values[key]) is type(value), key


def test_every_default_is_a_list_never_a_tuple():
    for key, value in flat(get_default_cfg()).items():
        stack = [value]
        while stack:
            v = stack.pop()
            assert not isinstance(v, tuple), key
            if isinstance(v, list):
                stack.extend(v)


def test_every_key_in_defaults_py_has_a_comment_above_it():
    path = defaults_module.__file__
    lines = open(path).read().splitlines()
    assign = re.compile(r"^\s*(_C(\.[A-Z_0-9a-z]+)+|node\.[A-Za-z_0-9]+) = ")
    checked = 0
    for i, line in enumerate(lines):
        if assign.match(line):
            checked += 1
            assert lines[i - 1].strip().startswith("#"), "no comment above line {}: {}".format(
                i + 1, line.strip())
    assert checked > 100  # the pattern does find the assignments


def test_untyped_and_project_keys_exist():
    keys = set(flat(get_default_cfg()))
    assert set(defaults_module.UNTYPED_KEYS) <= keys
    assert set(configs.PROJECT_KEYS) <= keys
    assert not set(defaults_module.UNTYPED_KEYS) & set(configs.PROJECT_KEYS)


# ------------------------------------------------------------------------------ the original's dump
def test_original_dump_has_exactly_the_original_keys():
    """Defaults = every key of the original release + the project's own keys."""
    original_keys = set(flat(yaml.safe_load(ORIGINAL_DUMP)))
    default_keys = set(flat(get_default_cfg()))
    assert original_keys == default_keys - set(configs.PROJECT_KEYS)


def test_original_dump_loads_unchanged(tmp_path):
    path = write(tmp_path, ORIGINAL_DUMP, "config.yaml")
    cfg = load_config(path)
    for key, value in flat(yaml.safe_load(ORIGINAL_DUMP)).items():
        assert flat(cfg)[key] == value, key
    # what it means
    assert is_distillation(cfg) and cfg.DISTILLER.TYPE == "FGD_DKD_Relation"
    assert model_cfg_for_role(cfg, "student").BACKBONE_NAME == "resnet18"
    assert model_cfg_for_role(cfg, "student").FROZENBN2d is False
    assert model_cfg_for_role(cfg, "teacher").CKPT == "./exp_cuhk/teacher_r50/epoch_19.pth"
    assert cfg.MODEL.ANCHOR_SIZES == [[32], [64], [128], [256], [512]]
    assert cfg.MODEL.ANCHOR_ASPECT_RATIOS == [[0.5, 1.0, 2.0]] * 5
    assert cfg.SOLVER.LW_PROPOSAL_REG == 10.0 and isinstance(cfg.SOLVER.LW_PROPOSAL_REG, float)
    assert cfg.DETKD.T == 4.0
    assert cfg.FGD.BATE_FGD == 2.5e-5 and cfg.FGD.FIND_UNSUED_PARAMETERS is True
    # legacy keys of unknown original type keep whatever the dump held
    assert cfg.BASELINE.BACKBONE_OUTCHANNEL == [256, 256, 256, 256]
    assert cfg.DISTILLER.STUDENT.PRETRAINED == ""
    # the project's own keys keep their defaults
    for key in configs.PROJECT_KEYS:
        assert flat(cfg)[key] == flat(get_default_cfg())[key], key


def test_original_dump_reloads_through_our_dump(tmp_path):
    cfg = load_config(write(tmp_path, ORIGINAL_DUMP, "config.yaml"))
    out = dump_config(cfg, str(tmp_path / "again" / "config.yaml"))
    assert load_config(out) == cfg


# ------------------------------------------------------------------------------ merging, errors
def test_precedence_defaults_file_opts(tmp_path):
    path = write(tmp_path, "SOLVER:\n  BASE_LR: 0.01\n  MAX_EPOCHS: 7\nSEED: 3\n")
    cfg = load_config(path, ["SOLVER.BASE_LR", "0.5", "OUTPUT_DIR", "./somewhere"])
    assert cfg.SOLVER.BASE_LR == 0.5  # opts beat the file
    assert cfg.SOLVER.MAX_EPOCHS == 7 and cfg.SEED == 3  # file beats the defaults
    assert cfg.OUTPUT_DIR == "./somewhere"
    assert cfg.SOLVER.GAMMA == 0.1  # untouched default
    assert load_config(None, ["SEED", "4"]).SEED == 4
    assert load_config(path, ["SEED", "5", "SEED", "6"]).SEED == 6  # last pair wins


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "SOLVER:\n  BASE_LRR: 0.01\n", "my_experiment.yaml")
    with pytest.raises(UnknownKeyError) as e:
        load_config(path)
    msg = str(e.value)
    assert "SOLVER.BASE_LRR" in msg and path in msg and "SOLVER.BASE_LR" in msg  # + a hint
    path = write(tmp_path, "NOPE:\n  A: 1\n", "other.yaml")
    with pytest.raises(UnknownKeyError, match="NOPE") as e:
        load_config(path)
    assert "other.yaml" in str(e.value)


def test_unknown_key_on_command_line_names_key_and_source():
    for key in ("SOLVER.BASE_LRR", "SOLVR.BASE_LR", "SEED.X", "NOPE"):
        with pytest.raises(UnknownKeyError) as e:
            load_config(None, [key, "1"])
        assert key in str(e.value) and "command line" in str(e.value)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ConfigError)


def test_odd_length_opts_is_an_error():
    with pytest.raises(ConfigError, match="odd") as e:
        load_config(None, ["SOLVER.BASE_LR", "0.1", "SEED"])
    assert "'SEED' has no value" in str(e.value)


def test_section_given_a_value_or_value_given_a_section(tmp_path):
    with pytest.raises(ConfigError, match="SOLVER.*section"):
        load_config(None, ["SOLVER", "1"])
    with pytest.raises(ConfigError, match="SOLVER"):
        load_config(write(tmp_path, "SOLVER: 3\n"))
    with pytest.raises(ConfigError, match="SEED.*not a section"):
        load_config(write(tmp_path, "SEED:\n  A: 1\n"))


def test_type_mismatch_names_key_and_source(tmp_path):
    path = write(tmp_path, "SOLVER:\n  MAX_EPOCHS: twenty\n", "bad_type.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "SOLVER.MAX_EPOCHS" in str(e.value) and "bad_type.yaml" in str(e.value)
    assert "int" in str(e.value) and "twenty" in str(e.value)
    bad = [
        ("SOLVER.BASE_LR", "fast"),            # str for float
        ("SOLVER.MAX_EPOCHS", "2.5"),          # non-integral float for int
        ("INPUT.MIN_SIZE", "[1, 2]"),          # list for int
        ("BASELINE.FREEZE", "1"),              # int for bool
        ("SEED", "True"),                      # bool for int
        ("SOLVER.BASE_LR", "False"),           # bool for float
        ("SOLVER.LR_DECAY_MILESTONES", "5"),   # int for list
        ("BASELINE.BACKBONE_NAME", "[1]"),     # a str key keeps the text: fine...
    ]
    for key, value in bad[:-1]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [key, value])
        assert key in str(e.value) and "command line" in str(e.value)
    assert load_config(None, bad[-1]).BASELINE.BACKBONE_NAME == "[1]"
    with pytest.raises(ConfigError, match="OUTPUT_DIR"):
        load_config(write(tmp_path, "OUTPUT_DIR: 12\n"))  # ...but a YAML int is not a str


def test_lenient_numeric_and_bool_coercions(tmp_path):
    path = write(tmp_path, "SOLVER:\n  LW_RPN_REG: 2\n  MAX_EPOCHS: 12.0\n  WEIGHT_DECAY: 1e-4\n"
                 "FGD:\n  ALPHA_FGD: 5e-5\n")
    cfg = load_config(path, ["TF_BOARD", "false", "EVAL_USE_GT", "True", "SOLVER.BASE_LR", "1"])
    assert cfg.SOLVER.LW_RPN_REG == 2.0 and type(cfg.SOLVER.LW_RPN_REG) is float
    assert cfg.SOLVER.MAX_EPOCHS == 12 and type(cfg.SOLVER.MAX_EPOCHS) is int
    assert cfg.SOLVER.WEIGHT_DECAY == 1e-4  # YAML reads "1e-4" as a string: decoded
    assert cfg.FGD.ALPHA_FGD == 5e-5
    assert cfg.TF_BOARD is False and cfg.EVAL_USE_GT is True
    assert cfg.SOLVER.BASE_LR == 1.0 and type(cfg.SOLVER.BASE_LR) is float


def test_untyped_legacy_keys_take_any_value():
    cfg = load_config(None, ["BASELINE.BACKBONE_NECK", "None", "FGD.DISTILLER_METHOD_NUMBER", "'3'",
                             "DISTILLER.TEACHER.NAE_INCHANNEL", "(256, 1024)"])
    assert cfg.BASELINE.BACKBONE_NECK is None
    assert cfg.FGD.DISTILLER_METHOD_NUMBER == "3"
    assert cfg.DISTILLER.TEACHER.NAE_INCHANNEL == [256, 1024]


def test_choices_are_checked():
    with pytest.raises(ConfigError, match="SOLVER.AMP"):
        load_config(None, ["SOLVER.AMP", "fp32"])
    with pytest.raises(ConfigError, match="INPUT.DATASET"):
        load_config(None, ["INPUT.DATASET", "Market1501"])
    assert load_config(None, ["SOLVER.AMP", "bf16"]).SOLVER.AMP == "bf16"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(write(tmp_path, "SOLVER: [unclosed\n", "broken.yaml"))
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(write(tmp_path, "", "empty.yaml")) == load_config()
    assert load_config(write(tmp_path, "SOLVER:\n", "empty_section.yaml")) == load_config()


def test_freeze_flag(tmp_path):
    assert load_config().is_frozen()
    cfg = load_config(freeze=False)
    assert not cfg.is_frozen()
    cfg.SEED = 9
    with pytest.raises(AttributeError):
        load_config().SEED = 9


# ------------------------------------------------------------------------------ _BASE_ inheritance
def test_base_paths_are_relative_to_the_file_not_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "common").mkdir()
    (tmp_path / "exp" / "deep").mkdir(parents=True)
    write(tmp_path / "common", "SEED: 7\nSOLVER:\n  BASE_LR: 0.02\n", "shared.yaml")
    child = write(tmp_path / "exp" / "deep", "_BASE_: ../../common/shared.yaml\nSOLVER:\n"
                  "  MAX_EPOCHS: 3\n", "child.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(child)
    assert (cfg.SEED, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_EPOCHS) == (7, 0.02, 3)
    # a relative path to the file itself works as well
    monkeypatch.chdir(tmp_path / "exp")
    assert load_config(os.path.join("deep", "child.yaml")) == cfg
    # and an absolute _BASE_
    absolute = write(tmp_path, "_BASE_: {}\n".format(tmp_path / "common" / "shared.yaml"), "abs.yaml")
    assert load_config(absolute).SEED == 7


def test_nested_bases_and_override_order(tmp_path):
    write(tmp_path, "SEED: 1\nOUTPUT_DIR: ./a\nSOLVER:\n  BASE_LR: 0.1\n  MAX_EPOCHS: 9\n"
          "  LR_DECAY_MILESTONES: [3, 6]\nMODEL:\n  ANCHOR_SIZES: [[8], [16], [32], [64], [128]]\n",
          "a.yaml")
    write(tmp_path, "_BASE_: a.yaml\nSEED: 2\nSOLVER:\n  BASE_LR: 0.2\n  LR_DECAY_MILESTONES: [4]\n",
          "b.yaml")
    c = write(tmp_path, "_BASE_: b.yaml\nSEED: 3\nMODEL:\n  ANCHOR_SIZES: [[4]]\n", "c.yaml")
    cfg = load_config(c)
    assert cfg.SEED == 3  # the file's own keys beat its base's, which beat their base's
    assert cfg.SOLVER.BASE_LR == 0.2 and cfg.OUTPUT_DIR == "./a"
    assert cfg.SOLVER.MAX_EPOCHS == 9  # sections merge key by key...
    assert cfg.SOLVER.LR_DECAY_MILESTONES == [4]  # ...and a list value replaces a list value
    assert cfg.MODEL.ANCHOR_SIZES == [[4]]
    assert cfg.MODEL.ANCHOR_ASPECT_RATIOS == get_default_cfg().MODEL.ANCHOR_ASPECT_RATIOS
    assert cfg.SOLVER.GAMMA == 0.1  # untouched default
    assert load_config(c, ["SEED", "4", "SOLVER.MAX_EPOCHS", "5"]).SEED == 4  # opts beat all files
    assert [os.path.basename(p) for p, _, _ in config_layers(c)] == ["a.yaml", "b.yaml", "c.yaml"]
    assert all(BASE_KEY not in data for _, _, data in config_layers(c))


def test_a_list_of_bases_is_merged_in_order(tmp_path):
    write(tmp_path, "SEED: 1\nCKPT_PERIOD: 4\nINPUT:\n  MIN_SIZE: 100\n", "one.yaml")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "SEED: 2\nINPUT:\n  MAX_SIZE: 200\n", "two.yaml")
    write(tmp_path, "_BASE_: one.yaml\nDISP_PERIOD: 5\n", "three.yaml")
    path = write(tmp_path, "_BASE_: [three.yaml, sub/two.yaml]\nOUTPUT_DIR: ./x\n", "child.yaml")
    cfg = load_config(path)
    assert cfg.SEED == 2  # the later base wins
    assert (cfg.CKPT_PERIOD, cfg.DISP_PERIOD) == (4, 5)  # the first base with its own base
    assert (cfg.INPUT.MIN_SIZE, cfg.INPUT.MAX_SIZE) == (100, 200)
    assert cfg.OUTPUT_DIR == "./x"
    assert [os.path.basename(p) for p, _, _ in config_layers(path)] == [
        "one.yaml", "three.yaml", "two.yaml", "child.yaml"]
    # no base at all
    assert load_config(write(tmp_path, "_BASE_: []\nSEED: 9\n", "none.yaml")).SEED == 9


def test_a_shared_base_reached_twice_is_not_a_cycle(tmp_path):
    write(tmp_path, "SEED: 1\nCKPT_PERIOD: 3\n", "common.yaml")
    write(tmp_path, "_BASE_: common.yaml\nSEED: 2\n", "left.yaml")
    write(tmp_path, "_BASE_: common.yaml\nDISP_PERIOD: 7\n", "right.yaml")
    cfg = load_config(write(tmp_path, "_BASE_: [left.yaml, right.yaml]\n", "both.yaml"))
    # each base brings its whole merged result: right.yaml's (with common.yaml's SEED) comes last
    assert (cfg.SEED, cfg.CKPT_PERIOD, cfg.DISP_PERIOD) == (1, 3, 7)


def test_base_cycles_are_errors_naming_the_files(tmp_path):
    a = write(tmp_path, "_BASE_: b.yaml\nSEED: 1\n", "a.yaml")
    write(tmp_path, "_BASE_: [c.yaml]\n", "b.yaml")
    write(tmp_path, "_BASE_: a.yaml\n", "c.yaml")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    msg = str(e.value)
    assert all(os.path.join(str(tmp_path), n) in msg for n in ("a.yaml", "b.yaml", "c.yaml"))
    itself = write(tmp_path, "_BASE_: itself.yaml\n", "itself.yaml")
    with pytest.raises(ConfigError, match="cycle.*itself.yaml.*itself.yaml"):
        load_config(itself)


def test_a_missing_base_is_an_error_naming_both_files(tmp_path):
    child = write(tmp_path, "_BASE_: ../nowhere/gone.yaml\nSEED: 1\n", "child.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert child in msg and os.path.join(os.path.dirname(str(tmp_path)), "nowhere", "gone.yaml") in msg
    assert "does not exist" in msg
    # a base of a base
    write(tmp_path, "_BASE_: missing.yaml\n", "middle.yaml")
    top = write(tmp_path, "_BASE_: middle.yaml\n", "top.yaml")
    with pytest.raises(ConfigError, match="middle.yaml.*missing.yaml"):
        load_config(top)


def test_bad_base_values(tmp_path):
    for text in ("_BASE_: 3\n", "_BASE_: [a.yaml, 4]\n", "_BASE_: {a: b}\n", "_BASE_: ['']\n"):
        with pytest.raises(ConfigError, match="_BASE_.*bad.yaml") as e:
            load_config(write(tmp_path, text, "bad.yaml"))
        assert not isinstance(e.value, UnknownKeyError)
    # only at the top level of a file
    with pytest.raises(ConfigError, match="SOLVER._BASE_.*nested.yaml"):
        load_config(write(tmp_path, "SOLVER:\n  _BASE_: a.yaml\n", "nested.yaml"))
    with pytest.raises(ConfigError, match="_BASE_"):
        load_config(None, ["_BASE_", "a.yaml"])


def test_errors_about_a_key_name_the_file_it_came_from(tmp_path):
    (tmp_path / "bases").mkdir()
    base = write(tmp_path / "bases", "SOLVER:\n  BASE_LRR: 0.01\n", "base.yaml")
    child = write(tmp_path, "_BASE_: bases/base.yaml\nSEED: 2\n", "child.yaml")
    with pytest.raises(UnknownKeyError) as e:
        load_config(child)
    msg = str(e.value)
    assert "SOLVER.BASE_LRR" in msg and "SOLVER.BASE_LR" in msg  # + the hint
    assert "config file {} (".format(base) in msg  # the file the key is written in...
    assert child in msg  # ...and the file that inherits it
    write(tmp_path / "bases", "SOLVER:\n  MAX_EPOCHS: twenty\n", "base.yaml")
    with pytest.raises(ConfigError, match="SOLVER.MAX_EPOCHS") as e:
        load_config(child)
    assert base in str(e.value)
    # a bad key in the file itself names the file itself, not its base
    write(tmp_path / "bases", "SEED: 1\n", "base.yaml")
    child = write(tmp_path, "_BASE_: bases/base.yaml\nSEEDS: 2\n", "child.yaml")
    with pytest.raises(UnknownKeyError) as e:
        load_config(child)
    assert "config file {})".format(child) in str(e.value) and base not in str(e.value)
    # an unknown term (load_config's registered checks) names the file given
    write(tmp_path / "bases", "DISTILLER:\n  TERMS: [nosuchterm]\n", "base.yaml")
    child = write(tmp_path, "_BASE_: bases/base.yaml\nSEED: 2\n", "child.yaml")
    with pytest.raises(ConfigError, match="nosuchterm.*child.yaml"):
        load_config(child)


def test_dumps_hold_the_merged_config_and_no_base(tmp_path):
    write(tmp_path, "SEED: 5\nSOLVER:\n  BASE_LR: 0.04\n", "base.yaml")
    child = write(tmp_path, "_BASE_: base.yaml\nSOLVER:\n  MAX_EPOCHS: 2\n", "child.yaml")
    cfg = load_config(child)
    assert BASE_KEY not in cfg
    out = dump_config(cfg, str(tmp_path / "run" / "config.yaml"))
    text = open(out).read()
    assert BASE_KEY not in text and "BASE_LR: 0.04" in text and "MAX_EPOCHS: 2" in text
    os.remove(str(tmp_path / "base.yaml"))  # the dump stands alone
    assert load_config(out) == cfg


def test_an_original_dump_is_untouched_by_inheritance(tmp_path):
    """An original config.yaml (no _BASE_) loads as it always did, and can itself be a base."""
    original = write(tmp_path, ORIGINAL_DUMP, "config.yaml")
    assert BASE_KEY not in ORIGINAL_DUMP
    assert [p for p, _, _ in config_layers(original)] == [original]
    cfg = load_config(original)
    plain = get_default_cfg()
    merge_dict(plain, yaml.safe_load(ORIGINAL_DUMP), "the dump")
    plain.freeze()
    assert cfg == plain
    child = write(tmp_path, "_BASE_: config.yaml\nSOLVER:\n  BASE_LR: 0.001\n", "finetune.yaml")
    assert load_config(child) == load_config(original, ["SOLVER.BASE_LR", "0.001"])


# ------------------------------------------------------------------------------ tuples and lists
def test_tuples_in_yaml_and_on_command_line_become_lists(tmp_path):
    # the string form a hand-written file may use, and a YAML list
    path = write(tmp_path, "MODEL:\n  ANCHOR_SIZES: ((16,), (32,), (64,), (128,), (256,))\n"
                           "  ANCHOR_ASPECT_RATIOS: [[1.0], [1.0], [1.0], [1.0], [1.0]]\n")
    cfg = load_config(path)
    assert cfg.MODEL.ANCHOR_SIZES == [[16], [32], [64], [128], [256]]
    assert all(type(s) is list for s in cfg.MODEL.ANCHOR_SIZES)
    assert cfg.MODEL.ANCHOR_ASPECT_RATIOS == [[1.0]] * 5
    cfg = load_config(None, ["MODEL.ANCHOR_ASPECT_RATIOS", "((0.5, 1.0),)",
                             "SOLVER.LR_DECAY_MILESTONES", "(3, 4)"])
    assert cfg.MODEL.ANCHOR_ASPECT_RATIOS == [[0.5, 1.0]]
    assert cfg.SOLVER.LR_DECAY_MILESTONES == [3, 4]


def test_tuple_values_dump_as_lists_and_load_back_equal(tmp_path):
    cfg = get_default_cfg()
    cfg.MODEL.ANCHOR_SIZES = ((16,), (32,), (64,), (128,), (256,))
    cfg.FGD.STUDENT_CHANNELS = (128, 128, 128, 128)
    text = cfg.dump()
    assert "!!python" not in text and "((" not in text
    assert yaml.safe_load(text)["MODEL"]["ANCHOR_SIZES"] == [[16], [32], [64], [128], [256]]
    out = dump_config(cfg, str(tmp_path / "config.yaml"))
    loaded = load_config(out)
    assert loaded.MODEL.ANCHOR_SIZES == [[16], [32], [64], [128], [256]]
    assert loaded.FGD.STUDENT_CHANNELS == [128, 128, 128, 128]


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(os.path.join(CONFIG_DIR, "cuhk_sysu", "resnet18", "ddps.yaml"),
                      ["MODEL.ANCHOR_SIZES", "((8,), (16,), (32,), (64,), (128,))",
                       "SOLVER.BASE_LR", "0.0071", "FGD.LAMBDA_FGD", "3e-7", "OUTPUT_DIR", "x: y"])
    out = dump_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(out)
    assert again == cfg
    assert flat(again) == flat(cfg)
    assert again.OUTPUT_DIR == "x: y"


def test_dump_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "config.yaml")
    dump_config(load_config(None, ["SEED", "2"]), path)
    dump_config(load_config(None, ["SEED", "3"]), path)  # overwrites
    assert load_config(path).SEED == 3
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temporary file left

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        dump_config(load_config(None, ["SEED", "4"]), path)
    assert load_config(path).SEED == 3  # the old file is intact
    assert os.listdir(tmp_path) == ["config.yaml"]


# ------------------------------------------------------------------------------ helpers
def test_model_cfg_for_role():
    cfg = load_config(os.path.join(CONFIG_DIR, "cuhk_sysu", "resnet18", "ddps.yaml"))
    assert model_cfg_for_role(cfg, "baseline") is cfg.BASELINE
    assert model_cfg_for_role(cfg, "teacher") is cfg.DISTILLER.TEACHER
    assert model_cfg_for_role(cfg, "student") is cfg.DISTILLER.STUDENT
    assert model_cfg_for_role(cfg, "teacher").BACKBONE_NAME == "resnet50"
    assert model_cfg_for_role(cfg, "student").BACKBONE_NAME == "resnet18"
    with pytest.raises(ValueError, match="tutor"):
        model_cfg_for_role(cfg, "tutor")


def test_is_distillation():
    assert is_distillation(load_config()) is False
    assert is_distillation(load_config(None, ["DISTILLER.PROJECT", "True"])) is True
    assert is_distillation(cfg_of("cuhk_sysu/resnet18/ddps.yaml")) is True
    assert is_distillation(cfg_of("cuhk_sysu/resnet18/base.yaml")) is False


# ------------------------------------------------------------------------------ the YAML files
EXPECTED_FILES = {
    "cuhk_sysu/" + f for f in (
        "resnet50/base.yaml", "resnet18/base.yaml", "resnet18x05/base.yaml", "mobilenetV2/base.yaml",
        "resnet18/ddps.yaml", "resnet18x05/ddps.yaml", "mobilenetV2/ddps.yaml",
        "resnet18/pkd.yaml", "resnet18/pkd_ld_cd.yaml", "resnet18/reviewkd.yaml",
        "resnet18/reviewkd_ld_cd.yaml")
} | {
    "prw/" + f for f in (
        "resnet50/base.yaml", "resnet18/base.yaml", "resnet18x05/base.yaml", "mobilenetv2/base.yaml",
        "resnet18/ddps.yaml", "resnet18x05/ddps.yaml", "mobilenetv2/ddps.yaml")
} | {
    "cuhk_sysu/resnet18/ablation/{}.yaml".format(a)
    for a in ("dfd", "ld", "cd", "dfd_ld", "dfd_cd", "ld_cd")
} | {
    "synthetic/{}.yaml".format(s) for s in (
        "cuhk_sysu_resnet18", "cuhk_sysu_resnet50", "cuhk_sysu_resnet18x05", "cuhk_sysu_mobilenetv2",
        "prw_resnet18", "cuhk_sysu_resnet18_ddps", "cuhk_sysu_resnet18x05_ddps")
} | {
    "{}/resnet18/{}.yaml".format(d, m) for d in ("cuhk_sysu", "prw") for m in ("cwd", "mgd")
}
# the shared settings the experiment files inherit
EXPECTED_FRAGMENTS = {
    "common/{}.yaml".format(f) for f in (
        "original", "cuhk_sysu", "prw", "distill", "cuhk_sysu_distill", "prw_distill",
        "synthetic", "synthetic_distill", "quickstart", "table", "table_distill")
}


def test_the_expected_files_exist():
    assert set(map(rel, EXPERIMENT_YAML)) - set(map(rel, SYNTHETIC_FAMILY_YAML)) == EXPECTED_FILES
    assert set(map(rel, FRAGMENT_YAML)) == EXPECTED_FRAGMENTS
    families = {os.path.dirname(rel(p)) for p in SYNTHETIC_FAMILY_YAML}
    assert families <= {"synthetic/quickstart", "synthetic/table"}


@pytest.mark.parametrize("path", SYNTHETIC_FAMILY_YAML, ids=rel)
def test_synthetic_family_configs_are_coherent(path):
    """Each family trains its models with one data setting, table size and schedule."""
    cfg = load_config(path)
    family = sorted(p for p in SYNTHETIC_FAMILY_YAML if os.path.dirname(p) == os.path.dirname(path))
    first = load_config(family[0])
    for key in ("INPUT", "MODEL"):
        assert cfg[key] == first[key], (rel(path), key)
    solver, ref = cfg.SOLVER.clone(), first.SOLVER
    solver.defrost()
    if path.endswith(os.path.join("synthetic", "table", "teacher.yaml")):
        # the miniature table's teacher trains twice the students' epochs (tools/reproduce_table.py)
        assert solver.MAX_EPOCHS == 2 * ref.MAX_EPOCHS, rel(path)
        solver.MAX_EPOCHS, solver.LR_DECAY_MILESTONES = ref.MAX_EPOCHS, ref.LR_DECAY_MILESTONES
    assert solver == ref, (rel(path), "SOLVER")
    assert cfg.INPUT.DATASET == "CUHK-SYSU" and cfg.INPUT.DATA_ROOT.startswith("data/synthetic")
    assert max(cfg.SOLVER.LR_DECAY_MILESTONES) < cfg.SOLVER.MAX_EPOCHS
    roles = ["teacher", "student"] if is_distillation(cfg) else ["baseline"]
    for role in roles:
        assert model_cfg_for_role(cfg, role).BACKBONE_PRETRAIN is False


@pytest.mark.parametrize("path", ALL_YAML, ids=rel)
def test_every_yaml_file_loads(path, tmp_path):
    skip_if_pending(path)
    cfg = load_config(path)
    assert cfg.is_frozen()
    assert cfg == merged_unchecked(path)
    # what training writes to OUTPUT_DIR/config.yaml loads back equal, and holds no _BASE_
    out = dump_config(cfg, str(tmp_path / "config.yaml"))
    assert BASE_KEY not in open(out).read()
    assert load_config(out) == cfg
    role = "student" if is_distillation(cfg) else "baseline"
    assert model_cfg_for_role(cfg, role).BACKBONE_NAME in (
        "resnet50", "resnet18", "resnet18_x05", "mobilenet_v2")
    if is_distillation(cfg):
        assert cfg.BASELINE.PROJECT is False


@pytest.mark.parametrize("path", REAL_YAML, ids=rel)
def test_what_every_original_config_file_fixes(path):
    cfg = shipped(path)
    # stated once, in the shared file every experiment of the original's datasets inherits
    dataset_file = os.path.join(COMMON_DIR, rel(path).split(os.sep)[0] + ".yaml")
    layers = [p for p, _, _ in config_layers(path)]
    assert layers[0] == os.path.join(COMMON_DIR, "original.yaml") and dataset_file in layers
    m = cfg.MODEL
    assert m.ANCHOR_SIZES == [[32], [64], [128], [256], [512]]
    assert m.ANCHOR_ASPECT_RATIOS == [[0.5, 1.0, 2.0]] * 5
    assert (m.RPN.PRE_NMS_TOPN_TRAIN, m.RPN.PRE_NMS_TOPN_TEST) == (2000, 1000)
    assert m.RPN.POST_NMS_TOPN_TEST == 1000
    assert m.RPN.POST_NMS_TOPN_TRAIN == (1000 if "mobilenet" in path.lower() and "ddps" in path
                                         else 2000)
    assert (m.ROI_HEAD.BATCH_SIZE_TRAIN, m.ROI_HEAD.POS_FRAC_TRAIN) == (512, 0.25)
    assert (m.ROI_HEAD.SCORE_THRESH_TEST, m.ROI_HEAD.NMS_THRESH_TEST) == (0.05, 0.5)
    assert m.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST == 100
    assert cfg.SOLVER.MAX_EPOCHS == 20
    if rel(path).startswith("cuhk_sysu"):
        assert (cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT) == ("CUHK-SYSU", "data/CUHK-SYSU")
        assert (m.LOSS.LUT_SIZE, m.LOSS.CQ_SIZE) == (5532, 5000)
    else:
        assert (cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT) == ("PRW", "data/PRW")
        # 483, not the original's 482: the project's contiguous PRW classes (SPEC 4.1)
        assert (m.LOSS.LUT_SIZE, m.LOSS.CQ_SIZE) == (483, 500)
    assert cfg.OUTPUT_DIR.startswith("./exp/" + rel(path).split(os.sep)[0] + "/")


# file -> (role, backbone, batch, lr, BACKBONE_PRETRAIN, FROZENBN2d, RPN.SCORE_THRESH), SPEC 2
TABLE = {
    "cuhk_sysu/resnet50/base.yaml": ("baseline", "resnet50", 4, 0.0024, True, False, 0.0),
    "cuhk_sysu/resnet18/base.yaml": ("baseline", "resnet18", 5, 0.003, True, True, 0.0),
    "cuhk_sysu/resnet18x05/base.yaml": ("baseline", "resnet18_x05", 5, 0.003, False, False, 0.0),
    "cuhk_sysu/mobilenetV2/base.yaml": ("baseline", "mobilenet_v2", 2, 0.0012, False, True, 0.05),
    "cuhk_sysu/resnet18/ddps.yaml": ("student", "resnet18", 5, 0.003, True, False, 0.0),
    "cuhk_sysu/resnet18x05/ddps.yaml": ("student", "resnet18_x05", 5, 0.003, False, False, 0.0),
    "cuhk_sysu/mobilenetV2/ddps.yaml": ("student", "mobilenet_v2", 2, 0.0012, True, True, 0.05),
    "prw/resnet50/base.yaml": ("baseline", "resnet50", 5, 0.01, True, False, 0.0),
    "prw/resnet18/base.yaml": ("baseline", "resnet18", 5, 0.01, True, False, 0.0),
    # SPEC 2 gives this row no FROZENBN2d change: the default True applies, as in the original
    "prw/resnet18x05/base.yaml": ("baseline", "resnet18_x05", 5, 0.01, False, True, 0.0),
    "prw/mobilenetv2/base.yaml": ("baseline", "mobilenet_v2", 5, 0.01, True, False, 0.0),
    "prw/resnet18/ddps.yaml": ("student", "resnet18", 5, 0.01, True, False, 0.0),
    "prw/resnet18x05/ddps.yaml": ("student", "resnet18_x05", 5, 0.01, False, False, 0.0),
    "prw/mobilenetv2/ddps.yaml": ("student", "mobilenet_v2", 5, 0.01, True, True, 0.05),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_spec2_table_rows(name):
    role, backbone, batch, lr, pretrain, frozen, score = TABLE[name]
    cfg = cfg_of(name)
    assert is_distillation(cfg) == (role == "student")
    node = model_cfg_for_role(cfg, role)
    assert node.BACKBONE_NAME == backbone
    assert (cfg.INPUT.BATCH_SIZE_TRAIN, cfg.SOLVER.BASE_LR) == (batch, lr)
    assert (node.BACKBONE_PRETRAIN, node.FROZENBN2d) == (pretrain, frozen)
    assert cfg.MODEL.RPN.SCORE_THRESH == score


DISTILL_FILES = [p for p in REAL_YAML if is_distillation(shipped(p))]


@pytest.mark.parametrize("path", DISTILL_FILES, ids=rel)
def test_distillation_files_name_the_teacher(path):
    cfg = shipped(path)
    dataset_dir = rel(path).split(os.sep)[0]
    teacher_base = load_config(os.path.join(CONFIG_DIR, dataset_dir, "resnet50", "base.yaml"))
    assert cfg.BASELINE.PROJECT is False
    assert cfg.DISTILLER.TEACHER.BACKBONE_NAME == "resnet50"
    assert cfg.DISTILLER.TEACHER.CKPT == teacher_base.OUTPUT_DIR + "/epoch_19.pth"
    # the teacher was trained on the same data with the same OIM tables
    assert cfg.MODEL.LOSS == teacher_base.MODEL.LOSS
    assert cfg.INPUT.DATA_ROOT == teacher_base.INPUT.DATA_ROOT
    name = os.path.basename(path)
    if name == "ddps.yaml" or os.sep + "ablation" + os.sep in path:
        assert cfg.DISTILLER.TYPE == "FGD_DKD_Relation"


def test_distillation_file_set():
    names = sorted(rel(p) for p in DISTILL_FILES)
    assert len(names) == 6 + 4 + 6 + 4  # ddps, comparisons, ablations, CWD and MGD


# comparison file -> the terms its name says (models.distill.term_names)
COMPARISONS = {
    "cuhk_sysu/resnet18/pkd.yaml": ["pkd"],
    "cuhk_sysu/resnet18/pkd_ld_cd.yaml": ["pkd", "ld", "cd"],
    "cuhk_sysu/resnet18/reviewkd.yaml": ["reviewkd"],
    "cuhk_sysu/resnet18/reviewkd_ld_cd.yaml": ["reviewkd", "ld", "cd"],
    "cuhk_sysu/resnet18/cwd.yaml": ["cwd"],
    "cuhk_sysu/resnet18/mgd.yaml": ["mgd"],
    "prw/resnet18/cwd.yaml": ["cwd"],
    "prw/resnet18/mgd.yaml": ["mgd"],
}


def test_comparison_configs():
    types = {n: cfg_of("cuhk_sysu/resnet18/{}.yaml".format(n)).DISTILLER.TYPE
             for n in ("pkd", "pkd_ld_cd", "reviewkd", "reviewkd_ld_cd")}
    # the original's names (its ReviewKD_LD_CD.yaml said ReviewKD: ours runs what its name says)
    assert types == {"pkd": "PKD", "pkd_ld_cd": "PKD_DKD_Relation", "reviewkd": "ReviewKD",
                     "reviewkd_ld_cd": "ReviewKD_DKD_Relation"}
    for name in types:
        assert list(cfg_of("cuhk_sysu/resnet18/{}.yaml".format(name)).DISTILLER.TERMS) == []
    for name in COMPARISONS:
        text = open(os.path.join(CONFIG_DIR, name)).read()
        assert "implemented later" not in text  # they are implemented
    for name in ("cwd", "mgd"):
        for dataset in ("cuhk_sysu", "prw"):
            assert list(cfg_of("{}/resnet18/{}.yaml".format(dataset, name)).DISTILLER.TERMS) == [name]


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_comparison_files_run_the_terms_their_names_say(name):
    path = os.path.join(CONFIG_DIR, name)
    skip_if_pending(path)
    cfg = load_config(path)
    assert distill.term_names(cfg) == COMPARISONS[name]
    # otherwise the same experiment as the DDPS file of their folder
    full = flat(load_config(os.path.join(os.path.dirname(path), "ddps.yaml")))
    differing = {k for k, v in flat(cfg).items() if full[k] != v}
    assert differing <= {"OUTPUT_DIR", "DISTILLER.TYPE", "DISTILLER.TERMS"}
    assert config_layers(path)[-2][0] == os.path.join(os.path.dirname(path), "ddps.yaml")


ABLATIONS = ["dfd", "ld", "cd", "dfd_ld", "dfd_cd", "ld_cd"]
# the ablations of the miniature table (tools/reproduce_table.py) and their DDPS file
TABLE_ABLATIONS = {"synthetic/table/resnet18_x05_{}.yaml".format(a): a for a in ABLATIONS}


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_terms(name):
    cfg = cfg_of("cuhk_sysu/resnet18/ablation/{}.yaml".format(name))
    terms = name.split("_")
    assert list(cfg.DISTILLER.TERMS) == terms
    assert distill.term_names(cfg) == terms
    # named by DISTILLER.TERMS, not by the legacy switches (left at their default)
    assert (cfg.FGD.ENABLED, cfg.DKD.ENABLED, cfg.GRAPHRELA.ENABLED) == (True, True, True)
    # otherwise the same experiment as the full DDPS file
    full = flat(cfg_of("cuhk_sysu/resnet18/ddps.yaml"))
    differing = {k for k, v in flat(cfg).items() if full[k] != v}
    assert differing == {"OUTPUT_DIR", "DISTILLER.TERMS"}


@pytest.mark.parametrize("name", sorted(TABLE_ABLATIONS))
def test_table_ablation_terms(name):
    cfg = cfg_of(name)
    terms = TABLE_ABLATIONS[name].split("_")
    assert list(cfg.DISTILLER.TERMS) == terms and distill.term_names(cfg) == terms
    assert (cfg.FGD.ENABLED, cfg.DKD.ENABLED, cfg.GRAPHRELA.ENABLED) == (True, True, True)
    full = flat(cfg_of("synthetic/table/resnet18_x05_ddps.yaml"))
    assert distill.term_names(cfg_of("synthetic/table/resnet18_x05_ddps.yaml")) == ["dfd", "ld", "cd"]
    differing = {k for k, v in flat(cfg).items() if full[k] != v}
    assert differing == {"OUTPUT_DIR", "DISTILLER.TERMS"}


def _set_keys(data, prefix=""):
    """The dotted keys a YAML mapping sets (leaves and empty sections)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_set_keys(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_no_shipped_file_uses_the_legacy_switches():
    for path in ALL_YAML:
        for _, _, data in config_layers(path)[-1:]:
            keys = set(_set_keys(data))
            assert not keys & {"FGD.ENABLED", "DKD.ENABLED", "GRAPHRELA.ENABLED"}, rel(path)


@pytest.mark.parametrize("path", ALL_YAML, ids=rel)
def test_files_state_only_what_differs(path):
    """A file states only what differs from what it inherits: no key it sets has the value its
    base files already give it. An experiment file also restates no default (only its model's
    BACKBONE_NAME, which names the model the file is about, may equal one); the shared files of
    configs/common/ may, as they pin what the original's files fix."""
    text = open(path).read()
    assert text.startswith("#"), "{} has no comment header saying what it is".format(rel(path))
    layers = config_layers(path)
    if path in EXPERIMENT_YAML:
        assert len(layers) > 1, "{} inherits nothing".format(rel(path))
    if len(layers) == 1:
        return
    inherited = get_default_cfg()
    set_by_bases = set()
    for _, source, data in layers[:-1]:
        merge_dict(inherited, data, source)
        set_by_bases |= set(_set_keys(data))
    inherited_values = flat(inherited)
    mine = flat(merged_unchecked(path))
    own = _set_keys(layers[-1][2])
    assert own, "{} sets nothing of its own".format(rel(path))
    redundant = []
    for key in own:
        if key not in mine:
            continue  # an empty section
        if mine[key] != inherited_values[key]:
            continue
        if key in set_by_bases:
            redundant.append(key + " (as its base files)")
        elif path in EXPERIMENT_YAML and not key.endswith(".BACKBONE_NAME"):
            redundant.append(key + " (the default)")
    assert not redundant, "{} restates {}".format(rel(path), ", ".join(redundant))


def test_output_dirs_are_unique():
    dirs = [shipped(p).OUTPUT_DIR for p in EXPERIMENT_YAML]
    assert len(set(dirs)) == len(dirs)
    # the shared files are no experiments: they leave OUTPUT_DIR to the files that inherit them
    assert all("OUTPUT_DIR" not in _set_keys(config_layers(p)[-1][2]) for p in FRAGMENT_YAML)


@pytest.mark.parametrize("path", SYNTHETIC_YAML, ids=rel)
def test_synthetic_configs(path):
    cfg = shipped(path)
    dataset = "PRW" if os.path.basename(path).startswith("prw") else "CUHK-SYSU"
    assert (cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT) == (dataset, "data/synthetic/" + dataset)
    assert (cfg.INPUT.MIN_SIZE, cfg.INPUT.MAX_SIZE) == (240, 320)
    assert (cfg.INPUT.NUM_WORKERS_TRAIN, cfg.INPUT.NUM_WORKERS_TEST) == (0, 0)
    assert cfg.OUTPUT_DIR == "./output/synthetic/" + os.path.splitext(os.path.basename(path))[0]
    assert max(cfg.SOLVER.LR_DECAY_MILESTONES) < cfg.SOLVER.MAX_EPOCHS
    assert cfg.EVAL_START_EPOCH < cfg.SOLVER.MAX_EPOCHS
    rpn = cfg.MODEL.RPN
    assert rpn.POST_NMS_TOPN_TRAIN <= rpn.PRE_NMS_TOPN_TRAIN
    assert rpn.POST_NMS_TOPN_TEST <= rpn.PRE_NMS_TOPN_TEST
    roles = ["teacher", "student"] if is_distillation(cfg) else ["baseline"]
    for role in roles:
        node = model_cfg_for_role(cfg, role)
        assert node.BACKBONE_PRETRAIN is False and node.FROZENBN2d is False
    if is_distillation(cfg):
        teacher = cfg_of("synthetic/cuhk_sysu_resnet50.yaml")
        assert cfg.DISTILLER.TEACHER.CKPT == "{}/epoch_{}.pth".format(
            teacher.OUTPUT_DIR, teacher.SOLVER.MAX_EPOCHS - 1)
        assert cfg.MODEL.LOSS == teacher.MODEL.LOSS
        assert cfg.DISTILLER.TYPE == "FGD_DKD_Relation"
