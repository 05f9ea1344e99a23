"""Train or evaluate a person-search model: a single model (teacher or student baseline) or a
student distilled with DDPS.

    python train_ddps.py --cfg FILE [KEY VALUE ...]                      # train
    python train_ddps.py --cfg FILE --eval --ckpt FILE [KEY VALUE ...]   # evaluate
    python train_ddps.py --cfg FILE --resume --ckpt FILE                 # continue a run

The same file and flags as the original release: an original config.yaml + epoch_19.pth pair
evaluates as it is. Everything lands in OUTPUT_DIR: config.yaml, epoch_{e}.pth, metrics.json,
eval_cache.pth and TensorBoard scalars.
"""
import argparse
import os
import sys

import torch

from configs import dump_config, load_config
from datasets.loaders import build_test_loaders, build_train_loader
from engine.build import build_eval_model, build_train_module
from models.checkpoint import load_checkpoint_file, load_model_weights
from engine.evaluator import evaluate
from engine.schedule import build_lr_scheduler, build_optimizer
from engine.trainer import Trainer, restore_training_state
from utils.misc import resolve_device, set_seed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", dest="cfg_file", help="YAML config file (merged over the defaults)")
    p.add_argument("--eval", action="store_true", help="evaluate --ckpt instead of training")
    p.add_argument("--ckpt", help="checkpoint to evaluate or to resume from")
    p.add_argument("--resume", action="store_true", help="continue training from --ckpt")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = p.parse_args(argv)
    if (args.eval or args.resume) and not args.ckpt:
        p.error("--eval and --resume need --ckpt")
    return args


def run_eval(cfg, ckpt_path, device):
    model, info = build_eval_model(cfg, ckpt_path, device)
    gallery_loader, query_loader = build_test_loaders(cfg)
    return evaluate(model, cfg, gallery_loader, query_loader, device, checkpoint=os.path.abspath(ckpt_path),
                    epoch=info["epoch"])


def check_table_size(cfg, train_set):
    if train_set.num_classes > cfg.MODEL.LOSS.LUT_SIZE:
        raise ValueError(
            f"MODEL.LOSS.LUT_SIZE is {cfg.MODEL.LOSS.LUT_SIZE} but {train_set.name} at "
            f"{train_set.root} has {train_set.num_classes} labeled training identities: set "
            f"MODEL.LOSS.LUT_SIZE to at least {train_set.num_classes}."
        )


def run_train(cfg, args, device):
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    dump_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    train_loader = build_train_loader(cfg)
    check_table_size(cfg, train_loader.dataset)
    module, eval_model = build_train_module(cfg, device)
    optimizer = build_optimizer(cfg, module.parameters())
    iters = len(train_loader) if cfg.SOLVER.MAX_ITERS_PER_EPOCH <= 0 else min(len(train_loader), cfg.SOLVER.MAX_ITERS_PER_EPOCH)
    scheduler = build_lr_scheduler(cfg, optimizer, iters)
    scaler = torch.amp.GradScaler(device.type) if cfg.SOLVER.AMP == "fp16" else None
    start_epoch = 0
    if args.resume:
        ckpt = load_checkpoint_file(args.ckpt)
        if hasattr(module, "load_checkpoint_state"):
            module.load_checkpoint_state(ckpt["model"])
        else:
            load_model_weights(module, ckpt)
        start_epoch = restore_training_state(ckpt, optimizer, scheduler, scaler)
        print(f"resumed from {args.ckpt}: continuing at epoch {start_epoch}")

    tb = None
    if cfg.TF_BOARD:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(cfg.OUTPUT_DIR, "tensorboard"))
    test_loaders = []

    def evaluate_epoch(epoch, ckpt_path):
        if not test_loaders:
            test_loaders.extend(build_test_loaders(cfg))
        return evaluate(eval_model, cfg, *test_loaders, device, checkpoint=ckpt_path, epoch=epoch)

    trainer = Trainer(cfg, module, train_loader, optimizer, scheduler, device, evaluate_fn=evaluate_epoch,
                      tb_writer=tb, scaler=scaler)
    metrics = trainer.fit(start_epoch)
    if tb is not None:
        tb.close()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg_file, args.opts)
    device = resolve_device(cfg.DEVICE)
    set_seed(cfg.SEED)
    if args.eval:
        return run_eval(cfg, args.ckpt, device)
    return run_train(cfg, args, device)


if __name__ == "__main__":
    main()
    sys.exit(0)
