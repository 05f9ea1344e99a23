"""The default configuration tree (yacs).

Every key of the original DDPS release is here with the original's default value, so that a
``config.yaml`` dumped by the original code merges into this tree unchanged (SPEC 2). Keys the
original defined but never read are kept and marked "legacy"; keys this project adds are listed
in ``PROJECT_KEYS``.

Conventions (see ``configs/__init__.py`` for the merge rules):
- every sequence-valued key holds (nested) lists, never tuples: yacs dumps tuples as YAML lists,
  so lists are what an original dump contains, and a loaded config compares equal to the
  defaults. Tuples (or their string form, e.g. ``((32,), (64,))``) given in a YAML file or on the
  command line are converted to nested lists when merged;
- an int is accepted where a float is expected (``LW_RPN_REG: 1``), a float with an integral
  value where an int is expected (``MAX_EPOCHS: 20.0``);
- ``UNTYPED_KEYS`` are legacy keys for which SPEC 2 gives no original value: their type is not
  checked, so an original dump loads whatever it holds there. Nothing reads them.

Do not import ``_C`` elsewhere: use ``configs.get_default_cfg()``, which returns a clone.
"""

from yacs.config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------------------------------------
# INPUT: datasets and data loading
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Dataset name: "CUHK-SYSU" or "PRW".
_C.INPUT.DATASET = "CUHK-SYSU"
# Root folder of the dataset in its official release layout (SPEC 3).
_C.INPUT.DATA_ROOT = "data/CUHK-SYSU"
# Images are resized (inside the model) so that the shorter side is MIN_SIZE pixels...
_C.INPUT.MIN_SIZE = 900
# ...and the longer side at most MAX_SIZE pixels.
_C.INPUT.MAX_SIZE = 1500
# Number of images per training batch.
_C.INPUT.BATCH_SIZE_TRAIN = 5
# Number of images per test batch. 1 (the published setting) runs every image alone; more
# groups images of similar aspect ratio and pads them to a common size, which moves the
# outputs slightly (docs/bench/batched_inference.md).
_C.INPUT.BATCH_SIZE_TEST = 1
# Number of data-loader worker processes for training (0 = load in the main process).
_C.INPUT.NUM_WORKERS_TRAIN = 5
# Number of data-loader worker processes for testing (0 = load in the main process).
_C.INPUT.NUM_WORKERS_TEST = 1
# Folder where parsed annotation files (Images.mat, TestG*.mat, PRW annotations) are kept, so
# that later runs skip the parse while the files are unchanged. "" = $DDPS_CACHE_DIR, else
# ~/.cache/ddps/annotations; "none" = parse every time.
_C.INPUT.ANNOTATION_CACHE_DIR = ""

# ---------------------------------------------------------------------------------------------
# SOLVER: optimisation schedule and loss weights
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Number of training epochs.
_C.SOLVER.MAX_EPOCHS = 20
# Learning rate of SGD (after warm-up).
_C.SOLVER.BASE_LR = 0.003
# The learning rate rises linearly from BASE_LR * WARMUP_FACTOR to BASE_LR over the first epoch.
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000.0
# Epochs (0-based) after which the learning rate is multiplied by GAMMA (MultiStepLR).
_C.SOLVER.LR_DECAY_MILESTONES = [16]
# Multiplicative learning-rate decay at each milestone.
_C.SOLVER.GAMMA = 0.1
# SGD weight decay (L2 penalty).
_C.SOLVER.WEIGHT_DECAY = 0.0005
# SGD momentum.
_C.SOLVER.SGD_MOMENTUM = 0.9
# Weight of the RPN box-regression loss.
_C.SOLVER.LW_RPN_REG = 1.0
# Weight of the RPN objectness loss.
_C.SOLVER.LW_RPN_CLS = 1.0
# Weight of the first-stage (Faster R-CNN head) box-regression loss on proposals.
_C.SOLVER.LW_PROPOSAL_REG = 10.0
# Weight of the first-stage (Faster R-CNN head) person/background classification loss.
_C.SOLVER.LW_PROPOSAL_CLS = 1.0
# Weight of the second-stage box-regression loss (SeqNet C4 head; the FPN model has none).
_C.SOLVER.LW_BOX_REG = 1.0
# Weight of the second-stage classification loss (SeqNet C4 head; the FPN model has none).
_C.SOLVER.LW_BOX_CLS = 1.0
# Weight of the OIM re-identification loss.
_C.SOLVER.LW_BOX_REID = 1.0
# Clip the global gradient norm to this value before each step; negative disables clipping.
_C.SOLVER.CLIP_GRADIENTS = 10.0
# [project] Mixed precision for the training forward pass: "none", "bf16" or "fp16".
_C.SOLVER.AMP = "none"
# [project] Stop each epoch after this many iterations (-1 = the whole epoch); for CPU runs.
_C.SOLVER.MAX_ITERS_PER_EPOCH = -1
# [project] Gradient accumulation for GPUs too small for the batch: each optimizer step sums
# the gradients of this many loader batches (micro-batches of INPUT.BATCH_SIZE_TRAIN images,
# each loss divided by this number), so BATCH_SIZE_TRAIN 1 with 5 steps has the gradient scale
# of a batch of 5. The LR schedule, MAX_ITERS_PER_EPOCH and CLIP_GRADIENTS count optimizer
# steps. Not the same as one large batch: the OIM tables are updated after every micro-batch,
# and the BatchNorm1d of the embedding head normalises each micro-batch's proposals alone.
_C.SOLVER.ACCUMULATION_STEPS = 1

# ---------------------------------------------------------------------------------------------
# MODEL: detector and re-id head (SeqNet with FPN, SPEC 4)
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Anchor sizes in pixels, one list per RPN level ('0', '1', '2', '3', 'pool').
_C.MODEL.ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
# Anchor aspect ratios (height / width), one list per RPN level.
_C.MODEL.ANCHOR_ASPECT_RATIOS = [[0.5, 1.0, 2.0] for _ in range(5)]

# Region proposal network.
_C.MODEL.RPN = CN()
# NMS IoU threshold applied to the RPN's proposals.
_C.MODEL.RPN.NMS_THRESH = 0.7
# Number of anchors sampled per image to train the RPN.
_C.MODEL.RPN.BATCH_SIZE_TRAIN = 256
# Fraction of positive anchors in the RPN's training sample.
_C.MODEL.RPN.POS_FRAC_TRAIN = 0.5
# Anchors whose IoU with a ground-truth box is at least this are positive.
_C.MODEL.RPN.POS_THRESH_TRAIN = 0.7
# Anchors whose best IoU with the ground truth is below this are negative.
_C.MODEL.RPN.NEG_THRESH_TRAIN = 0.3
# Proposals kept per level before NMS, in training.
_C.MODEL.RPN.PRE_NMS_TOPN_TRAIN = 12000
# Proposals kept per level before NMS, in testing.
_C.MODEL.RPN.PRE_NMS_TOPN_TEST = 6000
# Proposals kept after NMS, in training.
_C.MODEL.RPN.POST_NMS_TOPN_TRAIN = 2000
# Proposals kept after NMS, in testing.
_C.MODEL.RPN.POST_NMS_TOPN_TEST = 300
# Proposals whose objectness probability is below this are dropped.
_C.MODEL.RPN.SCORE_THRESH = 0.0

# Two-stage RoI head: Faster R-CNN head, then re-id head with NAE embeddings.
_C.MODEL.ROI_HEAD = CN()
# Batch-normalise the NAE embedding projections (BN neck).
_C.MODEL.ROI_HEAD.BN_NECK = True
# Number of proposals (and of second-stage boxes) sampled per image in training.
_C.MODEL.ROI_HEAD.BATCH_SIZE_TRAIN = 128
# Fraction of positive boxes in that sample.
_C.MODEL.ROI_HEAD.POS_FRAC_TRAIN = 0.5
# Boxes whose IoU with a ground-truth box is at least this are foreground.
_C.MODEL.ROI_HEAD.POS_THRESH_TRAIN = 0.5
# Boxes whose best IoU with the ground truth is below this are background.
_C.MODEL.ROI_HEAD.NEG_THRESH_TRAIN = 0.5
# At test time, detections whose person score is at most this are dropped.
_C.MODEL.ROI_HEAD.SCORE_THRESH_TEST = 0.5
# NMS IoU threshold of the first-stage detections at test time.
_C.MODEL.ROI_HEAD.NMS_THRESH_TEST = 0.4
# Maximum number of detections per image at test time.
_C.MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST = 300

# OIM re-identification loss.
_C.MODEL.LOSS = CN()
# Rows of the OIM lookup table: must be >= the number of labeled training identities.
_C.MODEL.LOSS.LUT_SIZE = 5532
# Length of the OIM circular queue of unlabeled features.
_C.MODEL.LOSS.CQ_SIZE = 5000
# Momentum of the lookup-table update: row = m * row + (1 - m) * feature.
_C.MODEL.LOSS.OIM_MOMENTUM = 0.5
# Scale applied to the OIM cosine logits.
_C.MODEL.LOSS.OIM_SCALAR = 30.0


# The original's values of the legacy channel keys (read by nothing): a ResNet-50's for the
# single model and the teacher, a ResNet-18's for the student.
_LEGACY_WIDTHS = {
    "resnet50": dict(BACKBONE_OUTCHANNEL=1024, RES5HEAD_OUTCHANNEL=[1024, 2048], FASTERHEAD_INCHANNEL=2048,
                     BBOXREG_INCHANNEL=2048, NAE_INCHANNEL=[1024, 2048]),
    "resnet18": dict(BACKBONE_OUTCHANNEL=256, RES5HEAD_OUTCHANNEL=[256, 512], FASTERHEAD_INCHANNEL=512,
                     BBOXREG_INCHANNEL=512, NAE_INCHANNEL=[256, 512]),
}


def _backbone_node(name, pretrained_flag=None, ckpt=None):
    """Build the backbone-settings node shared by BASELINE, DISTILLER.TEACHER and .STUDENT."""
    node = CN()
    if pretrained_flag is not None:
        # Legacy (unused): original flag; weights come from CKPT / BACKBONE_PRETRAIN. For dumps.
        node.PRETRAINED = pretrained_flag
    # Backbone trunk: "resnet50", "resnet18", "resnet18_x05" or "mobilenet_v2".
    node.BACKBONE_NAME = name
    # Initialise the trunk with ImageNet weights (none exist for resnet18_x05).
    node.BACKBONE_PRETRAIN = True
    # [project] "" = torchvision's IMAGENET1K_V1 weights (torch hub cache); else a local file.
    node.BACKBONE_WEIGHTS = ""
    # Legacy (unused): neck above the trunk; the model always builds an FPN. Kept for dumps.
    node.BACKBONE_NECK = False
    # Use FrozenBatchNorm2d (fixed statistics and affine) in the trunk instead of BatchNorm2d.
    node.FROZENBN2d = True
    # Freeze the ResNet stem (conv1, bn1); ignored for MobileNetV2.
    node.FREEZE = True
    if ckpt is not None:
        # Teacher: checkpoint of the trained teacher (all of it). Student: unused (legacy).
        node.CKPT = ckpt
    # Legacy (unused): number of trainable trunk stages. Kept so original dumps load.
    node.TRAINABLE_LABYER = 2
    # Legacy (unused): FPN levels returned by the backbone. Kept so original dumps load.
    node.RETURNED_LAYERS = ["0", "1", "2", "3", "pool"]
    # Legacy (unused): channel counts of SeqNet's C4 model (trunk output, res5 head, Faster
    # R-CNN head input, box regressor input, NAE inputs). Kept so original dumps load.
    for key, value in _LEGACY_WIDTHS["resnet18" if name == "resnet18" else "resnet50"].items():
        node[key] = value
    return node


# ---------------------------------------------------------------------------------------------
# BASELINE: a single model trained on its own (teacher or plain student)
# ---------------------------------------------------------------------------------------------
# Backbone settings of the single model (models.build_model(cfg, role="baseline")).
_C.BASELINE = _backbone_node("resnet50")
# Train a single model (ignored when DISTILLER.PROJECT is True).
_C.BASELINE.PROJECT = True
# Kind of single model; "baseline" is the only one.
_C.BASELINE.TYPE = "baseline"

# ---------------------------------------------------------------------------------------------
# DISTILLER: teacher -> student distillation (SPEC 6)
# ---------------------------------------------------------------------------------------------
_C.DISTILLER = CN()
# Train a student by distillation from DISTILLER.TEACHER (configs.is_distillation).
_C.DISTILLER.PROJECT = False
# Method, by the original's names (used when DISTILLER.TERMS is empty): "FGD_DKD_Relation" =
# DDPS (DFD + LD + CD); "PKD", "ReviewKD" (feature distillation alone); "PKD_DKD_Relation",
# "ReviewKD_DKD_Relation" (the same plus LD + CD); "NONE" = no term (models/distill/registry.py).
_C.DISTILLER.TYPE = "NONE"
# [project] The distillation terms to train with, any combination of the registered names
# (dfd, ld, cd, pkd, reviewkd, cwd, mgd), e.g. [pkd, ld, cd]; [] = those of DISTILLER.TYPE.
_C.DISTILLER.TERMS = []
# Legacy (unused): the original read it but it had no effect. Kept so original dumps load.
_C.DISTILLER.INIT_STUDENT = False
# Teacher: a complete resnet50 model loaded from CKPT, frozen, in eval mode.
# (The original's default CKPT path, a file of its authors' machine: set it to your teacher's.)
_C.DISTILLER.TEACHER = _backbone_node("resnet50", pretrained_flag=True, ckpt="exp_cuhk/FGD/pre_epoch_19.pth")
# Student: the model being trained; it alone is evaluated.
_C.DISTILLER.STUDENT = _backbone_node("resnet18", pretrained_flag=False, ckpt="")

# ---------------------------------------------------------------------------------------------
# FGD: settings of DFD, disaggregation feature distillation (the original's name "FGD")
# ---------------------------------------------------------------------------------------------
_C.FGD = CN()
# [project] With a DISTILLER.TYPE that includes DFD and DISTILLER.TERMS empty: False drops DFD.
_C.FGD.ENABLED = True
# [project] Overall weight multiplying the DFD term.
_C.FGD.WEIGHT = 1.0
# Temperature of the spatial and channel attentions.
_C.FGD.TEMP = 0.5
# Weight of the person (foreground) feature term.
_C.FGD.ALPHA_FGD = 5e-5
# Weight of the background feature term (the original's spelling "BATE", sic).
_C.FGD.BATE_FGD = 2.5e-5
# Weight of the attention term.
_C.FGD.GAMMA_FGD = 5e-5
# Weight of the global-context term.
_C.FGD.LAMBDA_FGD = 5e-7
# Channels of the teacher's FPN levels '0'-'3'.
_C.FGD.TEACHER_CHANNELS = [256, 256, 256, 256]
# Channels of the student's FPN levels '0'-'3'.
_C.FGD.STUDENT_CHANNELS = [256, 256, 256, 256]
# Legacy (unused): per-level weights the original defined but never applied. Kept for dumps.
_C.FGD.LW_FGD = [0.1, 1.0, 1.0, 0.1]
# Legacy (unused): warm-up length of the original's DFD term; SPEC 6 has none. Kept for dumps.
_C.FGD.WARMUP = 20
# Legacy (unused): DDP find_unused_parameters flag (the original's spelling, sic). For dumps.
_C.FGD.FIND_UNSUED_PARAMETERS = True
# Legacy (unused): number of distillation terms in the original. Kept so original dumps load.
_C.FGD.DISTILLER_METHOD_NUMBER = 4

# ---------------------------------------------------------------------------------------------
# DKD: settings of LD, logit distillation (decoupled KD)
# ---------------------------------------------------------------------------------------------
_C.DKD = CN()
# [project] With a DISTILLER.TYPE that includes LD and DISTILLER.TERMS empty: False drops LD.
_C.DKD.ENABLED = True
# [project] Overall weight multiplying the LD term.
_C.DKD.WEIGHT = 1.0
# Weight of target-class KD (TCKD).
_C.DKD.ALPHA = 1.0
# Weight of non-target-class KD (NCKD).
_C.DKD.BETA = 0.5
# Distillation temperature.
_C.DKD.T = 4.0
# Legacy (unused): the original's FROM_T flag; SPEC 6 gives it no role. Kept for dumps.
_C.DKD.FROM_T = False

# ---------------------------------------------------------------------------------------------
# GRAPHRELA: settings of CD, correlation distillation
# ---------------------------------------------------------------------------------------------
_C.GRAPHRELA = CN()
# [project] With a DISTILLER.TYPE that includes CD and DISTILLER.TERMS empty: False drops CD.
_C.GRAPHRELA.ENABLED = True
# Weight of the CD term.
_C.GRAPHRELA.WEIGHT = 0.01
# Per-identity NMS IoU threshold used to pick one box per person.
_C.GRAPHRELA.NMSTHRES = 0.7
# Legacy (unused): the original's FROM_T flag; SPEC 6 gives it no role. Kept for dumps.
_C.GRAPHRELA.FROM_T = False
# Legacy (unused): warm-up length of the original's CD term; SPEC 6 has none. Kept for dumps.
_C.GRAPHRELA.WARMUP = 20

# ---------------------------------------------------------------------------------------------
# Sections the original defines for other distillation methods
# ---------------------------------------------------------------------------------------------
# PKD, Pearson-correlation feature distillation (comparison method, SPEC 6.1).
_C.PKD = CN()
# Legacy (unused): the original defined it, nothing read it. Kept so original dumps load.
_C.PKD.WITHFOCAL = True
# Weight of each of the four level losses.
_C.PKD.WEIGHT = 6.0
# Legacy (unused): the original's WHOLE_FGD flag of its PKD variant. Kept for dumps.
_C.PKD.WHOLE_FGD = True

# ReviewKD, knowledge review with ABF fusion and the HCL loss (comparison method, SPEC 6.1).
_C.REVIEWKD = CN()
# Weight of the ReviewKD term (its HCL summed over the five FPN levels).
_C.REVIEWKD.WEIGHT = 1.2

# [project] CWD, channel-wise distillation (Shu et al., ICCV 2021), on the FPN outputs.
_C.CWD = CN()
# Temperature of the spatial softmax of every channel.
_C.CWD.TAU = 1.0
# Weight of each level's loss (mmrazor's Faster R-CNN FPN configs: 10).
_C.CWD.WEIGHT = 10.0
# FPN outputs distilled ('0'..'3' and the pooled level 'pool', as mmrazor's five neck outputs).
_C.CWD.LEVELS = ["0", "1", "2", "3", "pool"]

# [project] MGD, masked generative distillation (Yang et al., ECCV 2022), on the FPN outputs.
_C.MGD = CN()
# Weight alpha of each level's loss (mmrazor's FPN configs: 2e-5).
_C.MGD.ALPHA = 2e-5
# Fraction of the spatial positions of the student's map masked out before generation.
_C.MGD.MASK_RATIO = 0.65
# FPN outputs distilled ('0'..'3' and the pooled level 'pool', as mmrazor's five neck outputs).
_C.MGD.LEVELS = ["0", "1", "2", "3", "pool"]

# Legacy (unused): the original's detection KD, never released.
_C.DETKD = CN()
# Legacy (unused): temperature of the original's detection KD. Kept so original dumps load.
_C.DETKD.T = 4.0
# Legacy (unused): warm-up length of the original's detection KD. Kept for dumps.
_C.DETKD.WARMUP = 20
# Legacy (unused): FROM_T flag of the original's detection KD. Kept for dumps.
_C.DETKD.FROM_T = False

# Legacy (unused): the original's re-id KD, never released.
_C.REIDKD = CN()
# Legacy (unused): temperature of the original's re-id KD. Kept so original dumps load.
_C.REIDKD.T = 4.0
# Legacy (unused): warm-up length of the original's re-id KD. Kept for dumps.
_C.REIDKD.WARMUP = 20
# Legacy (unused): FROM_T flag of the original's re-id KD. Kept for dumps.
_C.REIDKD.FROM_T = False

# ---------------------------------------------------------------------------------------------
# Evaluation, checkpoints, logging, run
# ---------------------------------------------------------------------------------------------
# Evaluate every EVAL_PERIOD epochs (from EVAL_START_EPOCH on; the last epoch always).
_C.EVAL_PERIOD = 1
# [project] Evaluate after epoch e (0-based) when e >= EVAL_START_EPOCH (and after the last).
_C.EVAL_START_EPOCH = 10
# Use the ground-truth boxes as gallery detections (upper bound).
_C.EVAL_USE_GT = False
# Re-run the evaluation from OUTPUT_DIR/eval_cache.pth written by the same checkpoint.
_C.EVAL_USE_CACHE = False
# Re-rank with context bipartite graph matching (CBGM).
_C.EVAL_USE_CBGM = False
# [project] CUHK-SYSU gallery size: 50, 100, 500, 1000, 2000, 4000, or -1 = the whole gallery.
_C.EVAL_GALLERY_SIZE = 100
# [project] PRW: search only gallery images from other cameras than the query's.
_C.EVAL_CROSS_CAMERA = False
# Save a checkpoint every CKPT_PERIOD epochs.
_C.CKPT_PERIOD = 1
# Log the losses every DISP_PERIOD iterations.
_C.DISP_PERIOD = 10
# Write TensorBoard scalars to OUTPUT_DIR.
_C.TF_BOARD = True
# Device: "cuda" or "cpu" (the training code falls back to the CPU when CUDA is absent).
_C.DEVICE = "cuda"
# Random seed.
_C.SEED = 1
# Folder of checkpoints, config.yaml, metrics.json, eval_cache.pth and TensorBoard logs.
_C.OUTPUT_DIR = "./output"


# Keys added by this project (not in the original release), dotted.
PROJECT_KEYS = frozenset(
    [
        "BASELINE.BACKBONE_WEIGHTS",
        "DISTILLER.TEACHER.BACKBONE_WEIGHTS",
        "DISTILLER.STUDENT.BACKBONE_WEIGHTS",
        "SOLVER.AMP",
        "SOLVER.MAX_ITERS_PER_EPOCH",
        "INPUT.ANNOTATION_CACHE_DIR",
        "SOLVER.ACCUMULATION_STEPS",
        "FGD.ENABLED",
        "FGD.WEIGHT",
        "DKD.ENABLED",
        "DKD.WEIGHT",
        "GRAPHRELA.ENABLED",
        "DISTILLER.TERMS",
        "CWD.TAU",
        "CWD.WEIGHT",
        "CWD.LEVELS",
        "MGD.ALPHA",
        "MGD.MASK_RATIO",
        "MGD.LEVELS",
        "EVAL_START_EPOCH",
        "EVAL_GALLERY_SIZE",
        "EVAL_CROSS_CAMERA",
    ]
)

_GUESSED_BACKBONE_KEYS = (
    "BACKBONE_NECK",
    "TRAINABLE_LABYER",
    "RETURNED_LAYERS",
    "BACKBONE_OUTCHANNEL",
    "RES5HEAD_OUTCHANNEL",
    "FASTERHEAD_INCHANNEL",
    "BBOXREG_INCHANNEL",
    "NAE_INCHANNEL",
)

# Legacy keys whose original value (hence type) SPEC 2 does not give: any value loads.
UNTYPED_KEYS = frozenset(
    [p + "." + k for p in ("BASELINE", "DISTILLER.TEACHER", "DISTILLER.STUDENT")
     for k in _GUESSED_BACKBONE_KEYS]
    + [
        "DISTILLER.TEACHER.PRETRAINED",
        "DISTILLER.STUDENT.PRETRAINED",
        "FGD.FIND_UNSUED_PARAMETERS",
        "FGD.DISTILLER_METHOD_NUMBER",
        "PKD.WHOLE_FGD",
        "DETKD.FROM_T",
        "REIDKD.FROM_T",
    ]
)

# Allowed values of keys with a closed set of choices (checked by configs.load_config).
# Keys that must be at least 1 (a 0 would train nothing, or divide by zero after an epoch).
POSITIVE_KEYS = (
    "INPUT.BATCH_SIZE_TRAIN",
    "INPUT.BATCH_SIZE_TEST",
    "SOLVER.MAX_EPOCHS",
    "SOLVER.ACCUMULATION_STEPS",
    "CKPT_PERIOD",
    "EVAL_PERIOD",
)

CHOICES = {
    "INPUT.DATASET": ("CUHK-SYSU", "PRW"),
    "SOLVER.AMP": ("none", "bf16", "fp16"),
}
