"""Serving throughput: one endpoint, 1 client against 16 and 64 concurrent clients, side by side.

    .venv/bin/python bench/serving.py                 # runs the tiny chain in a temp home, then measures
    .venv/bin/python bench/serving.py --url http://127.0.0.1:PORT --model support-tickets
    .venv/bin/python bench/serving.py --compare       # adapter vs plain vLLM on the bare base model, step by step

``--compare`` starts plain vLLM on the bare base model (the same runtime, no LoRA, no preloaded
libraries: vLLM as a user starts it), then a server for each step of closing the gap between
serving an adapter and serving the base model, and with ``--chain`` the endpoint ``aiplane up``
deploys (its default settings). Only one server runs at a time: every other one is paused
(SIGSTOP to its process group, so none of its processes takes a core or wakes), because two
vLLM servers running on 2 cores disturb each other's figures more than any step changes them.
The rounds cycle through the servers, every concurrency for each, and each step is printed as
a ratio to the plain server's median at 1, 16 and 64 clients, with its start-up time. The
adapter is the tiny Granite's rank-16 LoRA on q_proj and v_proj, as ``deployments/local.yaml``
trains it (random weights: speed does not depend on their values).

Each round sends ``--requests`` completions of ``--tokens`` new tokens (``ignore_eos``, so
every request generates exactly that many) with N clients at once, and reports requests per
second, p50/p99 latency, errors, and the ratio to 1 client. Rounds of every concurrency are
interleaved and the median kept. Before measuring, a few requests warm the server. The last
column compares with the retired torch server (kserve-local), which served 99-101 req/s at every
concurrency on this machine with the same requests (issue 9).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Ticket: VPN keeps disconnecting. Hello, the VPN client times out; blocking my work today.\nLabel:"
KSERVE_LOCAL_REQ_S = 99.0  # measured with this benchmark's settings before vLLM replaced it (issue 9)


def _body(model: str, tokens: int) -> bytes:
    return json.dumps(
        {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    ).encode()


def _one(connection: http.client.HTTPConnection, body: bytes, tokens: int) -> float:
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200 or answer["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"HTTP {response.status}: {str(answer)[:200]}")
    return time.perf_counter() - started


def measure(url: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    """``requests`` completions from ``clients`` threads, each on its own keep-alive connection,
    all connected before the clock starts: what is timed is the server, not the client's set-up."""
    parsed = urllib.parse.urlsplit(url)
    body = _body(model, tokens)
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        nonlocal errors
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        connection.connect()
        ready.wait()
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            try:
                took = _one(connection, body, tokens)
            except Exception:  # noqa: BLE001 - a benchmark counts failures, it does not stop at one
                with lock:
                    errors += 1
                connection.close()
                connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
                continue
            with lock:
                latencies.append(took)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "req_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "errors": errors,
    }


def _median(measured: tuple[dict[str, float], ...]) -> dict[str, float]:
    """The round with the median throughput, and the errors of all rounds."""
    middle = sorted(measured, key=lambda m: m["req_s"])[len(measured) // 2]
    return {**middle, "errors": sum(m["errors"] for m in measured)}


def _tiny_chain(home: Path) -> tuple[str, str]:
    raw = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    raw["trainer"]["settings"].update({"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_limit": 8})
    deployment = home / "bench.yaml"
    deployment.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "AIPLANE_HOME": str(home / "home")}
    done = subprocess.run([sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(deployment), "up"],
                          env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"aiplane up failed:\n{done.stderr[-3000:]}")
    state = json.loads((home / "home" / "serving" / "support-tickets" / "endpoint.json").read_text())
    return state["url"], "support-tickets"


def _compare_models(root: Path) -> tuple[Path, Path, Path]:
    """The tiny Granite, an adapter shaped like local.yaml's, and the two merged."""
    import torch
    from aiplane.plugins.peft.base_model import build_tiny_granite
    from aiplane.plugins.vllm.merge import merge_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_tiny_granite(root / "base")
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(root / "adapter")
    return base, root / "adapter", merge_adapter(base, root / "adapter", root / "merged")


class _Server:
    """A vLLM server of the runtime aiplane provisions, started as the vllm target starts one, in a process
    group of its own (which :meth:`pause` and :meth:`resume` signal)."""

    def __init__(self, model: Path, served: str, *, lora: Path | None = None, flags: dict | None = None,
                 preload: bool = False, dev: bool = False) -> None:  # fmt: skip
        import socket

        from aiplane.plugins.vllm.runtime import (
            CPU_ONE_PROCESS,
            SERVER_MODULE,
            ensure_vllm,
            preload_libraries,
            server_args,
            server_env,
        )

        python = ensure_vllm(lambda line: None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = dict(flags or {})
        extra = [*([f"--lora-modules={served}={lora}"] if lora else []), *flags.pop("extra", [])]
        args = server_args(str(model), "base" if lora else served, host="127.0.0.1", port=port,
                           lora=lora is not None, extra=extra, **flags)  # fmt: skip
        env = server_env(lora=lora is not None, dev=dev, preload=preload_libraries(python) if preload else ())
        if CPU_ONE_PROCESS not in extra:  # vLLM's own executor, as a user starts it
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.url, self.model = f"http://127.0.0.1:{port}", served
        self.log = tempfile.NamedTemporaryFile(prefix="aiplane-bench-vllm-", suffix=".log", delete=False)  # noqa: SIM115 - the server's output, for its life
        self.proc = subprocess.Popen([str(python), "-m", SERVER_MODULE, *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.group = self.proc.pid
        self.started = time.perf_counter()

    @classmethod
    def running(cls, url: str, model: str, group: int) -> _Server:
        """A server someone else started (the endpoint ``aiplane up`` deployed): measured and paused, never stopped here."""
        server = cls.__new__(cls)
        server.url, server.model, server.group, server.proc, server.startup_s = url, model, group, None, float("nan")
        return server

    def ready(self) -> _Server:
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    self.startup_s = time.perf_counter() - self.started
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"a vLLM server exited; see {self.log.name}")
                time.sleep(0.5)

    def pause(self) -> None:
        import signal

        os.killpg(self.group, signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        os.killpg(self.group, signal.SIGCONT)

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.group, signal.SIGCONT)
            os.killpg(self.group, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a server whose workers are gone can hang in its shutdown
            os.killpg(self.group, signal.SIGKILL)
            self.proc.wait()


def _rounds(servers: dict[str, _Server], args) -> dict[str, list[dict]]:
    """Every server in turn, the others paused: a warm-up at every concurrency, then ``args.rounds`` rounds, each
    of them every concurrency for every server; the median round of each server at each concurrency."""
    clients = [int(c) for c in args.clients.split(",")]
    for server in servers.values():
        server.pause()
    measured: dict[str, list[list[dict]]] = {label: [] for label in servers}
    try:
        for r in range(-1, args.rounds):  # round -1 warms each batch shape once; a fresh server compiles it
            for label, server in servers.items():
                server.resume()
                try:
                    measure(server.url, server.model, 4, 8, args.tokens)  # wakes it after the pause
                    row = [measure(server.url, server.model, c, args.requests, args.tokens) for c in clients]
                finally:
                    server.pause()
                if r >= 0:
                    measured[label].append(row)
    finally:
        for server in servers.values():
            server.resume()
    return {label: [_median(tuple(col)) for col in zip(*rows, strict=True)] for label, rows in measured.items()}


PLAIN = "plain vLLM on the bare base model"


def compare(args) -> int:
    """``--compare``: see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-serving-") as tmp:
        base, adapter, merged = _compare_models(Path(tmp))
        steps = {
            "lora, --max-loras=4 --max-lora-rank=16 (the former defaults)": {"model": base, "lora": adapter},
            "lora, --max-loras=1 --max-lora-rank=16 (one adapter per batch)":
                {"model": base, "lora": adapter, "flags": {"max_loras": 1, "max_cpu_loras": 1}},
            "lora, max_loras 1, + tcmalloc and Intel OpenMP preloaded":
                {"model": base, "lora": adapter, "flags": {"max_loras": 1, "max_cpu_loras": 1}, "preload": True},
            "merged into the base weights": {"model": merged},
            "merged, --enforce-eager (no compile at start)": {"model": merged, "flags": {"extra": ["--enforce-eager"]}},
            "merged, + tcmalloc and Intel OpenMP preloaded": {"model": merged, "preload": True},
            "merged, eager, the model run in the engine's process (uni executor)":
                {"model": merged, "flags": {"extra": ["--enforce-eager", "--distributed-executor-backend=uni"]}},
            "plain vLLM on the bare base model, the model run in the engine's process (uni executor)":
                {"model": base, "flags": {"extra": ["--distributed-executor-backend=uni"]}},
            "plain vLLM on the bare base model, + preloaded": {"model": base, "preload": True},
        }
        if args.only:
            steps = {label: spec for label, spec in steps.items() if any(word in label for word in args.only.split(","))}
        servers: dict[str, _Server] = {}
        try:
            # Started one at a time, each paused once ready, so no start-up competes with another.
            for label, spec in {PLAIN: {"model": base}, **steps}.items():
                servers[label] = _Server(served="tickets", **spec).ready()
                servers[label].pause()
                print(f"{label}: ready after {servers[label].startup_s:.1f} s", flush=True)
            if args.chain:
                servers["the endpoint aiplane up deploys"] = _chain_server(Path(tmp) / "chain")
            results = _rounds(servers, args)
        finally:
            for server in servers.values():
                server.stop()
            if args.chain:
                subprocess.run([sys.executable, "-m", "aiplane.assets.cli", "--deployment",
                                str(Path(tmp) / "chain" / "bench.yaml"), "stop"], capture_output=True,
                               env={**os.environ, "AIPLANE_HOME": str(Path(tmp) / "chain" / "home")}, check=False)  # fmt: skip
    plain = results.pop(PLAIN)
    for label, rows in results.items():
        _print_step(label, servers[label].startup_s, list(zip(plain, rows, strict=True)))
    print(f"\n{args.requests} requests of {args.tokens} new tokens; ratio to plain vLLM on the bare base model "
          f"(ready after {servers[PLAIN].startup_s:.1f} s), one server running at a time, median of {args.rounds} rounds")  # fmt: skip
    print(f"{'':<64} " + " ".join(f"{c + ' cl.':>8}" for c in args.clients.split(",")) + f" {'start s':>8}")
    for label, rows in results.items():
        print(f"{label:<64} " + " ".join(f"{o['req_s'] / p['req_s']:>7.2f}x" for p, o in zip(plain, rows, strict=True))
              + f" {servers[label].startup_s:>8.1f}")  # fmt: skip
    return 0


def _chain_server(root: Path) -> _Server:
    """The tiny chain's endpoint (``aiplane up`` in ``root``), as a server to pause: its process group is the
    one aiplane started it in (its record's pid)."""
    root.mkdir(parents=True, exist_ok=True)
    url, model = _tiny_chain(root)
    state = json.loads((root / "home" / "serving" / model / "endpoint.json").read_text())
    info = json.loads((Path(state["server_dir"]) / "server.json").read_text())
    return _Server.running(url, model, os.getpgid(int(info["pid"])))


def _print_step(label: str, startup_s: float, rows: list[tuple[dict, dict]]) -> None:
    print(f"{label} (ready after {startup_s:.1f} s)", flush=True)
    for plain, other in rows:
        print(f"  {other['clients']:>3} clients: {other['req_s']:7.1f} req/s vs plain {plain['req_s']:7.1f} "
              f"= {other['req_s'] / plain['req_s']:.2f}x (errors {other['errors']}+{plain['errors']})", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--model", default="support-tickets")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every concurrency, interleaved; the median is kept")
    parser.add_argument("--compare", action="store_true", help="the adapter vs plain vLLM on the bare base model, step by step")
    parser.add_argument("--chain", action="store_true", help="with --compare: also the endpoint `aiplane up` deploys")
    parser.add_argument("--only", default="", help="with --compare: only the steps whose label holds one of these words")
    args = parser.parse_args()
    if args.compare:
        return compare(args)
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-serving-") as tmp:
        url, model = (args.url, args.model) if args.url else _tiny_chain(Path(tmp))
        try:
            measure(url, model, 4, 16, args.tokens)  # warm-up
            # Interleaved rounds, so a burst of load from elsewhere on the machine hits every concurrency alike.
            rounds = [[measure(url, model, int(c), args.requests, args.tokens) for c in args.clients.split(",")]
                      for _ in range(args.rounds)]  # fmt: skip
            rows = [_median(column) for column in zip(*rounds, strict=True)]
        finally:
            if not args.url:
                subprocess.run([sys.executable, "-m", "aiplane.assets.cli", "--deployment",
                                str(Path(tmp) / "bench.yaml"), "stop"], capture_output=True,
                               env={**os.environ, "AIPLANE_HOME": str(Path(tmp) / "home")}, check=False)  # fmt: skip
    base = rows[0]["req_s"]
    print(f"{args.requests} requests of {args.tokens} new tokens, model {model!r} at {url}; "
          f"median of {args.rounds} rounds (errors: all rounds)")
    print(f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'x 1 client':>10} {'x kserve-local':>14}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['req_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}"
            f" {r['req_s'] / base:>9.2f}x {r['req_s'] / KSERVE_LOCAL_REQ_S:>13.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
