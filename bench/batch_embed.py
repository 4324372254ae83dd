"""`slimcart embed` over the PriceRunner catalogue (35,311 offer titles): data-parallel scaling,
Ray Data vs local workers, and resuming a killed job.

Runs (same model, same shards):
  1x1         one single-threaded worker: the unit that data parallelism multiplies
  1x{cores}   one worker process with all the threads (the same total thread budget as the next)
  {cores}x1   one single-threaded worker per core
  ray         the same workers as Ray Data actors (local Ray started by the job)
Reported: wall seconds (worker start and model load included: what a user waits for), rows/s,
speed-up of {cores}x1 over 1x1 (how workers scale) and over 1x{cores} (workers vs intra-op threads
at the same thread budget), Ray's overhead vs local workers, max |ray - local| over all vectors.
Resume: a job is started in a subprocess and SIGKILLed once some shards are on disk; the rerun
must skip exactly those shards (the job's manifest lists skipped/computed shards) and give the
same vectors.

    python bench/batch_embed.py --model minilm --out bench/results/batch_embed.json [--limit 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SRC = Path(os.environ.get("SLIMCART_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))) / "categories-pricerunner" / "pricerunner_aggregate.csv"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slimcart.cli", "embed", *args]


def run(model: str, src: Path, out: Path, workers: int, threads: int, engine: str, shard_rows: int) -> dict:
    t0 = time.perf_counter()
    subprocess.run(cli("-m", model, "-i", str(src), "-o", str(out), "--column", "1", "--id-column", "0", "--no-header",
                       "--workers", str(workers), "--threads", str(threads), "--engine", engine,
                       "--shard-rows", str(shard_rows)), cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"engine": engine, "workers": workers, "threads_per_worker": threads, "wall_s": wall,
            "job_s": manifest["seconds"], "rows": manifest["rows"], "rows_per_s_wall": manifest["rows"] / wall}


def vectors(out: Path) -> np.ndarray:
    return np.stack(pq.read_table(out, columns=["embedding"]).column("embedding").to_numpy(zero_copy_only=False))


def kill_and_resume(model: str, src: Path, tmp: Path, cores: int, shard_rows: int, reference: np.ndarray) -> dict:
    out = tmp / "resumed"
    partial = tmp / ".resumed.partial"
    args = cli("-m", model, "-i", str(src), "-o", str(out), "--column", "1", "--id-column", "0", "--no-header",
               "--workers", str(cores), "--threads", "1", "--shard-rows", str(shard_rows))
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and len(list(partial.glob("part-*.parquet"))) < 3:
        time.sleep(0.2)
    if proc.poll() is not None:
        return {"error": "the job finished before it could be killed: use more rows or smaller shards"}
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker processes, mid-shard
    proc.wait()
    on_disk = sorted(p.name for p in partial.glob("part-*.parquet"))
    mtimes = {n: (partial / n).stat().st_mtime_ns for n in on_disk}
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = json.loads((out / "_manifest.json").read_text())
    skipped = [f"part-{i:06d}.parquet" for i in m["skipped_shards"]]
    return {"shards_on_disk_at_kill": len(on_disk), "skipped_on_rerun": len(skipped),
            "skipped_equals_on_disk": skipped == on_disk,
            "kept_files_untouched": all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items()),
            "recomputed": len(m["computed_shards"]), "max_abs_diff_vs_uninterrupted": float(np.abs(vectors(out) - reference).max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=None, help="first N rows only (quick check)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"loadavg_before": os.getloadavg(), "cpu_count": os.cpu_count(), "model": args.model,
              "input": str(SRC), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = SRC
        if args.limit:
            src = tmp / "catalogue.csv"
            with open(SRC, encoding="utf-8") as f, open(src, "w", encoding="utf-8") as g:
                for i, line in enumerate(f):
                    if i >= args.limit:
                        break
                    g.write(line)
        runs = {}
        for name, (workers, threads, engine) in {"1x1": (1, 1, "local"), f"1x{args.cores}": (1, args.cores, "local"),
                                                  f"{args.cores}x1": (args.cores, 1, "local"),
                                                  "ray": (args.cores, 1, "ray")}.items():
            if engine == "ray" and args.skip_ray:
                continue
            runs[name] = run(args.model, src, tmp / name, workers, threads, engine, args.shard_rows)
            print(f"{name:6s} {runs[name]['wall_s']:7.1f} s  {runs[name]['rows_per_s_wall']:7.1f} rows/s", flush=True)
        one, many = runs[f"1x{args.cores}"], runs[f"{args.cores}x1"]
        result["runs"] = runs
        result["speedup_workers_vs_threads"] = many["rows_per_s_wall"] / one["rows_per_s_wall"]
        result["speedup_workers_vs_one_worker"] = many["rows_per_s_wall"] / runs["1x1"]["rows_per_s_wall"]
        result["speedup_threads_vs_one_thread"] = one["rows_per_s_wall"] / runs["1x1"]["rows_per_s_wall"]
        ref = vectors(tmp / f"{args.cores}x1")
        result["max_abs_diff_1x_vs_workers"] = float(np.abs(vectors(tmp / f"1x{args.cores}") - ref).max())
        if "ray" in runs:
            result["ray_overhead_vs_local_workers"] = runs["ray"]["wall_s"] / many["wall_s"] - 1
            result["max_abs_diff_ray_vs_local"] = float(np.abs(vectors(tmp / "ray") - ref).max())
        # smaller shards for the kill test, so several are finished and several are not when it dies
        result["resume"] = kill_and_resume(args.model, src, tmp, args.cores, max(16, args.shard_rows // 4), ref)
        for name in list(runs):
            shutil.rmtree(tmp / name, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
