#!/usr/bin/env python3
"""Time ONNX Runtime (CPU) on one model and one input set, as `slimnn bench --vs-onnxruntime` asks.

    ort_bench.py MODEL.onnx --input-dir DIR --threads N [--warmup W] [--iterations I]

Every DIR/*.npy is an input named by its file stem. ONNX Runtime runs at its best: graph
optimisations ORT_ENABLE_ALL, intra-op threads N, inter-op 1, sequential execution.
Prints one JSON object: {"median_ms", "min_ms", "max_ms", "iterations", "threads", "version"}.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(prog="ort_bench.py")
    ap.add_argument("model")
    ap.add_argument("--input-dir", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported as one line
        print(f"ort_bench: cannot load {a.model}: {e}", file=sys.stderr)
        sys.exit(1)
    feeds = {}
    for p in sorted(glob.glob(os.path.join(a.input_dir, "*.npy"))):
        feeds[os.path.splitext(os.path.basename(p))[0]] = np.load(p)
    for _ in range(a.warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "iterations": a.iterations,
        "threads": a.threads,
        "version": ort.__version__,
    }))


if __name__ == "__main__":
    main()
