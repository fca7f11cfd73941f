"""How every benchmark reports: a readable table, then exactly one JSON line, last."""
from __future__ import annotations

import json
import os
import time

import psutil


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def emit(rows_text: str, result: dict) -> None:
    print(rows_text)
    print(json.dumps(result))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, repeat: int, warmup: int = 1) -> float:
    """Best-of-`repeat` wall seconds of fn() after warm-up (best-of resists the noise of a shared machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> dict:
    return {"cpus": os.cpu_count(), "mem_gb": round(psutil.virtual_memory().total / 2**30, 1)}
