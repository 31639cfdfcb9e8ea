#!/usr/bin/env python3
"""Build an ONNX EfficientNet-Lite0 from a legacy PyTorch checkpoint, without torch.

    efficientnet_onnx.py PTH OUT.onnx [--images IMG ... --npy-dir DIR]

PTH is a legacy (non-zip) `torch.save` of an efficientnet_pytorch state_dict
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` ...). It is read with `pickle`
alone. The graph is opset 13: Conv with explicit TF "SAME" pads (static, for a
224x224 input: more padding at the end), BatchNormalization as its own node
(not folded into the convs, so that a runtime has to run it), Clip(0, 6) as
ReLU6, Add for the skips, GlobalAveragePool, Flatten and Gemm. Input `input`
f32 [1,3,224,224], output `logits` f32 [1,1000].

With --images, each image is preprocessed as the TF EfficientNet eval pipeline
does (centre crop of 224/256 of the shorter side, bicubic resize to 224x224,
(x - 127) / 128 on RGB 0..255), written as DIR/<stem>.npy, run with ONNX
Runtime, and its top-5 printed. Known images are checked: china -> 698
(palace), flower -> 985 (daisy); a mismatch exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import struct
import sys
from collections import OrderedDict

import numpy as np

IMAGE_SIZE = 224
CROP_PADDING = 32
BN_EPS = 1e-3
MEAN, STD = 127.0, 128.0

# EfficientNet-B0 block args (Lite0 has width and depth 1.0):
# (repeats, kernel, stride, expand ratio, output channels).
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM, HEAD, CLASSES = 32, 1280, 1000

# ImageNet ids the test images must be classified as.
EXPECTED = {"china": (698, "palace"), "flower": (985, "daisy")}

# ---------------------------------------------------------------- legacy .pth

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorStub:
    """What `_rebuild_tensor_v2` returns until the storages have been read."""

    def __init__(self, key: str, offset: int, size: tuple, stride: tuple):
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return _TensorStub(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    """Maps torch's classes to stand-ins; anything else is refused (no arbitrary code)."""

    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-1.0 checkpoints) are not supported")
        known = self.storages.setdefault(key, (stype, numel))
        if known[0].dtype != stype.dtype:
            raise pickle.UnpicklingError(f"storage {key} used with two dtypes")
        return key


def load_legacy_state_dict(path: str) -> "OrderedDict[str, np.ndarray]":
    """Reads a legacy torch.save file: magic, protocol, sys_info, object, storage keys, storages."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise ValueError(f"{path} is a zip checkpoint, not the legacy format")
        f.seek(0)
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: bad magic number {magic!r}")
        protocol = pickle.load(f)
        if protocol != 1001:
            raise ValueError(f"{path}: unsupported protocol version {protocol}")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        storages: dict = {}
        obj = _LegacyUnpickler(f, storages).load()
        keys = pickle.load(f)
        data = {}
        for key in keys:
            if key not in storages:
                raise ValueError(f"{path}: storage {key} is not used by any tensor")
            stype, numel = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            if count != numel:
                raise ValueError(f"{path}: storage {key} holds {count} elements, expected {numel}")
            raw = f.read(count * stype.dtype.itemsize)
            if len(raw) != count * stype.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated")
            data[key] = np.frombuffer(raw, dtype=stype.dtype)
    out = OrderedDict()
    for name, t in obj.items():
        if not isinstance(t, _TensorStub):
            raise ValueError(f"{path}: {name} is not a tensor")
        buf = data[t.key]
        # Reach = last element touched; every stride/size must stay inside the storage.
        if any(s < 0 for s in t.stride) or len(t.size) != len(t.stride):
            raise ValueError(f"{name}: bad strides {t.stride}")
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else t.offset - 1
        if t.offset < 0 or last >= buf.size:
            raise ValueError(f"{name}: view {t.size}/{t.stride}+{t.offset} exceeds its storage of {buf.size}")
        it = buf.itemsize
        view = np.lib.stride_tricks.as_strided(
            buf[t.offset:], shape=t.size, strides=tuple(s * it for s in t.stride), writeable=False
        )
        out[name] = np.ascontiguousarray(view)
    return out


# ---------------------------------------------------------------- ONNX graph


def same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TF SAME padding for one axis, as Conv2dStaticSamePadding: the odd pixel goes at the end."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Builder:
    def __init__(self, sd: "OrderedDict[str, np.ndarray]"):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.sd = sd
        self.used: set[str] = set()
        self.nodes = []
        self.inits = []
        self.counter = 0

    def weight(self, name: str, shape: tuple | None = None) -> str:
        if name not in self.sd:
            raise KeyError(f"checkpoint has no {name}")
        w = self.sd[name].astype(np.float32)
        if shape is not None and w.shape != shape:
            raise ValueError(f"{name}: shape {w.shape}, expected {shape}")
        self.used.add(name)
        self.inits.append(self.numpy_helper.from_array(w, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, prefix: str, cin: int, cout: int, k: int, s: int, size: int, groups: int = 1) -> str:
        w = self.weight(f"{prefix}.weight", (cout, cin // groups, k, k))
        b0, b1 = same_pads(size, k, s)
        return self.node(
            "Conv", [x, w], prefix, kernel_shape=[k, k], strides=[s, s], pads=[b0, b0, b1, b1], group=groups
        )

    def bn(self, x: str, prefix: str, c: int) -> str:
        ins = [x] + [self.weight(f"{prefix}.{p}", (c,)) for p in ("weight", "bias", "running_mean", "running_var")]
        for extra in ("num_batches_tracked",):  # training bookkeeping, not part of the forward pass
            if f"{prefix}.{extra}" in self.sd:
                self.used.add(f"{prefix}.{extra}")
        return self.node("BatchNormalization", ins, prefix, epsilon=BN_EPS)

    def relu6(self, x: str) -> str:
        if "relu6_min" not in self.used:
            self.used.add("relu6_min")
            self.inits.append(self.numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"))
            self.inits.append(self.numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"))
        return self.node("Clip", [x, "relu6_min", "relu6_max"], f"{x}.relu6")


def build_model(sd: "OrderedDict[str, np.ndarray]"):
    from onnx import TensorProto, checker, helper

    b = Builder(sd)
    size = IMAGE_SIZE
    x = b.conv("input", "_conv_stem", 3, STEM, 3, 2, size)
    size = math.ceil(size / 2)
    x = b.relu6(b.bn(x, "_bn0", STEM))
    cin, idx = STEM, 0
    for repeats, k, stride, expand, cout in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"_blocks.{idx}"
            inp = x
            mid = cin * expand
            if expand != 1:
                x = b.relu6(b.bn(b.conv(x, f"{p}._expand_conv", cin, mid, 1, 1, size), f"{p}._bn0", mid))
            x = b.relu6(b.bn(b.conv(x, f"{p}._depthwise_conv", mid, mid, k, s, size, groups=mid), f"{p}._bn1", mid))
            size = math.ceil(size / s)
            x = b.bn(b.conv(x, f"{p}._project_conv", mid, cout, 1, 1, size), f"{p}._bn2", cout)
            if s == 1 and cin == cout:
                x = b.node("Add", [x, inp], f"{p}.add")
            cin, idx = cout, idx + 1
    x = b.relu6(b.bn(b.conv(x, "_conv_head", cin, HEAD, 1, 1, size), "_bn1", HEAD))
    x = b.node("GlobalAveragePool", [x], "pool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    fc_w = b.weight("_fc.weight", (CLASSES, HEAD))
    fc_b = b.weight("_fc.bias", (CLASSES,))
    b.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], ["logits"], name="_fc", transB=1))

    unused = sorted(set(sd) - b.used)
    if unused:
        raise ValueError(f"checkpoint tensors not used by the graph (wrong architecture?): {unused[:5]}")
    graph = helper.make_graph(
        b.nodes,
        "efficientnet-lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="slimnn")
    model.ir_version = 8
    checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- images


def preprocess(path: str) -> np.ndarray:
    """TF EfficientNet eval preprocessing: centre crop 224/(224+32) of the shorter side, bicubic
    resize to 224x224, then (x - 127) / 128 per RGB channel. Returns f32 [1,3,224,224]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        crop = int(IMAGE_SIZE / (IMAGE_SIZE + CROP_PADDING) * min(h, w))
        top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
        im = im.crop((left, top, left + crop, top + crop)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32)
    a = (a - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="efficientnet_onnx.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("pth", help="legacy efficientnet_pytorch checkpoint (.pth)")
    ap.add_argument("out", help="where to write the .onnx model")
    ap.add_argument("--images", nargs="*", default=[], metavar="IMG", help="images to preprocess and classify")
    ap.add_argument("--npy-dir", metavar="DIR", help="write DIR/<stem>.npy for each image")
    args = ap.parse_args(argv)

    import onnx

    sd = load_legacy_state_dict(args.pth)
    model = build_model(sd)
    onnx.save(model, args.out)
    params = sum(int(np.prod(sd[n].shape)) for n in sd if not n.endswith("num_batches_tracked"))
    print(f"wrote {args.out}: {len(model.graph.node)} nodes, {params} parameters (BN statistics included)")
    if not args.images:
        return 0

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.out, sess_options=so, providers=["CPUExecutionProvider"])
    if args.npy_dir:
        os.makedirs(args.npy_dir, exist_ok=True)
    ok = True
    for img in args.images:
        stem = os.path.splitext(os.path.basename(img))[0]
        x = preprocess(img)
        if args.npy_dir:
            np.save(os.path.join(args.npy_dir, f"{stem}.npy"), x, allow_pickle=False)
        logits = sess.run(["logits"], {"input": x})[0][0]
        p = softmax(logits.astype(np.float64))
        top = np.argsort(-logits)[:5]
        print(f"{stem}: " + ", ".join(f"{i} ({p[i]:.4f}, logit {logits[i]:.3f})" for i in top))
        if stem in EXPECTED:
            want, label = EXPECTED[stem]
            if top[0] != want:
                print(f"{stem}: expected class {want} ({label}), got {top[0]}", file=sys.stderr)
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
