"""Reward-server latency under a fixed concurrent load (#16): `rm-scale serve` on SmolLM2-135M-Instruct as a reward
model, `--clients` threads each sending `--requests` OpenRLHF `/get_reward` requests of `--texts` hh-rlhf texts one
after another (a closed loop: each client waits for its answer), over real HTTP on loopback.

    python -m bench.serving [--clients 8] [--requests 6] [--texts 4] [--out bench_results/serving]

Reports latency p50 / p90 / p99 / max per request, texts/s, and the forwards the server ran for them (its dynamic batching
joins concurrent requests; from its /health counters).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.scoring import DATA, ROOT, _export


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path, port: int, log: Path, max_wait_ms: float) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "rm_scale", "serve", "--model", str(folder), "--port", str(port),
           "--max-wait-ms", str(max_wait_ms)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench.serving: the server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"bench.serving: the server did not come up: {log.read_text()[-3000:]}")


def _load(url: str, queries: list[list[str]], clients: int) -> list[float]:
    import httpx

    def client(mine: list[list[str]]) -> list[float]:
        out = []
        with httpx.Client(timeout=600) as http:
            for query in mine:
                start = time.perf_counter()
                answer = http.post(f"{url}/get_reward", json={"query": query})
                answer.raise_for_status()
                out.append(time.perf_counter() - start)
        return out

    shares = [queries[i::clients] for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        return [t for share in pool.map(client, shares) for t in share]


def _health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/health", timeout=10).json()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--texts", type=int, default=4, help="texts per request")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "serving"))
    args = parser.parse_args(argv)
    if not DATA.is_file():
        print(f"bench.serving: skipped: {DATA} not found")
        return 0
    n = args.clients * args.requests * args.texts
    with gzip.open(DATA, "rt") as f:
        texts = [r["chosen"] for r in map(json.loads, itertools.islice(f, n))]
    queries = [texts[i : i + args.texts] for i in range(0, n, args.texts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, port = _export(Path(tmp)), _free_port()
        proc = _start(folder, port, Path(tmp) / "server.log", args.max_wait_ms)
        try:
            url = f"http://127.0.0.1:{port}"
            _load(url, queries[: args.clients], args.clients)  # warm-up, not timed
            start = time.perf_counter()
            before = _health(url)
            latencies = _load(url, queries, args.clients)
            wall = time.perf_counter() - start
            after = _health(url)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    result = {"clients": args.clients, "requests": len(latencies), "texts_per_request": args.texts,
              "max_wait_ms": args.max_wait_ms, "wall_s": wall, "texts_per_s": n / wall,
              "forwards": after["batches"] - before["batches"], "largest_batch_requests": after["largest_batch_requests"],
              "latency_s": {"p50": _quantile(latencies, 0.5), "p90": _quantile(latencies, 0.9),
                            "p99": _quantile(latencies, 0.99), "max": max(latencies)},
              "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
