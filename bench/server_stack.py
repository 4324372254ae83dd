"""Which HTTP stack should `slimcart serve` use? Overhead of a trivial JSON echo endpoint, loopback only.

Variants (each a separate server process on 127.0.0.1, one uvicorn worker / one LitServe worker):
  fastapi-h11      FastAPI on uvicorn with the pure-Python h11 parser and the asyncio loop
  fastapi-uvloop   FastAPI on uvicorn with httptools + uvloop (what `slimcart serve` uses)
  starlette-uvloop a bare Starlette route on the same uvicorn (how much FastAPI itself adds)
  litserve         LitServe (FastAPI front end + a worker process fed through queues), batching off

Measured per variant, with the same client (httpx, keep-alive):
  sequential  N requests one after another: p50 / p99 latency of one request (the stack's floor)
  concurrent  C requests in flight (asyncio) for a fixed number of requests: requests/s

The client shares the 2 cores with the server, so absolute figures are pessimistic; the
comparison between stacks is the point. Load average is recorded before and after.

    python bench/server_stack.py --requests 400 --concurrency 16 --out bench/results/server_stack.json
"""


import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fastapi-h11", "fastapi-uvloop", "starlette-uvloop", "litserve")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- servers (run in a child process)
try:  # at import time, so LitServe's spawned worker process can unpickle the API object
    import litserve as _ls

    class LitEcho(_ls.LitAPI):
        def setup(self, device):
            pass

        def decode_request(self, request):
            return request["x"]

        def predict(self, x):
            return x

        def encode_response(self, output):
            return {"y": output}
except ImportError:  # pragma: no cover
    LitEcho = None


def serve(variant, port):
    import uvicorn

    if variant.startswith("fastapi"):
        from fastapi import FastAPI, Request

        app = FastAPI()

        @app.post("/echo")
        async def echo(request: Request):
            body = await request.json()
            return {"y": body["x"]}

        @app.get("/health")
        async def health():
            return {"ok": True}

        loop, http = ("uvloop", "httptools") if variant.endswith("uvloop") else ("asyncio", "h11")
        uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http=http, log_level="error", access_log=False)
    elif variant == "starlette-uvloop":
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def echo(request):
            body = await request.json()
            return JSONResponse({"y": body["x"]})

        async def health(request):
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/health", health)])
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error", access_log=False)
    elif variant == "litserve":
        import litserve as ls

        api = LitEcho(api_path="/echo")
        ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
            host="127.0.0.1", port=port, log_level="error", generate_client_file=False, num_api_servers=1)
    else:
        raise SystemExit(f"unknown variant {variant}")


# ---------------------------------------------------------------- client
def wait_ready(port: int, timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not become healthy")


def sequential(port: int, n: int) -> dict:
    import httpx

    lat = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        for i in range(20):  # warm-up
            c.post("/echo", json={"x": "warm"})
        for i in range(n):
            t = time.perf_counter()
            r = c.post("/echo", json={"x": f"running shoes {i}"})
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["y"] == f"running shoes {i}", r.text
    ms = np.array(lat) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": n}


async def _concurrent(port: int, n: int, conc: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as c:
        sem = asyncio.Semaphore(conc)
        ok = 0

        async def one(i):
            nonlocal ok
            async with sem:
                r = await c.post("/echo", json={"x": f"q{i}"})
                ok += r.status_code == 200

        await asyncio.gather(*(one(i) for i in range(conc)))  # warm the connections
        ok = 0
        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t
    return {"requests_per_s": n / wall, "ok": ok, "n": n, "concurrency": conc}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=VARIANTS)
    ap.add_argument("--port", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    result = {"loadavg_before": os.getloadavg(), "cpu_count": os.cpu_count(), "variants": {}}
    for variant in args.variants.split(","):
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_ready(port)
            seq = sequential(port, args.requests)
            conc = asyncio.run(_concurrent(port, args.requests * 2, args.concurrency))
            result["variants"][variant] = {"sequential": seq, "concurrent": conc}
            print(f"{variant:18s} p50 {seq['p50_ms']:.2f} ms  p99 {seq['p99_ms']:.2f} ms  "
                  f"{conc['requests_per_s']:.0f} req/s at {args.concurrency} in flight", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group: LitServe starts worker processes
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    result["loadavg_after"] = os.getloadavg()
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
