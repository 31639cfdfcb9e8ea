#!/usr/bin/env python3
"""Quantize an fp32 ONNX model with onnxruntime.quantization, the way users of ORT do.

    quantize_ort.py IN.onnx OUT_DIR [--calibration DIR] [--op-types MatMul,...]
                    [--dynamic-op-types OPS] [--no-preprocess]

Writes into OUT_DIR:
  dynamic.onnx          quantize_dynamic: QInt8 per-channel weights; ORT writes
                        DynamicQuantizeLinear + MatMulInteger + Cast + Mul.
  static_qdq.onnx       quantize_static, QuantFormat.QDQ: QUInt8 activations, QInt8
                        per-channel weights, as QuantizeLinear/DequantizeLinear pairs.
  static_qoperator.onnx quantize_static, QuantFormat.QOperator: QLinearMatMul etc.
(the static two only with --calibration).

--calibration DIR   DIR/<set>/<input name>.npy: one calibration batch per sub-folder
                    (e.g. input_ids, attention_mask, token_type_ids of tokenized text)
--op-types LIST     op types the static models quantize (default MatMul: the only op of
                    a transformer whose QOperator form stays in the default ONNX domain;
                    "" gives ORT's defaults, whose QOperator form of a BERT has
                    com.microsoft QLinearAdd, QLinearMul and QLinearSoftmax)
--dynamic-op-types LIST
                    op types dynamic.onnx quantizes (default: ORT's own default set,
                    which for a BERT is MatMul and the embedding Gathers)
--no-preprocess     skip quant_pre_process (shape inference + ORT basic optimizations)

Prints the op histogram (domain-qualified when not the default domain) of each model
written, one line per model: `<file>: Op=count ...`.
Run it with the repo venv (scripts/setup-python.sh): .venv/bin/python.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile

import numpy as np


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"quantize_ort: {msg}", file=sys.stderr)
    sys.exit(1)


def load_calibration(folder: str, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """Every sub-folder of `folder` is one batch holding `<input>.npy` for each model input."""
    if not os.path.isdir(folder):
        fail(f"--calibration {folder}: not a folder")
    sets = []
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if not os.path.isdir(sub):
            continue
        feed = {}
        for name in input_names:
            path = os.path.join(sub, f"{name}.npy")
            if not os.path.isfile(path):
                fail(f"calibration set {sub} lacks {name}.npy")
            feed[name] = np.load(path, allow_pickle=False)
        sets.append(feed)
    if not sets:
        fail(f"--calibration {folder}: no sub-folder with .npy inputs")
    return sets


def histogram(path: str) -> str:
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node
    )
    return " ".join(f"{op}={c}" for op, c in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quantize_ort.py", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="fp32 IN.onnx")
    ap.add_argument("out_dir", help="folder for the quantized models")
    ap.add_argument("--calibration", metavar="DIR", help="folder of calibration sets (sub-folders of .npy)")
    ap.add_argument("--op-types", default="MatMul", help="comma-separated op types the static models quantize")
    ap.add_argument("--dynamic-op-types", default="", help="comma-separated op types dynamic.onnx quantizes")
    ap.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    args = ap.parse_args(argv)

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    # ORT's quantizer logs advice (pre-processing, QDQ vs QOperator) as warnings; keep errors.
    logging.getLogger().setLevel(logging.ERROR)

    if not os.path.isfile(args.model):
        fail(f"{args.model}: no such file")
    os.makedirs(args.out_dir, exist_ok=True)
    op_types = [t for t in args.op_types.split(",") if t]
    # None lets quantize_dynamic pick its defaults, as a user calling it plainly gets.
    dynamic_op_types = [t for t in args.dynamic_op_types.split(",") if t] or None
    input_names = [i.name for i in onnx.load(args.model, load_external_data=False).graph.input]
    calib = load_calibration(args.calibration, input_names) if args.calibration else None

    with tempfile.TemporaryDirectory(prefix="quantize_ort.") as tmp:
        src = args.model
        if not args.no_preprocess:
            # ONNX shape inference gives the quantizer every tensor's type; the basic ORT
            # optimizations it also runs keep to default-domain ops. Symbolic shape inference
            # needs sympy, which the repo venv lacks; ONNX's alone lets every MatMul of a BERT
            # be quantized.
            src = os.path.join(tmp, "pre.onnx")
            quant_pre_process(args.model, src, skip_symbolic_shape=True)

        written = []
        out = os.path.join(args.out_dir, "dynamic.onnx")
        quantize_dynamic(
            src,
            out,
            op_types_to_quantize=dynamic_op_types,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
        written.append(out)

        if calib is not None:

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(calib)

                def get_next(self):
                    return next(self.it, None)

                def rewind(self) -> None:
                    self.it = iter(calib)

            for fmt, name in ((QuantFormat.QDQ, "static_qdq.onnx"), (QuantFormat.QOperator, "static_qoperator.onnx")):
                out = os.path.join(args.out_dir, name)
                quantize_static(
                    src,
                    out,
                    Reader(),
                    quant_format=fmt,
                    op_types_to_quantize=op_types,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
                written.append(out)

    for path in written:
        print(f"{os.path.basename(path)}: {histogram(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
