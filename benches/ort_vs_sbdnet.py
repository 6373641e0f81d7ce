#!/usr/bin/env python3
"""Batch-1 latency: ONNX Runtime on a float ONNX model beside `sbdnet bench model` on .sbd
exports of the same architecture, interleaved round by round, at each thread count.

Set-up (outside the repository):
    python3 -m venv venv && venv/bin/pip install onnxruntime numpy
Models:
    sbdnet export --model dscnn --format onnx -o dscnn.onnx            # float architecture
    sbdnet export --model dscnn --precision w1a1 -o dscnn-w1a1.sbd      # or a trained DIR
    sbdnet export --model dscnn --precision w1 -o dscnn-w1.sbd
Run:
    venv/bin/python benches/ort_vs_sbdnet.py --onnx dscnn.onnx \\
        --sbd dscnn-w1a1.sbd dscnn-w1.sbd --threads 1 2 --rounds 3

Prints one JSON line per measurement and a table of medians with the ratio
ORT median / sbdnet median (higher = sbdnet faster). `--sbdnet A B` times every model
with each of several sbdnet binaries in the same rounds (a before/after comparison beside
ONNX Runtime; rows are labelled with the binary's index).
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np
import onnxruntime as ort


def time_ort(path, threads, seconds, warmup):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(7).standard_normal(inp.shape).astype(np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    start = time.perf_counter()
    while len(times) < 200 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {
        "latency_us_median": statistics.median(times),
        "latency_us_p90": times[int(0.9 * (len(times) - 1))],
        "latency_us_min": times[0],
        "runs": len(times),
    }


def time_sbdnet(exe, path, threads, seconds, warmup):
    out = subprocess.run(
        [exe, "bench", "model", path, "--batch", "1", "--threads", str(threads),
         "--seconds", str(seconds), "--warmup", str(warmup), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--sbd", nargs="+", required=True)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--sbdnet", nargs="+", default=[os.environ.get("SBDNET", "target/release/sbdnet")])
    a = ap.parse_args()
    rows = {}
    for r in range(a.rounds):
        for t in a.threads:
            m = time_ort(a.onnx, t, a.seconds, a.warmup)
            m.update(engine="onnxruntime " + ort.__version__, model=a.onnx, threads=t, round=r)
            print(json.dumps(m), flush=True)
            rows.setdefault((a.onnx, t), []).append(m["latency_us_median"])
            for s in a.sbd:
                for i, exe in enumerate(a.sbdnet):
                    m = time_sbdnet(exe, s, t, a.seconds, a.warmup)
                    name = s if len(a.sbdnet) == 1 else f"{s} [{i}]"
                    m.update(engine="sbdnet", binary=exe, model=name, threads=t, round=r)
                    print(json.dumps(m), flush=True)
                    rows.setdefault((name, t), []).append(m["latency_us_median"])
    print()
    print(f"{'model':<40} {'threads':>7} {'median us (per round)':>34} {'ORT/this':>9}")
    for t in a.threads:
        ort_med = statistics.median(rows[(a.onnx, t)])
        names = a.sbd if len(a.sbdnet) == 1 else [f"{s} [{i}]" for s in a.sbd for i in range(len(a.sbdnet))]
        for name in [a.onnx] + names:
            meds = rows[(name, t)]
            med = statistics.median(meds)
            per = " ".join(f"{v:.1f}" for v in meds)
            print(f"{os.path.basename(name):<40} {t:>7} {per:>34} {ort_med / med:>8.2f}x")


if __name__ == "__main__":
    main()
