#!/usr/bin/env python3
"""Run an ONNX model with ONNX Runtime (CPU) on .npy inputs; write each output as .npy.

The reference peer for `slimnn run`, with the same command line:

    ort_run.py MODEL.onnx (--input NAME=FILE.npy ... | --input-dir DIR) --output-dir DIR
               [--threads N] [--opt-level all|disable]

--input NAME=FILE.npy   one graph input (repeatable)
--input-dir DIR         every DIR/*.npy is an input named by its file stem
                        (may be combined with --input; --input wins on a clash)
--output-dir DIR        gets <output name>.npy for every graph output, each char of
                        the name outside [A-Za-z0-9._-] replaced by '_'
--threads N             intra-op threads (default 0: ONNX Runtime's choice);
                        inter-op is always 1 (sequential execution)
--opt-level             ONNX Runtime graph optimisations: all (default) or disable

Arrays are passed with their stored dtype: no casting. Prints one line per
output and the wall time of the single session.run() call to stderr.
Run it with the repo venv (scripts/setup-python.sh): .venv/bin/python.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(name: str) -> str:
    return _UNSAFE.sub("_", name)


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"ort_run: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="ort_run.py",
        description="Run an ONNX model with ONNX Runtime (CPUExecutionProvider) on .npy inputs.",
    )
    ap.add_argument("model", help="MODEL.onnx")
    ap.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                    help="a graph input and the .npy file holding it (repeatable)")
    ap.add_argument("--input-dir", metavar="DIR",
                    help="every DIR/*.npy is an input named by its file stem")
    ap.add_argument("--output-dir", required=True, metavar="DIR",
                    help="where <output name>.npy is written for every graph output")
    ap.add_argument("--threads", type=int, default=0, metavar="N",
                    help="intra-op threads (default 0: ONNX Runtime decides)")
    ap.add_argument("--opt-level", choices=("all", "disable"), default="all",
                    help="ONNX Runtime graph optimisation level (default: all)")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    return args


def load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")


def collect_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    if args.input_dir:
        if not os.path.isdir(args.input_dir):
            fail(f"--input-dir {args.input_dir}: not a folder")
        for entry in sorted(os.listdir(args.input_dir)):
            if entry.endswith(".npy"):
                feeds[entry[: -len(".npy")]] = load_npy(os.path.join(args.input_dir, entry))
    seen: set[str] = set()
    for spec in args.input:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"--input {spec!r}: expected NAME=FILE.npy")
        if name in seen:
            fail(f"--input {name}: given twice")
        seen.add(name)
        feeds[name] = load_npy(path)
    return feeds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    if not os.path.isfile(args.model):
        fail(f"{args.model}: no such file")
    feeds = collect_inputs(args)

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[args.opt_level]
    try:
        sess = ort.InferenceSession(args.model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        fail(f"ONNX Runtime cannot load {args.model}: {e}")

    required = [i.name for i in sess.get_inputs()]
    allowed = set(required) | {i.name for i in sess.get_overridable_initializers()}
    unknown = sorted(set(feeds) - allowed)
    if unknown:
        fail(f"unknown input(s) {', '.join(unknown)}; the model takes: {', '.join(required) or '(none)'}")
    missing = [n for n in required if n not in feeds]
    if missing:
        fail(f"missing input(s): {', '.join(missing)}")

    outputs = sess.get_outputs()
    files: dict[str, str] = {}
    for o in outputs:
        fname = safe_filename(o.name) + ".npy"
        if fname in files:
            fail(f"outputs {files[fname]!r} and {o.name!r} both map to the file {fname}")
        files[fname] = o.name

    t0 = time.perf_counter()
    try:
        results = sess.run([o.name for o in outputs], feeds)
    except Exception as e:  # noqa: BLE001
        fail(f"ONNX Runtime failed to run {args.model}: {e}")
    elapsed = time.perf_counter() - t0

    os.makedirs(args.output_dir, exist_ok=True)
    for o, value in zip(outputs, results):
        if not isinstance(value, np.ndarray):
            fail(f"output {o.name!r} is a {type(value).__name__}, not a tensor; cannot write .npy")
        if value.dtype == object:  # string tensors: store as fixed-width unicode, no pickling
            value = value.astype(str)
        path = os.path.join(args.output_dir, safe_filename(o.name) + ".npy")
        np.save(path, value, allow_pickle=False)
        print(f"ort_run: {o.name} -> {path} {value.dtype} {list(value.shape)}", file=sys.stderr)
    print(f"ort_run: run took {elapsed * 1e3:.3f} ms (threads={args.threads}, opt-level={args.opt_level})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
