"""Per-worker resource sampling: CPU%, RSS and, where there is a GPU, its utilisation and memory.

A daemon thread samples this process every ``interval_s`` with psutil (a
``/proc`` read, tens of microseconds) and keeps running sums and peaks, never the
samples themselves, so it costs nothing measurable next to a training step. GPU
figures come from NVML when ``nvidia-ml-py`` is installed, else from
``torch.cuda`` (memory only); on a CPU-only worker they are left out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ResourceMonitor", "summarize"]


class ResourceMonitor:
    """Samples this process until stopped; :meth:`summary` is a JSON-ready dict of peaks and means."""

    def __init__(
        self,
        interval_s: float = 1.0,
        gpus: int = 0,
        on_summary: Callable[[dict[str, Any]], None] | None = None,
        push_every: int = 5,
    ):
        import psutil

        self.interval_s = interval_s
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # the first call only sets the baseline
        self._cpu0 = self._cpu_seconds()
        self._started = time.monotonic()
        self._gpus = gpus
        self._gpu = _gpu_probe() if gpus else None
        self._on_summary = on_summary
        self._push_every = max(1, push_every)
        self._lock = threading.Lock()
        self._n = 0
        self._sums: dict[str, float] = {}
        self._peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aiplane-resource-monitor", daemon=True)

    def start(self) -> "ResourceMonitor":
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling (taking one last sample) and return the summary."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.interval_s > 0:
            self._sample()
        return self.summary()

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        # Children too: dataloader or tokenizer processes work for this worker.
        return t.user + t.system + t.children_user + t.children_system

    def _sample(self) -> None:
        values = {"cpu_percent": self._proc.cpu_percent(None), "rss_mb": self._proc.memory_info().rss / 2**20}
        if self._gpu is not None:
            values.update(self._gpu())
        with self._lock:
            self._n += 1
            for k, v in values.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
                self._peaks[k] = max(self._peaks.get(k, v), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # a vanished /proc entry or NVML hiccup must never fail training
                continue
            if self._on_summary is not None and self._n % self._push_every == 0:
                try:
                    self._on_summary(self.summary())
                except Exception:  # a summary that cannot be sent (sink gone) must never fail training either
                    continue

    def summary(self) -> dict[str, Any]:
        """Samples taken, wall and CPU seconds so far, and the peak and mean of each sampled value."""
        with self._lock:
            out: dict[str, Any] = {
                "pid": self._proc.pid,
                "samples": self._n,
                "wall_s": round(time.monotonic() - self._started, 3),
                "cpu_s": round(self._cpu_seconds() - self._cpu0, 3),
                "gpus": self._gpus,
            }
            for k, total in self._sums.items():
                out[f"{k}_peak"] = round(self._peaks[k], 2)
                out[f"{k}_mean"] = round(total / self._n, 2)
        return out


def _gpu_probe() -> Callable[[], dict[str, float]] | None:
    """A function returning this worker's GPU figures, or ``None`` when there is no GPU to read."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
    except Exception:  # no usable CUDA (driver, init error): no GPU figures, training unaffected
        return None
    try:
        import pynvml  # from nvidia-ml-py, only if installed

        pynvml.nvmlInit()
        # NVML numbers physical GPUs; CUDA_VISIBLE_DEVICES maps this process's index onto them.
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        physical = visible[index] if index < len(visible) else str(index)
        handle = (
            pynvml.nvmlDeviceGetHandleByUUID(physical)
            if not physical.isdigit()
            else pynvml.nvmlDeviceGetHandleByIndex(int(physical))
        )

        def nvml() -> dict[str, float]:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return {"gpu_util_percent": float(util.gpu), "gpu_mem_mb": mem.used / 2**20}

        nvml()
        return nvml
    except Exception:  # no NVML (not installed, no permission, no device by that id): CUDA's own count instead

        def cuda() -> dict[str, float]:
            return {"gpu_mem_mb": torch.cuda.memory_allocated(index) / 2**20}

        return cuda


def summarize(workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over per-worker summaries: CPU-hours (CPU time used) and GPU-hours (GPUs held x wall time)."""
    cpu_s = sum(w.get("cpu_s", 0.0) for w in workers.values())
    gpu_s = sum(w.get("wall_s", 0.0) * w.get("gpus", 0) for w in workers.values())
    return {"cpu_hours": round(cpu_s / 3600, 6), "gpu_hours": round(gpu_s / 3600, 6)}
