"""Train or evaluate a person-search model: a single model (teacher or student baseline) or a
student distilled with DDPS.

    python train_ddps.py --cfg FILE [KEY VALUE ...]                      # train
    python train_ddps.py --cfg FILE --eval --ckpt FILE [KEY VALUE ...]   # evaluate
    python train_ddps.py --cfg FILE --resume --ckpt FILE                 # continue a run

The same file and flags as the original release: an original config.yaml + epoch_19.pth pair
evaluates as it is. Everything lands in OUTPUT_DIR: config.yaml, epoch_{e}.pth, metrics.json,
eval_cache.pth and TensorBoard scalars. A new run refuses a folder that holds another run
(--resume continues it, --overwrite replaces it); nothing is written before the start-up checks
(config, data files, checkpoints, the evaluation's files) have passed. A problem with an input
ends the command with one message naming it (exit status 2); DDPS_DEBUG=1 shows the traceback.

Several GPUs (or CPU processes): launch the same command with torchrun, for single-model and
distillation runs alike:

    torchrun --nproc_per_node 4 train_ddps.py --cfg FILE [KEY VALUE ...]

- DEVICE "cuda" gives each process cuda:LOCAL_RANK and the NCCL backend (pick GPUs with
  CUDA_VISIBLE_DEVICES); DEVICE "cpu", or no GPU, runs CPU processes with the gloo backend.
- INPUT.BATCH_SIZE_TRAIN is per process: with N processes the global batch is
  N x BATCH_SIZE_TRAIN images per step. SOLVER.BASE_LR is used as it is, whatever N: it is the LR
  of the global batch (times SOLVER.ACCUMULATION_STEPS when gradients are accumulated). The
  published settings (BASE_LR 0.003, BATCH_SIZE_TRAIN 5) are for one GPU,
  i.e. a global batch of 5; when you change the global batch, scale BASE_LR linearly yourself
  (e.g. 4 processes x 5 images = 20 images: BASE_LR 0.012). SOLVER.MAX_ITERS_PER_EPOCH counts
  steps per process. Each process reads its own 1/N of every epoch (DistributedSampler), so an
  epoch has 1/N of the steps.
- The OIM tables stay identical on every process: each step's table update uses the foreground
  features and labels of all processes, gathered in rank order.
- Evaluation (--eval, and during training) splits the gallery and query images over the
  processes; process 0 gathers the outputs in dataset order, computes the metrics and writes
  metrics.json and eval_cache.pth, the same as a single process would. Process 0 alone writes
  config.yaml, logs, TensorBoard scalars and checkpoints; the others wait for it. Checkpoints
  hold the unwrapped model (same layout as single-process runs),
  so --resume and --eval work with any number of processes.
- SOLVER.AMP bf16 / fp16 trains and evaluates under torch.autocast (fp16 with a GradScaler,
  whose state is saved in checkpoints); losses and OIM tables stay float32.
"""
import argparse
import os

import utils.runtime_env  # noqa: F401  (before torch: passive OpenMP waits, freed memory kept)

import torch

from configs import ConfigError, load_config
from datasets.loaders import build_train_loader
from engine.build import build_eval_model, build_train_module, check_training_inputs
from engine.evaluator import build_evaluation_inputs, evaluate
from engine.output_dir import check_output_dir, claim_output_dir
from engine.resume import resume_training
from engine.schedule import build_lr_scheduler, build_optimizer
from engine.trainer import Trainer, steps_per_epoch
from utils.dist import (barrier, cleanup, get_rank, get_world_size, init_distributed, is_distributed,
                        is_main_process, wrap_ddp)
from utils.errors import run_main
from utils.misc import set_seed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", dest="cfg_file", help="YAML config file (merged over the defaults)")
    p.add_argument("--eval", action="store_true", help="evaluate --ckpt instead of training")
    p.add_argument("--ckpt", help="checkpoint to evaluate or to resume from")
    p.add_argument("--resume", action="store_true",
                   help="continue training from --ckpt (the schedule settings of the config apply from there on)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT_DIR that holds another run, deleting that run's results")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = p.parse_args(argv)
    if (args.eval or args.resume) and not args.ckpt:
        p.error("--eval and --resume need --ckpt")
    return args


def run_eval(cfg, ckpt_path, device):
    log = print if is_main_process() else _quiet
    gallery_loader, query_loader = build_evaluation_inputs(cfg)  # the protocol's files before inference
    model, info = build_eval_model(cfg, ckpt_path, device, log=log)
    return evaluate(model, cfg, gallery_loader, query_loader, device, checkpoint=os.path.abspath(ckpt_path),
                    epoch=info["epoch"], log=log)


def check_table_size(cfg, train_set):
    if train_set.num_classes > cfg.MODEL.LOSS.LUT_SIZE:
        raise ConfigError(
            f"MODEL.LOSS.LUT_SIZE is {cfg.MODEL.LOSS.LUT_SIZE} but {train_set.name} at "
            f"{train_set.root} has {train_set.num_classes} labeled training identities: set "
            f"MODEL.LOSS.LUT_SIZE to at least {train_set.num_classes}."
        )


def _quiet(*args, **kwargs):
    pass


def check_amp(cfg, device, log=print):
    """Stop early on a precision the device cannot run; note a slow one."""
    if cfg.SOLVER.AMP == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"SOLVER.AMP bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "use SOLVER.AMP fp16 (with a GradScaler) or none")
    if cfg.SOLVER.AMP == "fp16" and device.type != "cuda":
        log("SOLVER.AMP fp16 on the CPU: it runs, but slower than float32; bf16 is the reduced "
            "precision that CPUs accelerate.")


def run_train(cfg, args, device):
    distributed = is_distributed()
    main_proc = is_main_process()
    log = print if main_proc else _quiet
    # start-up checks, cheapest first; nothing is written until all of them have passed
    check_training_inputs(cfg)  # before the data and the models are built
    earlier = check_output_dir(cfg.OUTPUT_DIR, resume_from=args.ckpt if args.resume else None,
                               overwrite=args.overwrite)
    train_loader = build_train_loader(cfg, distributed=distributed)
    check_table_size(cfg, train_loader.dataset)
    test_loaders = build_evaluation_inputs(cfg)  # every run ends with an evaluation: its files are checked now
    module, eval_model = build_train_module(cfg, device, log=log)
    optimizer = build_optimizer(cfg, module.parameters())
    iters = steps_per_epoch(cfg, train_loader)
    scheduler = build_lr_scheduler(cfg, optimizer, iters)
    scaler = torch.amp.GradScaler(device.type) if cfg.SOLVER.AMP == "fp16" else None
    start_epoch = 0
    if args.resume:
        # every process loads the same file into the unwrapped module
        start_epoch = resume_training(args.ckpt, module, optimizer, scheduler, scaler, cfg, iters,
                                      restore_rng=main_proc, cfg_file=args.cfg_file, log=log)
    if main_proc:
        claim_output_dir(cfg, earlier, overwrite=args.overwrite, log=log)
    if distributed:
        module = wrap_ddp(module, device)
        accum = cfg.SOLVER.ACCUMULATION_STEPS
        log(f"distributed training: {get_world_size()} processes x {cfg.INPUT.BATCH_SIZE_TRAIN} images"
            + (f" x {accum} accumulated batches" if accum > 1 else "")
            + f" = global batch {get_world_size() * cfg.INPUT.BATCH_SIZE_TRAIN * accum}, BASE_LR "
            f"{cfg.SOLVER.BASE_LR} (used as is), {iters} steps per epoch per process")

    tb = None
    if cfg.TF_BOARD and main_proc:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(cfg.OUTPUT_DIR, "tensorboard"))

    def evaluate_epoch(epoch, ckpt_path):
        # new weights every time: never served (nor refused) by the previous epoch's cache
        checkpoint = os.path.abspath(ckpt_path) if ckpt_path else None
        return evaluate(eval_model, cfg, *test_loaders, device, checkpoint=checkpoint, epoch=epoch, use_cache=False,
                        log=log)

    trainer = Trainer(cfg, module, train_loader, optimizer, scheduler, device, evaluate_fn=evaluate_epoch,
                      tb_writer=tb, is_main=main_proc, scaler=scaler, log=log)
    metrics = trainer.fit(start_epoch)
    if tb is not None:
        tb.close()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg_file, args.opts)
    device = init_distributed(cfg.DEVICE)  # torchrun: process group and cuda:LOCAL_RANK
    try:
        check_amp(cfg, device, log=print if is_main_process() else _quiet)
        # distinct random streams per process (proposal sampling); rank 0's is the
        # single-process one. Shuffling and augmentation follow SEED and the epoch only.
        set_seed(cfg.SEED + get_rank())
        if args.eval:
            metrics = run_eval(cfg, args.ckpt, device)  # every process runs its share of the images
            barrier()
            return metrics
        return run_train(cfg, args, device)
    finally:
        cleanup()


if __name__ == "__main__":
    run_main(main)
