"""Peak resident memory of one side, measured in a fresh process so the other side's memory is not counted.

    python -m slimcart.rss_probe --workload search --model minilm | OUT/model | OUT
Prints one JSON line: {"peak_rss_bytes": N}.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    from .api import load
    from .bench import resolve_threads, set_threads
    from .workloads import get_workload

    threads = resolve_threads(a.threads)
    set_threads(threads)
    wl = get_workload(a.workload)
    data = wl.load_data(a.data)
    runner, bundle = load(wl, a.model, threads)
    inputs = wl.bench_inputs(bundle, data)
    for batch in inputs.serving[:4] + inputs.single[:4]:
        runner(batch)
    print(json.dumps({"peak_rss_bytes": peak_rss_self()}))
    return 0


def peak_rss_self() -> int:
    """This process's peak RSS. VmHWM belongs to this address space; ru_maxrss would also carry the
    high-water mark of the parent we were forked from (Linux keeps it across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    sys.exit(main())
