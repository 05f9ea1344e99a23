"""Timing what a user waits for, and the facts of the machine it ran on.

``timed`` measures one call in wall-clock seconds and in this process's CPU seconds (user +
system over all threads): on a CPU shared with other jobs the wall time grows with their load
while the CPU time mostly does not, so both are reported. CUDA work is synchronised before the
clock is read.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

__all__ = ["cpu_model", "machine_info", "peak_gib", "release", "repeat_timed", "reset_peak", "summary", "sync",
           "timed"]

Sample = Tuple[float, float, float]  # wall, CPU (user + system), system seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Sample:
    """(wall seconds, CPU seconds of this process, system seconds) of one call of ``fn``."""
    sync(device)
    start, before = time.perf_counter(), os.times()
    fn()
    sync(device)
    wall, after = time.perf_counter() - start, os.times()
    system = after.system - before.system
    return wall, after.user - before.user + system, system


def summary(samples: Sequence[Sample]) -> Dict:
    """Wall-clock statistics (the figures reported) and the process CPU time. The system part is
    mostly page faults of large fresh allocations on the CPU."""
    wall = [w for w, _, _ in samples]
    cpu = [c for _, c, _ in samples]
    system = [x for _, _, x in samples]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
            "samples_s": [round(s, 6) for s in wall], "cpu_median_s": statistics.median(cpu),
            "cpu_samples_s": [round(s, 6) for s in cpu], "system_median_s": statistics.median(system)}


def repeat_timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Dict:
    for _ in range(warmup):
        timed(fn, device)
    return summary([timed(fn, device) for _ in range(repeats)])


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    """Peak CUDA memory allocated since ``reset_peak``, GiB (None on the CPU)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, command: List[str], kept_freed_memory: bool) -> Dict:
    """CPU, cores, threads, versions, GPU, memory, load and the allocator settings in effect."""
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(command),
    }
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_")) or k == "LD_PRELOAD"}
    env["mallopt (utils/runtime_env)"] = ("mmap threshold 32 MiB, trim threshold 2 GiB, top pad 1 GiB"
                                          if kept_freed_memory else "not applied (glibc defaults or the MALLOC_* above)")
    info["environment"] = env
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info
