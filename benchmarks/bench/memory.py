"""Peak memory of a measured job: RSS on CPU (with a "live" variant), the allocator's peak
on CUDA, always as an increase over a baseline child."""

from __future__ import annotations

import math
import resource
import sys

# Peak RSS with glibc's default allocator mostly measures heap retention: freed blocks of
# a few hundred KiB stay in the heap (the mmap threshold adapts upwards), so a tool that
# frees and reallocates often looks 2x bigger than its live data (medium: the engine 230 vs
# 55 MiB). "Live" memory runs extra children with a fixed 64 KiB mmap threshold (every
# larger block is returned to the OS when freed), so their peak RSS tracks live data; they
# are 2-6x slower, hence run with 1 chain and LIVE_DRAWS draws (peak memory does not depend
# on either: every code path runs at every draw).
LIVE_MMAP_THRESHOLD = 65536
LIVE_DRAWS = 3


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak RSS of this process image. VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss
    starts at the parent's RSS at fork time (Linux carries it over fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_increase(result: dict, baseline: dict) -> float:
    """Bytes: on CUDA the allocator's peak during the call; on CPU the child's peak RSS over
    the baseline child's peak RSS (same imports, same model and data, same warm-up)."""
    if "cuda_peak_increase" in result:
        return float(result["cuda_peak_increase"])
    return float(result["peak_rss"] - baseline["peak_rss"])


def call_increase(result: dict) -> float:
    """Bytes: the peak RSS during the call over the RSS just before it (the peak is reset
    right before the call), a cross-check of :func:`memory_increase` on CPU."""
    if "cuda_peak_increase" in result or not result.get("reset_peak"):
        return float("nan")
    return float(result["peak_rss"] - result["rss_before"])


def mem_text(result: dict, baseline: dict) -> str:
    text = f"peak +{mib(memory_increase(result, baseline))}"
    during = call_increase(result)
    if math.isfinite(during):
        text += f" (in-call: +{mib(during).strip()})"
    if result.get("workers_peak_rss"):
        text += (f"; forked chain workers: peak RSS {mib(result['workers_peak_rss']).strip()} "
                 "each, shared pages included")
    return text


def mib(x: float) -> str:
    return f"{x / 2**20:8.1f} MiB"
