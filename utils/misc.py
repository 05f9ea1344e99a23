"""Small runtime helpers: seeding, device choice, RNG state capture, JSON results (written
atomically by utils.fileio)."""
import json
import random

import numpy as np
import torch

from utils.fileio import atomic_write_bytes  # noqa: F401  (re-exported: the writers import it from here)


def set_seed(seed):
    """Seed Python, NumPy and torch (all devices) so that a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name, log=print):
    """Turn the config's DEVICE into a torch.device; "cuda" without a GPU falls back to the CPU."""
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        log(f"DEVICE is '{name}' but no CUDA device is available: running on the CPU.")
        return torch.device("cpu")
    return torch.device(name)


def get_rng_states():
    """Everything that makes the next random draw what it is, for an exact resume."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        # as a tensor and plain numbers, so checkpoints load with torch.load(weights_only=True)
        "numpy": (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs restores the devices this one has
        for index, state in enumerate(list(states["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def move_to_device(images, targets, device):
    """A batch (list of image tensors, list of target dicts or None) on `device`."""
    images = [img.to(device, non_blocking=True) for img in images]
    if targets is not None:
        targets = [
            {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets
        ]
    return images, targets


def autocast(device, amp):
    """The autocast context of SOLVER.AMP ("none" | "bf16" | "fp16") on `device`."""
    if amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)
