"""The training loop (SPEC 5): SGD with warm-up and steps, clipping, checkpoints, resume, logs.

The loop knows nothing of person search: it trains any `module` whose forward(images, targets)
returns a dict of (already weighted) losses; the baseline model and the distiller both are such
modules. What goes into a checkpoint's "model" entry is the module's `checkpoint_state()` when it
has one (the distiller's {"student", "fgd"} layout), else its state_dict (SPEC 4.4).
"""
import contextlib
import io
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from utils.dist import any_across_ranks, barrier, is_main_process
from utils.errors import UserError
from utils.misc import atomic_write_bytes, autocast, get_rng_states, move_to_device, set_rng_states


def accumulation_steps(cfg):
    """Micro-batches (loader batches) per optimizer step: SOLVER.ACCUMULATION_STEPS."""
    return max(int(getattr(cfg.SOLVER, "ACCUMULATION_STEPS", 1)), 1)


def steps_per_epoch(cfg, loader):
    """Optimizer steps of one epoch: the loader's batches over SOLVER.ACCUMULATION_STEPS (a last
    incomplete group is left out, as an incomplete batch is), cut to SOLVER.MAX_ITERS_PER_EPOCH
    when it is set."""
    n = len(loader) // accumulation_steps(cfg)
    return n if cfg.SOLVER.MAX_ITERS_PER_EPOCH <= 0 else min(n, cfg.SOLVER.MAX_ITERS_PER_EPOCH)


def progress_interval():
    """Seconds between progress-bar refreshes: live in a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss became NaN or infinite: training stops before the weights are touched."""


def model_state(module):
    module = getattr(module, "module", module)  # unwrap DistributedDataParallel
    if hasattr(module, "checkpoint_state"):
        return module.checkpoint_state()
    return module.state_dict()


def save_training_checkpoint(path, module, optimizer, scheduler, epoch, scaler=None, extra=None):
    """Write everything a resume needs, atomically (a crash leaves the previous file intact)."""
    payload = {
        "model": model_state(module),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng_states": get_rng_states(),
    }
    if scaler is not None:
        payload["grad_scaler"] = scaler.state_dict()
    if extra:
        payload.update(extra)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def restore_training_state(ckpt, optimizer, scheduler, scaler=None, restore_rng=True):
    """Restore optimizer, scheduler, scaler and RNG states; return the next epoch to run.

    The RNG states saved are rank 0's: distributed runs restore them on rank 0 only
    (``restore_rng=False`` elsewhere) so that the ranks keep distinct random streams."""
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in ckpt]
    if missing:
        raise KeyError(f"cannot resume: the checkpoint has no {', '.join(missing)} entry")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if scaler is not None and "grad_scaler" in ckpt:
        scaler.load_state_dict(ckpt["grad_scaler"])
    if restore_rng and "rng_states" in ckpt:
        set_rng_states(ckpt["rng_states"])
    return int(ckpt["epoch"]) + 1


def check_finite(losses, epoch, iteration):
    """Raise NonFiniteLossError if a loss is NaN/inf. Distributed: on every rank as soon as one
    rank sees one (one scalar all-reduce), so that no rank is left waiting in a collective.

    Only the losses are checked, before backward: with fp16 the GradScaler skips steps whose
    gradients overflow and lowers its scale, which is not an error."""
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if any_across_ranks(bool(bad)):
        if not bad:
            raise NonFiniteLossError(f"non-finite loss on another process at epoch {epoch}, iteration "
                                     f"{iteration}. Training stopped; the last checkpoint written is intact.")
        terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, iteration {iteration}: {sorted(bad)} "
            f"(all terms: {terms}). Training stopped; the last checkpoint written is intact."
        )


class Trainer:
    """Runs epochs of optimizer steps of `module` on `loader` and calls its hooks around them
    (engine.hooks): checkpoints, evaluation, curves and timing are hooks, so the loop itself
    knows no metric and a hook can be added without editing it.

    ``hooks``: the hooks to run; by default engine.hooks.default_hooks from the config, the
    ``evaluate_fn(epoch, checkpoint_path)`` and ``tb_writer`` given."""

    def __init__(self, cfg, module, loader, optimizer, scheduler, device, evaluate_fn=None,
                 tb_writer=None, is_main=None, scaler=None, log=print, hooks=None):
        from engine.hooks import default_hooks

        self.cfg = cfg
        self.module = module
        self.loader = loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        # logs, TensorBoard and checkpoint files: rank 0 only (None: ask torch.distributed)
        self.is_main = is_main_process() if is_main is None else bool(is_main)
        self.scaler = scaler
        self.log = log
        self.max_epochs = int(cfg.SOLVER.MAX_EPOCHS)
        self.history = []  # mean losses per epoch, for callers and tests
        self.storage = {}  # what hooks hand to each other (checkpoint path, metrics, epoch means)
        if hooks is None:
            # the save function is looked up at call time, so that the module-level one can be
            # wrapped; the config goes into every checkpoint, so that a resume can name the
            # settings it changes
            extra = {"config": cfg.dump()} if hasattr(cfg, "dump") else None
            hooks = default_hooks(cfg, lambda *a: save_training_checkpoint(*a, extra=extra), evaluate_fn,
                                  tb_writer if self.is_main else None)
        self.hooks = []
        self.register_hooks(hooks)

    def register_hooks(self, hooks):
        self.hooks.extend(h for h in hooks if h is not None)

    def put_scalars(self, scalars, step):
        """Hand scalars (curves) to every hook that records them (TensorBoardHook, yours)."""
        for hook in self.hooks:
            hook.write_scalars(scalars, step)

    def _call(self, event, *args):
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def iters_per_epoch(self):
        return steps_per_epoch(self.cfg, self.loader)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train_step(self, micro_batches, epoch, i):
        """One optimisation step over `micro_batches`, a list of (images, targets) loader batches
        (SOLVER.ACCUMULATION_STEPS of them): each one's loss, divided by their number, is
        back-propagated in turn, so the gradient is that of the mean of their losses; clipping,
        the optimizer and the LR schedule then act once. The OIM tables are updated in every
        micro-batch's forward, as in a step of that batch size. Distributed, the gradient is
        all-reduced once, in the last micro-batch's backward (DDP's no_sync before).

        Returns the loss values (floats, means over the micro-batches, with their sum as "loss")
        and the learning rate the step used."""
        k = len(micro_batches)
        sums = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        for j, (images, targets) in enumerate(micro_batches):
            images, targets = move_to_device(images, targets, self.device)
            last = j == k - 1
            no_sync = getattr(self.module, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(self.device, self.cfg.SOLVER.AMP):
                    losses = self.module(images, targets)
                losses = {name: v.float() for name, v in losses.items()}
                check_finite(losses, epoch, i)
                total = sum(losses.values())
                scaled = total / k
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            for name, v in losses.items():
                sums[name] += float(v.detach()) / k
            sums["loss"] += float(total.detach()) / k
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.SOLVER.CLIP_GRADIENTS > 0:
            torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.SOLVER.CLIP_GRADIENTS)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return dict(sums), lr

    def optimizer_steps(self):
        """The loader's batches grouped into the micro-batches of each optimizer step."""
        k = accumulation_steps(self.cfg)
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == k:
                yield group
                group = []

    def train_epoch(self, epoch):
        self.module.train()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n_iters = self.iters_per_epoch()
        sums, count = defaultdict(float), 0
        # a context manager closes the bar when a step raises (a non-finite loss), so its last state
        # is not printed later by the interpreter's shutdown
        with tqdm(total=n_iters, desc=f"epoch {epoch}", disable=not self.is_main, dynamic_ncols=True,
                  mininterval=progress_interval()) as bar:
            for i, micro_batches in enumerate(self.optimizer_steps()):
                if i >= n_iters:
                    break
                values, lr = self.train_step(micro_batches, epoch, i)
                for k, v in values.items():
                    sums[k] += v
                count += 1
                if self.is_main:
                    bar.update(1)
                    if i % max(self.cfg.DISP_PERIOD, 1) == 0 or i == n_iters - 1:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}",
                                        **{k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()
                                           if k != "loss"})
                self._call("after_step", epoch, i, values, lr)
        means = {k: v / max(count, 1) for k, v in sums.items()}
        self.storage.update(steps=count, mean_losses=means)
        self.history.append(means)
        return means

    def fit(self, start_epoch=0):
        """Train from `start_epoch` to SOLVER.MAX_EPOCHS; returns the last metrics an evaluation
        hook left (None without one)."""
        self._call("before_train")
        for epoch in range(start_epoch, self.max_epochs):
            self._call("before_epoch", epoch)
            self.train_epoch(epoch)
            self._call("after_epoch", epoch)
            barrier()  # distributed: the other ranks wait while rank 0 saves
        self._call("after_train")
        return self.storage.get("metrics")
