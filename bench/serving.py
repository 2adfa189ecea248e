"""Serving throughput: one endpoint, 1 client against 16 and 64 concurrent clients, side by side.

    .venv/bin/python bench/serving.py                 # runs the tiny chain in a temp home, then measures
    .venv/bin/python bench/serving.py --url http://127.0.0.1:PORT --model support-tickets

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
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"aiplane up failed:\n{done.stderr[-3000:]}")
    state = json.loads((home / "home" / "serving" / "support-tickets" / "endpoint.json").read_text())
    return state["url"], "support-tickets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--model", default="support-tickets")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every concurrency, interleaved; the median is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-serving-") as tmp:
        url, model = (args.url, args.model) if args.url else _tiny_chain(Path(tmp))
        try:
            measure(url, model, 4, 16, args.tokens)  # warm-up
            # Interleaved rounds, so a burst of load from elsewhere on the machine hits every concurrency alike.
            rounds = [[measure(url, model, int(c), args.requests, args.tokens) for c in args.clients.split(",")]
                      for _ in range(args.rounds)]  # fmt: skip
            rows = [_median(column) for column in zip(*rounds)]
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
