#!/usr/bin/env python3
"""Write the ONNX backend node tests of the installed `onnx` package to disk.

Usage: gen_onnx_node_tests.py OUTDIR [--op-type OP]

The onnx wheel ships the test *generators* (onnx.backend.test.case.node), not the
data. This writes every case in the layout of the Debian libonnx-testdata package:

    OUTDIR/<case>/model.onnx
    OUTDIR/<case>/test_data_set_<N>/input_<K>.pb    serialized TensorProto
    OUTDIR/<case>/test_data_set_<N>/output_<K>.pb   serialized TensorProto

Cases whose graph inputs or outputs are not plain tensors (sequence, optional,
map or sparse types) are skipped and counted. OUTDIR/summary.json records the
onnx version, the cases written, and each skipped case with its reason.
Run it with the repo venv (scripts/setup-python.sh): .venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings


def non_tensor_kind(type_proto) -> str | None:
    """None for a plain tensor type, else the name of the type that is not one."""
    kind = type_proto.WhichOneof("value")
    return None if kind == "tensor_type" else (kind or "unset")


def to_tensor_proto(value, name: str):
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        t = TensorProto()
        t.CopyFrom(value)
        if not t.name:
            t.name = name
        return t
    return numpy_helper.from_array(value, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="folder to write the cases into (created if missing)")
    ap.add_argument("--op-type", help="only the cases of this operator")
    args = ap.parse_args()

    import onnx
    from onnx.backend.test.case import node as node_cases

    t0 = time.monotonic()
    with warnings.catch_warnings():
        # The generators compute expected outputs with numpy and deliberately
        # overflow / divide by zero in places (inf, nan cases): not our concern.
        warnings.simplefilter("ignore", RuntimeWarning)
        cases = node_cases.collect_testcases(args.op_type)
    os.makedirs(args.outdir, exist_ok=True)

    written: list[str] = []
    tolerances: set[tuple[float, float]] = set()
    skipped: dict[str, str] = {}
    for case in sorted(cases, key=lambda c: c.name):
        model = case.model
        graph = model.graph
        reason = None
        for role, vis in (("input", graph.input), ("output", graph.output)):
            for vi in vis:
                kind = non_tensor_kind(vi.type)
                if kind is not None:
                    reason = f"{role} {vi.name!r} is {kind}"
                    break
            if reason:
                break
        # Serialize everything first so a failure leaves no half-written case.
        files: dict[str, bytes] = {}
        if reason is None:
            files["model.onnx"] = model.SerializeToString()
            try:
                for n, (inputs, outputs) in enumerate(case.data_sets):
                    for role, values, vis in (("input", inputs, graph.input), ("output", outputs, graph.output)):
                        if len(values) > len(vis):
                            raise ValueError(f"{len(values)} {role} values for {len(vis)} graph {role}s")
                        for k, value in enumerate(values):
                            if value is None or isinstance(value, (list, dict)):
                                raise ValueError(f"{role} {k} is a {type(value).__name__}, not a tensor")
                            proto = to_tensor_proto(value, vis[k].name)
                            files[f"test_data_set_{n}/{role}_{k}.pb"] = proto.SerializeToString()
            except Exception as e:  # noqa: BLE001 - record and go on
                reason = f"cannot serialize data: {e}"
        if reason is not None:
            skipped[case.name] = reason
            continue
        case_dir = os.path.join(args.outdir, case.name)
        if os.path.exists(case_dir):
            shutil.rmtree(case_dir)
        for rel, data in files.items():
            path = os.path.join(case_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        written.append(case.name)
        tolerances.add((case.rtol, case.atol))

    summary = {
        "onnx_version": onnx.__version__,
        "generator": "scripts/gen_onnx_node_tests.py",
        "op_type": args.op_type,
        "cases_written": len(written),
        "cases_skipped": len(skipped),
        "skipped": skipped,
        # (rtol, atol) pairs onnx's own backend runner compares these outputs with
        "tolerances_rtol_atol": sorted(tolerances),
    }
    with open(os.path.join(args.outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    print(
        f"gen_onnx_node_tests: onnx {onnx.__version__}: wrote {len(written)} cases, "
        f"skipped {len(skipped)} (sequence/optional/other non-tensor I/O) "
        f"into {args.outdir} in {time.monotonic() - t0:.1f} s"
    )
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
