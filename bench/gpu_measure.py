"""Timing primitives of bench/gpu.py: synchronised timers, decode and prefill rates, memory read
bandwidth, and the kernel count and GPU-busy share of a profiled run of engine steps."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch
from gpu_models import log  # bench/gpu_models.py, next to this script

# run(max_tokens) -> (seconds, generated token ids per sequence)
Runner = Callable[[int], tuple[float, list[list[int]]]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of `fn` and its result; on CUDA, until the work it queued has finished
    (and nothing queued before it is counted)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def free_memory(device: torch.device, label: str) -> None:
    """Collect what the finished system left (its frame is gone) and return cached blocks to
    the driver, so the next system loads onto an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        log(f"  {label} freed: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still "
            "allocated")


def check_lengths(label: str, generated: list[list[int]], expected: int) -> None:
    counts = sorted({len(t) for t in generated})
    if counts != [expected]:
        raise RuntimeError(f"{label}: generated {counts} tokens per sequence, expected {expected}")


def decode_rate(run: Runner, batch: int, tokens: int, repeats: int,
                label: str) -> tuple[float, list[float]]:
    """tok/s of the decode steps alone: best time of `tokens + 1` new tokens minus best time of
    1 new token (prefill and first token); also the tok/s of each repeat on its own."""
    firsts: list[float] = []
    fulls: list[float] = []
    rates: list[float] = []
    for i in range(repeats):
        firsts.append(run(1)[0])
        fulls.append(run(tokens + 1)[0])
        rates.append(batch * tokens / _difference(fulls[-1], firsts[-1], label))
        log(f"  {label} repeat {i + 1}: first token {firsts[-1] * 1e3:.1f} ms, {tokens + 1} "
            f"tokens {fulls[-1] * 1e3:.1f} ms, {rates[-1]:.1f} tok/s")
    return batch * tokens / _difference(min(fulls), min(firsts), label), rates


def _difference(full: float, first: float, label: str) -> float:
    if full <= first:
        raise RuntimeError(f"{label}: the long run ({full:.4f} s) was not slower than the "
                           f"first token alone ({first:.4f} s); use more --decode-tokens")
    return full - first


def prefill_rate(run: Callable[[], float], tokens: int, repeats: int,
                 label: str) -> tuple[float, list[float]]:
    """Best tok/s of a prefill of `tokens` tokens in all, and the tok/s of each repeat."""
    rates: list[float] = []
    for i in range(repeats):
        elapsed = run()
        rates.append(tokens / elapsed)
        log(f"  {label} repeat {i + 1}: {elapsed * 1e3:.1f} ms, {rates[-1]:.1f} tok/s")
    return max(rates), rates


def read_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Best read bandwidth, GB/s (1e9), of `.sum()` over a float32 tensor of `nbytes`; timed
    with CUDA events on a GPU (a host timer would add the launch and the synchronisation)."""
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    data.sum()  # warm up the reduction (and, on CPU, fault the pages in)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            data.sum()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            best = min(best, timed(data.sum, device)[0])
    size = data.numel() * data.element_size()
    del data
    free_memory(device, "bandwidth tensor")
    return size / best / 1e9


def prepare_profiler_for_graphs() -> None:
    """CUPTI must be initialised before CUDA graphs are captured, or a later profile records
    none of the kernels they replay (pytorch#100441): call before building a CUDA engine."""
    from torch.profiler import _utils

    init = getattr(_utils, "_init_for_cuda_graphs", None)
    if init is not None:
        init()


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device) -> dict[str, Any]:
    """Run `step` `steps` times under torch.profiler; per-step counts and the GPU-busy share.

    On CUDA only device activity is recorded (recording every CPU op would slow the host side,
    which is part of what is measured). kernels = kernel events / steps (memcpy and memset
    counted apart); gpu_busy = the union of the kernels' device intervals / the wall time of
    the steps; gpu_kernel_sum = their summed durations / wall (above gpu_busy only where
    kernels overlap). On CPU there are no kernels: those are null and cpu_ops_per_step counts
    the profiler's CPU op events instead.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    events = list(prof.events())
    result: dict[str, Any] = {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps,
                              "kernels_per_step": None, "copies_per_step": None,
                              "gpu_busy": None, "gpu_kernel_sum": None, "cpu_ops_per_step": None}
    if not cuda:
        cpu_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        result["cpu_ops_per_step"] = len(cpu_ops) / steps
        return result
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)  # microseconds
    result["kernels_per_step"] = len(kernels) / steps
    result["copies_per_step"] = (len(device_events) - len(kernels)) / steps
    result["gpu_busy"] = _union_us(intervals) / 1e6 / wall
    result["gpu_kernel_sum"] = sum(end - start for start, end in intervals) / 1e6 / wall
    return result


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of sorted (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
