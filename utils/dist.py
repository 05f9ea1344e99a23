"""torch.distributed helpers for multi-process training launched by ``torchrun``.

A run is distributed when the environment says WORLD_SIZE > 1 (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). Every helper here is a no-op, or the trivial answer,
when it is not, so single-process code paths call them unconditionally.

- ``init_distributed(device_name)``: start the process group (NCCL when the device is a GPU,
  gloo on the CPU) and return this process's device: "cuda" / "cuda:N" becomes cuda:LOCAL_RANK.
- ``get_rank`` / ``get_world_size`` / ``is_main_process`` / ``barrier``;
- ``all_gather_variable(*tensors)``: gather tensors whose first dimension differs from rank to
  rank, concatenated in rank order (same result on every rank);
- ``any_across_ranks(flag)``: True on every rank when it is True on one of them;
- ``wrap_ddp(module, device)``: DistributedDataParallel with the settings training needs;
- ``cleanup()``: destroy the process group this module started.
"""
import datetime
import inspect
import os

import torch
import torch.distributed as dist

from utils.misc import resolve_device

# How long a rank waits in a collective (e.g. at the barrier while rank 0 evaluates a whole test
# set) before the run is declared hung. Override with DDPS_DIST_TIMEOUT_MIN.
DEFAULT_TIMEOUT_MIN = 120

_started_here = False


def env_world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_local_rank():
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process():
    return get_rank() == 0


def init_distributed(device_name, log=print):
    """Start torch.distributed when WORLD_SIZE > 1 and return the device of this process.

    Single process (no torchrun, or --nproc_per_node 1): nothing is started and the device is
    `device_name` ("cuda" without a GPU falls back to the CPU, with a notice).
    Distributed: "cuda" (or "cuda:N") maps to cuda:LOCAL_RANK with the NCCL backend; "cpu", or
    "cuda" on a machine without GPUs, uses the CPU with the gloo backend. Calling it again (or
    after the caller started the process group itself) reuses the running group.
    """
    global _started_here
    if env_world_size() <= 1 and not dist.is_initialized():
        return resolve_device(device_name, log=log)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = str(device_name)
    if name.startswith("cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                f"start at most {torch.cuda.device_count()} processes per node (torchrun --nproc_per_node)"
            )
        if name != "cuda" and local_rank == 0:
            log(f"DEVICE is '{name}': under torchrun every process uses cuda:LOCAL_RANK instead "
                "(choose GPUs with CUDA_VISIBLE_DEVICES)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        if name.startswith("cuda") and local_rank == 0:
            log(f"DEVICE is '{name}' but no CUDA device is available: running on the CPU (gloo backend).")
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        minutes = float(os.environ.get("DDPS_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=minutes), **kwargs)
        _started_here = True
    elif dist.get_backend() == "nccl" and device.type != "cuda":
        raise RuntimeError("the running process group uses NCCL but this process runs on the CPU")
    return device


def cleanup():
    """Destroy the process group if ``init_distributed`` started it."""
    global _started_here
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _started_here = False


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_device():
    # NCCL moves CUDA tensors only; gloo works on CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(module, device):
    """DistributedDataParallel around the trained module (the model or the distiller).

    - find_unused_parameters: some parameters get no gradient in a step (the SeqNet
      box_predictor, unused heads); the frozen teacher has requires_grad False and is ignored.
    - buffers are synchronised from rank 0 once, at wrapping, and not before every forward: the
      OIM tables are kept identical by the gathered update (models.oim.gather_for_update), and
      re-sending them (about 10 MB) every step would only cost time. BatchNorm running
      statistics, where BN is not frozen, are then each rank's own; checkpoints hold rank 0's.
    Checkpoints must be taken from ``ddp.module`` (engine.trainer.model_state unwraps it).
    """
    from torch.nn.parallel import DistributedDataParallel

    kwargs = {"find_unused_parameters": True}
    if device.type == "cuda":
        kwargs.update(device_ids=[device.index], output_device=device.index)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # still syncs them once at construction
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


def all_gather_variable(*tensors):
    """Gather tensors whose first dimension may differ from rank to rank.

    All arguments share their first dimension n_r on rank r (the other dimensions and the dtype
    must agree across ranks). Returns, on every rank, one tensor per argument holding the rows of
    rank 0, then rank 1, ... (sum of n_r rows), on the argument's device. Each tensor is padded to
    the largest n_r for the collective and cut back afterwards. Without distribution the inputs
    are returned unchanged.
    """
    if not tensors:
        raise ValueError("all_gather_variable needs at least one tensor")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"all_gather_variable: first dimensions differ: {[tuple(t.shape) for t in tensors]}")
    if not is_distributed():
        return tensors if len(tensors) > 1 else tensors[0]
    world = dist.get_world_size()
    comm = _comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=comm))
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:  # nothing anywhere (every rank takes this branch: sizes are shared)
        return tensors if len(tensors) > 1 else tensors[0]
    out = []
    for t in tensors:
        src = t.detach().to(comm).contiguous()
        if longest > n:
            pad = src.new_zeros((longest - n,) + tuple(src.shape[1:]))
            src = torch.cat([src, pad], dim=0)
        buffers = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(buffers, src)
        rows = torch.cat([b[:k] for b, k in zip(buffers, sizes)], dim=0)
        out.append(rows.to(t.device))
    return tuple(out) if len(out) > 1 else out[0]


def any_across_ranks(flag):
    """True on every rank if `flag` is True on at least one rank (no-op when not distributed)."""
    if not is_distributed():
        return bool(flag)
    comm = _comm_device()
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj):
    """Every rank's picklable `obj`, in rank order, on rank 0 (None on the others); ``[obj]``
    without distribution."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (the others' argument is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
