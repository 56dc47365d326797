"""The runtime every stage shares: CPU threads, the device, autocast precision, freed-memory reuse and the
measured fp32 matmul peak (MFU's denominator)."""

from __future__ import annotations

import ctypes
import os
import time

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed activation memory instead of returning it to the OS every step.

    With the defaults, every large tensor of a CPU training step comes from a fresh mmap that the kernel
    must zero-fill and the next free unmaps again; raising the mmap and trim thresholds keeps those pages
    in the heap (the reason PyTorch's CPU tuning guide suggests jemalloc/tcmalloc). Measured: +5 to +9%
    tokens/s on the 4 x 256 Llama of bench/pretrain.py. A no-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        )
    except (OSError, AttributeError):
        return False


def configure_threads(threads: int, processes: int) -> int:
    """Use `threads` CPU threads, or the cores this process may use divided among the processes."""
    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(1, processes))
    torch.set_num_threads(threads)
    return threads


def autocast_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (dtype auto or bf16); fp32 (no autocast) on CPU.

    bf16 matmul is ~60x slower than fp32 on the AVX2 CPUs we test on, so auto never picks it there.
    """
    if dtype == "fp32":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if dtype == "bf16":
        return torch.bfloat16
    return None


def matmul_peak_flops(sizes: tuple[int, ...] = (), seconds: float = 0.4) -> float:
    """Measured fp32 matmul FLOP/s of this process: the best of repeated square products of each size.

    The best size differs by machine (512 on the 2-core AVX-512 CPU we test on, where 1024 runs ~8%
    slower and moves more between measurements), so every size gets `seconds` and the best counts.
    Default sizes: 512 and 1024 on CPU, 4096 and 8192 on a GPU.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = sizes or ((4096, 8192) if device == "cuda" else (512, 1024))
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        for _ in range(3):  # warm-up
            a @ b
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def default_device(local_rank: int = 0) -> torch.device:
    """The GPU of this process's local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
