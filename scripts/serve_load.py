"""Load test of ``kvsqueeze serve``: many requests from concurrent clients, zero errors, memory comes back.

    .venv/bin/python scripts/serve_load.py                       # 50 requests, 8 clients, smollm2-135m
    .venv/bin/python scripts/serve_load.py --requests 20 --clients 4 --model tiny:llama

Starts the server as a subprocess on a free loopback port, warms it up with one round of ``--clients``
requests, reads its resident memory at idle, then sends ``--requests`` requests from ``--clients`` threads
with the official ``openai`` client: chat and text completions, streamed and not, over a mix of methods and
budgets and prompts of 100 to 1,500 tokens. After the load it waits for the server to be idle and reads its
memory again. It passes (exit 0) with zero errors and the idle memory within ``--rss-tolerance`` (10%) of
the level before the load. The server is stopped with SIGTERM at the end. Traffic goes to 127.0.0.1 only;
every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (method, budget, params): what the requests ask for, in turn
MIX = [
    ("snapkv", 0.25, {}),
    ("full", 1.0, {}),
    ("h2o", 0.2, {}),
    ("kivi", 1.0, {}),
    ("streaming_llm", 0.3, {}),
    ("adakv", 0.25, {}),
    ("snapkv+kivi", 0.3, {}),
    ("pyramidkv", 0.25, {}),
]
WORDS = [
    "cache",
    "memory",
    "token",
    "attention",
    "layer",
    "head",
    "budget",
    "model",
    "request",
    "server",
    "batch",
    "decode",
    "prefill",
    "key",
    "value",
    "position",
    "sequence",
    "compression",
    "eviction",
    "quantization",
    "window",
    "score",
    "kernel",
    "thread",
    "queue",
    "latency",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def wait_idle(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = health(url)
        if state and state["running"] == 0 and state["waiting"] == 0 and state["admitted"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the server did not become idle")


def prompt_text(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Here are some notes: {body}. Summarize the notes in one sentence."


def one_request(client, model: str, i: int, seed: int, max_tokens: int) -> tuple[bool, str, float, int]:
    """Send request ``i``; (ok, error or '', seconds, completion tokens)."""
    rng = random.Random(seed * 1000 + i)
    method, budget, params = MIX[i % len(MIX)]
    extra = {"kvsqueeze": {"method": method, "budget": budget, "params": params}}
    prompt = prompt_text(rng, rng.randint(80, 1200))
    chat, stream = i % 2 == 0, i % 3 == 0
    start = time.perf_counter()
    try:
        if chat:
            args = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
            if stream:
                chunks = client.chat.completions.create(**args, temperature=0, stream=True, extra_body=extra)
                n = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
            else:
                reply = client.chat.completions.create(**args, temperature=0.7, seed=i, extra_body=extra)
                n = reply.usage.completion_tokens
        else:
            args = dict(model=model, prompt=prompt, max_tokens=max_tokens)
            if stream:
                chunks = client.completions.create(**args, temperature=0, stream=True, extra_body=extra)
                n = sum(1 for c in chunks if c.choices and c.choices[0].text)
            else:
                n = client.completions.create(**args, temperature=0, extra_body=extra).usage.completion_tokens
        return True, "", time.perf_counter() - start, n
    except Exception as err:  # counted, reported
        return False, f"{method}: {type(err).__name__}: {err}", time.perf_counter() - start, 0


def run_round(url: str, model: str, requests: int, clients: int, seed: int, max_tokens: int) -> list[tuple]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="load-test", max_retries=0, timeout=600)
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: one_request(client, model, i, seed, max_tokens), range(requests)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-memory", default="2GiB")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "kvsqueeze.cli.main", "serve", "--model", args.model, "--port", str(port),
        "--kv-memory", args.kv_memory, "--api-key", "load-test", "--log-level", "warning",
    ]  # fmt: skip
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server too
    log = open(os.devnull, "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while health(url) is None:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        t0 = time.perf_counter()
        warm = run_round(url, args.model, args.clients, args.clients, args.seed + 1, args.max_tokens)
        wait_idle(url)
        time.sleep(2)
        idle = rss_bytes(server.pid)
        print(f"warm-up: {sum(ok for ok, *_ in warm)}/{len(warm)} ok in {time.perf_counter() - t0:.0f} s; "
              f"idle RSS {idle / 2**20:.0f} MiB", flush=True)  # fmt: skip
        peak, t1 = idle, time.perf_counter()
        with ThreadPoolExecutor(1) as watcher:
            future = watcher.submit(
                run_round, url, args.model, args.requests, args.clients, args.seed, args.max_tokens
            )
            while not future.done():
                peak = max(peak, rss_bytes(server.pid))
                time.sleep(0.5)
            results = future.result()
        wall = time.perf_counter() - t1
        wait_idle(url)
        time.sleep(2)
        after = rss_bytes(server.pid)
        errors = [err for ok, err, *_ in results if not ok]
        latencies = sorted(sec for ok, _, sec, _ in results if ok)
        tokens = sum(n for *_, n in results)
        growth = after / idle - 1
        print(f"load: {len(results)} requests over {args.clients} clients in {wall:.0f} s, {len(errors)} errors, "
              f"{tokens} completion tokens ({tokens / wall:.1f}/s)")  # fmt: skip
        if latencies:
            p50, p95 = latencies[len(latencies) // 2], latencies[int(0.95 * (len(latencies) - 1))]
            print(f"latency: p50 {p50:.1f} s, p95 {p95:.1f} s, max {latencies[-1]:.1f} s")
        print(f"RSS: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, idle after {after / 2**20:.0f} MiB "
              f"({growth:+.1%}; tolerance {args.rss_tolerance:.0%})")  # fmt: skip
        for err in errors[:5]:
            print("error:", err)
        ok = not errors and growth <= args.rss_tolerance
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
