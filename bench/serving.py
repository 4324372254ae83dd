"""Load benchmark of `slimcart serve` on loopback: fp32 vs compressed search encoder, and /generate.

search (for each model, served the same way by `slimcart serve` in its own process):
  1. model only      batch-1 p50 of the runner on pre-tokenized queries, in this process (server not running)
     tokenizer+model batch-1 p50 of the workload's embed() on the raw query
  2. end to end      batch-1 p50 / p99 over HTTP, one request in flight (HTTP + JSON + tokenizer + model)
  3. rate ladder     open-loop Poisson arrivals of single-query /embed requests at increasing rates, each
                     for --step-s seconds: p50/p99 of answered requests, throughput, 429/503, 5xx.
                     Latency counts from each request's scheduled send time, so a slow client or a
                     full connection pool cannot hide queueing (no coordinated omission).
                     Sustainable rate = the highest rate with p99 <= objective and <= 1% refused.
  4. overload        3x the sustainable rate: p99 of answered requests, share refused, 5xx, peak RSS
                     (the server's deadline, --deadline-ms, turns a request it cannot answer in time
                     into a 503 instead of a late answer)
  5. recovery        then 0.5x the sustainable rate: p99 back under the objective, nothing refused
generate: TTFT and decode tokens/s per stream at 1, 2, 4 concurrent streams (greedy, fixed length).

Queries are the CrowdFlower test-split queries (the search workload's own split). The client runs
on the same machine: its CPU time is recorded. Load average is recorded before and after; the
figures of a loaded machine are not final.

    python bench/serving.py search --fp32 minilm --compressed runs/distill-L3-int8 --out bench/results/serving.json
    python bench/serving.py generate --model smollm2 --out bench/results/serving_llm.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`slimcart serve` in its own process group on 127.0.0.1; RSS sampled while it runs."""

    def __init__(self, model: str, workload: str, args: list[str], ready_timeout: float = 300):
        import httpx
        import psutil

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "slimcart.cli", "serve", model, "-w", workload, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        end = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server failed: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("server not ready in time")
            time.sleep(0.5)
        self.ps, self.rss, self._stop = psutil.Process(self.proc.pid), [], False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            try:
                self.rss.append(self.ps.memory_info().rss)
            except Exception:  # noqa: BLE001 - process gone
                return
            time.sleep(0.2)

    def close(self):
        self._stop = True
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


# ---------------------------------------------------------------- search
def queries() -> list[str]:
    from slimcart.workloads import get_workload

    data = get_workload("search").load_data(None)
    if data.info.synthetic:
        print("WARNING: SLIMCART_DATA not set: synthetic queries", file=sys.stderr)
    return list(dict.fromkeys(data.pairs["query"]))


def model_only(model: str, texts: list[str], threads: int, n: int = 200) -> dict:
    """Batch-1 p50 of the model alone and of tokenizer + model, in this process."""
    from slimcart.serve.loading import load_model

    wl, runner, bundle = load_model("search", model, threads)
    toks = [wl.tokenize(bundle.tokenizer, [t]) for t in texts[:n]]
    for b in toks[:20]:
        runner(b)
    model_ms, e2e_ms = [], []
    for t, b in zip(texts[:n], toks):
        t0 = time.perf_counter()
        runner(b)
        model_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        wl.embed(runner, bundle.tokenizer, [t])
        e2e_ms.append((time.perf_counter() - t0) * 1e3)
    return {"model_p50_ms": pct(model_ms, 50), "tokenizer_model_p50_ms": pct(e2e_ms, 50), "runtime": runner.runtime}


def sequential(url: str, texts: list[str], n: int = 200) -> dict:
    import httpx

    lat = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for t in texts[:20]:
            c.post("/embed", json={"texts": [t]})
        for t in texts[:n]:
            t0 = time.perf_counter()
            r = c.post("/embed", json={"texts": [t]})
            lat.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "n": n}


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, seed: int = 0, max_requests: int = 20000,
                    max_in_flight: int = 512):
    """Poisson arrivals at `rate`/s for `seconds`; latency from the scheduled send time. A request due
    while `max_in_flight` are outstanding is not sent and counts as failed ("client_overflow"): the
    client stays bounded, and a server that stops answering cannot hide behind a growing client queue.
    aiohttp, not httpx, generates the load: it costs ~5x less CPU per request, and the client shares
    the cores with the server."""
    import aiohttp

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, size=min(max_requests, int(rate * seconds * 1.5) + 10))
    at = np.cumsum(gaps)
    at = at[at < seconds]
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    results, in_flight = [], 0
    cpu0 = time.process_time()
    conn = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(url, connector=conn, timeout=aiohttp.ClientTimeout(total=30),
                                     headers={"content-type": "application/json"}) as c:
        t0 = time.perf_counter()

        async def one(i, when):
            nonlocal in_flight
            in_flight += 1
            try:
                async with c.post("/embed", data=bodies[i % len(bodies)]) as r:
                    await r.read()
                    code = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                code = type(e).__name__
            finally:
                in_flight -= 1
            results.append((code, (time.perf_counter() - t0 - when) * 1e3))

        tasks = []
        for i, when in enumerate(at):
            delay = t0 + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                results.append(("client_overflow", None))
                continue
            tasks.append(asyncio.create_task(one(i, when)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [ms for code, ms in results if code == 200]
    refused = sum(code in (429, 503) for code, _ in results)
    return {
        "offered_per_s": rate, "sent": len(results), "answered": len(ok), "throughput_per_s": len(ok) / wall,
        "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99), "refused": refused, "refused_share": refused / max(1, len(results)),
        "server_errors_5xx": sum(isinstance(c, int) and c >= 500 and c != 503 for c, _ in results),
        "client_errors": sum(not isinstance(c, int) for c, _ in results),
        "client_cpu_share": (time.process_time() - cpu0) / wall,
    }


def settle() -> None:
    """Before a timed step: the server's freeze_heap on the client's own heap (numpy, aiohttp, the last
    step's results), so a full collection never pauses the load generator inside a step, where it would
    count as server latency."""
    from slimcart.serve.run import freeze_heap

    freeze_heap()


def ok_at(step: dict, objective_ms: float) -> bool:
    return step["p99_ms"] is not None and step["p99_ms"] <= objective_ms and step["refused_share"] <= 0.01 \
        and step["server_errors_5xx"] == 0 and step["client_errors"] == 0


def ladder(url, texts, objective_ms, start, step_s, max_rate, budget_s):
    """Rates x1.5 until the objective fails, then bisect between the last pass and the first fail."""
    steps, rate, good, bad, end = [], start, None, None, time.monotonic() + budget_s
    while rate <= max_rate and time.monotonic() < end:
        settle()
        s = asyncio.run(open_loop(url, texts, rate, step_s, seed=len(steps)))
        steps.append(s)
        print(f"  {rate:7.1f}/s  p50 {s['p50_ms'] or 0:6.1f}  p99 {s['p99_ms'] or 0:7.1f} ms  "
              f"refused {s['refused_share']:.1%}  5xx {s['server_errors_5xx']}", flush=True)
        if ok_at(s, objective_ms):
            good, rate = rate, rate * 1.5
        else:
            bad = rate
            break
    for _ in range(3):  # bisect
        if good is None or bad is None or bad / good < 1.1 or time.monotonic() > end:
            break
        mid = (good * bad) ** 0.5
        settle()
        s = asyncio.run(open_loop(url, texts, mid, step_s, seed=len(steps)))
        steps.append(s)
        print(f"  {mid:7.1f}/s  p50 {s['p50_ms'] or 0:6.1f}  p99 {s['p99_ms'] or 0:7.1f} ms  "
              f"refused {s['refused_share']:.1%}", flush=True)
        good, bad = (mid, bad) if ok_at(s, objective_ms) else (good, mid)
    return steps, good


def bench_search(args) -> dict:
    texts = queries()
    out = {}
    serve_args = ["--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-wait-ms",
                  str(args.max_wait_ms), "--max-queue-wait-ms", str(args.objective_ms), "--max-queue", "512",
                  "--timeout", str(args.deadline_ms / 1e3)]
    for name, model in (("fp32", args.fp32), ("compressed", args.compressed)):
        print(f"{name}: {model}", flush=True)
        res = {"model": model, **model_only(model, texts, args.threads)}
        server = Server(model, "search", serve_args)
        try:
            res["end_to_end_batch1"] = sequential(server.url, texts)
            print(f"  batch-1 p50: model {res['model_p50_ms']:.2f} ms, tokenizer+model "
                  f"{res['tokenizer_model_p50_ms']:.2f} ms, HTTP end to end {res['end_to_end_batch1']['p50_ms']:.2f} ms")
            steps, good = ladder(server.url, texts, args.objective_ms, args.start_rate, args.step_s, args.max_rate,
                                 args.ladder_budget_s)
            res["ladder"], res["sustainable_per_s"] = steps, good
            if good:
                rss_before = max(server.rss[-5:])
                settle()
                res["overload_3x"] = asyncio.run(open_loop(server.url, texts, 3 * good, args.step_s, seed=101))
                res["overload_3x"]["server_rss_peak_mb"] = max(server.rss) / 2**20
                res["overload_3x"]["server_rss_before_mb"] = rss_before / 2**20
                settle()
                res["recovery_0.5x"] = asyncio.run(open_loop(server.url, texts, 0.5 * good, args.step_s, seed=102))
                for k in ("overload_3x", "recovery_0.5x"):
                    s = res[k]
                    print(f"  {k}: {s['offered_per_s']:.0f}/s p99 {s['p99_ms'] or 0:.1f} ms refused "
                          f"{s['refused_share']:.1%} 5xx {s['server_errors_5xx']}", flush=True)
        finally:
            server.close()
        out[name] = res
    f, c = out["fp32"].get("sustainable_per_s"), out["compressed"].get("sustainable_per_s")
    out["sustainable_ratio"] = c / f if f and c else None
    return out


# ---------------------------------------------------------------- generate
async def one_stream(url: str, prompt: str, n: int) -> dict:
    import httpx

    t0, first, last, count = time.perf_counter(), None, None, 0
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        body = {"prompt": prompt, "max_new_tokens": n, "stream": True, "stop_at_eos": False}
        async with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and "token" in json.loads(line[6:]):
                    now = time.perf_counter()
                    first = first or now
                    last, count = now, count + 1
    return {"ttft_ms": (first - t0) * 1e3, "tokens": count,
            "decode_tokens_per_s": (count - 1) / (last - first) if count > 1 and last > first else None}


def bench_generate(args) -> dict:
    from slimcart.workloads import get_workload

    data = get_workload("llm").load_data(None)
    prompts = [t[:200] for t in data.test_texts[:16]]
    server = Server(args.model, "llm", ["--threads", str(args.threads), "--max-streams", "4"])
    out = {"model": args.model, "new_tokens": args.new_tokens, "streams": {}}
    try:
        asyncio.run(one_stream(server.url, prompts[0], 4))  # warm
        for n in args.streams:
            rounds = []
            for r in range(args.rounds):
                async def go():
                    return await asyncio.gather(*(one_stream(server.url, prompts[(r * n + i) % len(prompts)],
                                                             args.new_tokens) for i in range(n)))
                rounds += asyncio.run(go())
            per = [x["decode_tokens_per_s"] for x in rounds if x["decode_tokens_per_s"]]
            out["streams"][n] = {"ttft_p50_ms": pct([x["ttft_ms"] for x in rounds], 50),
                                 "decode_tokens_per_s_per_stream_median": statistics.median(per),
                                 "aggregate_tokens_per_s": statistics.median(per) * n, "samples": len(rounds)}
            s = out["streams"][n]
            print(f"  {n} streams: TTFT p50 {s['ttft_p50_ms']:.0f} ms, {s['decode_tokens_per_s_per_stream_median']:.1f} "
                  f"tok/s per stream", flush=True)
        out["server_rss_peak_mb"] = max(server.rss) / 2**20
    finally:
        server.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("search")
    s.add_argument("--fp32", default="minilm")
    s.add_argument("--compressed", required=True)
    s.add_argument("--objective-ms", type=float, default=50.0)
    s.add_argument("--threads", type=int, default=1, help="model threads of each server")
    s.add_argument("--deadline-ms", type=float, default=100.0,
                   help="the server's --timeout: a request not answered by then gets 503 instead of a late answer "
                        "(2x the objective: the overload check's bound on answered requests)")
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--max-wait-ms", type=float, default=5.0)
    s.add_argument("--start-rate", type=float, default=10.0)
    s.add_argument("--max-rate", type=float, default=3000.0)
    s.add_argument("--step-s", type=float, default=8.0, help="seconds per load step")
    s.add_argument("--ladder-budget-s", type=float, default=150.0, help="time cap of each model's ladder")
    g = sub.add_parser("generate")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4])
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--rounds", type=int, default=2)
    for p in (s, g):
        p.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("SLIMCART_DATA", str(ROOT.parent / "shared" / "data"))  # the data beside the repo
    env = {"loadavg_before": os.getloadavg(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    t0 = time.time()
    result = bench_search(args) if args.what == "search" else bench_generate(args)
    env.update(loadavg_after=os.getloadavg(), wall_s=time.time() - t0)
    result = {"environment": env, "settings": {k: v for k, v in vars(args).items() if k != "out"}, **result}
    print(f"load average before {env['loadavg_before']}, after {env['loadavg_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
