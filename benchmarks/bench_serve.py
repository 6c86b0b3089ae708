"""`dimoo serve` under Poisson arrivals: continuous batching against serving one request at a time, in one run.

Two servers on 127.0.0.1 with the same code and model: ``--max-batch B`` (requests join the running group at step
boundaries) and ``--max-batch 1`` (one request at a time, the others wait: the public scripts' structure behind a
queue). For each arrival rate (a multiple of one lone request's service rate), ``--requests`` text-to-image
requests arrive with exponential gaps (seeded), each from its own thread; we report throughput (images/s from the
first arrival to the last answer), p50/p95 latency (arrival to answer) and batch occupancy (mean prompt rows in
running groups while any ran, sampled from /metrics every 50 ms).

    python benchmarks/bench_serve.py --rates 0.5 1 2 --requests 12 --timesteps 16 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.serve_support import PROMPT, start_server  # noqa: E402


def one(url: str, body: dict) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=900)
    response.raise_for_status()
    return time.perf_counter() - started


def occupancy_sampler(server, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        rows = server.metric("dimoo_batch_rows")
        if rows > 0:
            samples.append(rows)
        time.sleep(0.05)


def run_rate(server, rate: float, count: int, timesteps: int, seed: int) -> dict:
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(count)]
    latencies: list[float] = [0.0] * count
    done: list[float] = [0.0] * count
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=occupancy_sampler, args=(server, stop, samples))
    sampler.start()

    def send(index: int) -> None:
        body = {"prompt": PROMPT, "seed": index, "timesteps": timesteps, "temperature": 1.0}
        latencies[index] = one(server.url, body)
        done[index] = time.perf_counter()

    threads, start = [], time.perf_counter()
    for index, gap in enumerate(gaps):
        time.sleep(gap)
        thread = threading.Thread(target=send, args=(index,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    stop.set()
    sampler.join()
    first_arrival = start + gaps[0]
    ordered = sorted(latencies)
    return {
        "rate": rate,
        "images_per_s": count / (max(done) - first_arrival),
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "occupancy": statistics.fmean(samples) if samples else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="x one lone request's rate")
    parser.add_argument("--requests", type=int, default=12, help="requests per rate")
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    service = None
    for mode, batch in (("continuous", args.max_batch), ("one at a time", 1)):
        server = start_server("--max-batch", str(batch), "--max-queue", "1000")
        try:
            body = {"prompt": PROMPT, "seed": 0, "timesteps": args.timesteps}
            one(server.url, body)  # warm-up
            if service is None:  # one lone request's service time, measured on the first server
                service = statistics.median(one(server.url, body) for _ in range(3))
            for multiple in args.rates:
                result = run_rate(server, multiple / service, args.requests, args.timesteps, args.seed)
                rows.append({"mode": mode, "load": multiple, **result})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            server.stop()

    print(f"one lone request: {service:.2f} s ({args.timesteps} steps, 128x128, bundled model)\n")
    print("| load (x lone rate) | arrivals/s | serving | images/s | p50 latency (s) | p95 latency (s) | mean rows |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["load"], r["mode"])):
        print(
            f"| {row['load']:g} | {row['rate']:.2f} | {row['mode']} | {row['images_per_s']:.2f} | {row['p50_s']:.2f} "
            f"| {row['p95_s']:.2f} | {row['occupancy']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"service_s": service, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
