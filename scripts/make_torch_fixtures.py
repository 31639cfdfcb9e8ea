#!/usr/bin/env python3
"""Write small PyTorch checkpoints in both torch.save layouts, without torch.

    make_torch_fixtures.py OUT_DIR

Writes OUT_DIR/state_dict_zip.pt (the zip layout of PyTorch >= 1.6),
OUT_DIR/state_dict_legacy.pt (the legacy stream, `_use_new_zipfile_serialization=False`)
and OUT_DIR/expected.json (name, dtype, shape and values, row-major, of every tensor).

A stub `torch` module in sys.modules gives `pickle` the globals torch's own pickles
name (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage` ...), so the pickles are
opcode for opcode what torch writes for a state_dict: an OrderedDict with a `_metadata`
attribute (BUILD), tensors reduced to `_rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, OrderedDict())`, storages as persistent ids
`('storage', type, key, 'cpu', numel)` (plus a `None` view for the legacy layout).
The zip archive mirrors torch's too: entries under `<stem>/`, `data.pkl` first, then
`byteorder`, `data/<key>` stored uncompressed at 64-byte aligned offsets, `version`.

The tensors cover f32 (contiguous, transposed, offset into a shared storage, a 0-d
scalar), f16, bf16, f64 and i64.

Also written, for the error paths: missing_storage.pt (zip without data/3),
bad_global.pt (a zip whose pickle names builtins.eval, written as __builtin__.eval by protocol 2), not_tensors.pt (a zip of
{'epoch': 3, 'lr': 0.5}) and training.pt (a zip of {'epoch': 3, 'state_dict': sd},
which a reader should unwrap).
"""

import json
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# storage class name -> (struct format, dtype name in expected.json, element size)
KINDS = {
    "FloatStorage": ("<f", "f32", 4),
    "DoubleStorage": ("<d", "f64", 8),
    "HalfStorage": ("<e", "f16", 2),
    "BFloat16Storage": (None, "bf16", 2),
    "LongStorage": ("<q", "i64", 8),
}


def install_torch_stub():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise NotImplementedError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in KINDS:
        cls = type(name, (), {})
        cls.__module__ = "torch"
        setattr(torch, name, cls)
    torch._utils = utils
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch, _rebuild_tensor_v2


TORCH, REBUILD = install_torch_stub()


def bf16_bytes(v):
    # Round to nearest even, as torch does; the values here are exact in bf16 anyway.
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    bits += 0x7FFF + ((bits >> 16) & 1)
    return struct.pack("<H", bits >> 16)


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, list(values)

    def raw(self):
        fmt, _, _ = KINDS[self.kind]
        if fmt is None:
            return b"".join(bf16_bytes(v) for v in self.values)
        return b"".join(struct.pack(fmt, v) for v in self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce_ex__(self, protocol):
        return (REBUILD, (self.storage, self.offset, self.size, self.stride, False, OrderedDict()))

    def values(self):
        out = []

        def walk(dim, at):
            if dim == len(self.size):
                out.append(self.storage.values[at])
                return
            for i in range(self.size[dim]):
                walk(dim + 1, at + i * self.stride[dim])

        walk(0, self.offset)
        return out


class Pickler(pickle.Pickler):
    def __init__(self, f, legacy):
        super().__init__(f, protocol=2)
        self.legacy = legacy
        self.seen = OrderedDict()

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.seen[obj.key] = obj
        pid = ("storage", getattr(TORCH, obj.kind), obj.key, "cpu", len(obj.values))
        return pid + (None,) if self.legacy else pid


def state_dict():
    s_w = Storage("FloatStorage", "0", [0.5 * i - 3.0 for i in range(12)])
    s_h = Storage("HalfStorage", "1", [0.25, -1.5, 3.0, 1024.0])
    s_b = Storage("BFloat16Storage", "2", [1.0, -2.0, 0.375, 96.0, 7.0, -0.0078125])
    s_d = Storage("DoubleStorage", "3", [3.141592653589793, -2.718281828459045])
    s_l = Storage("LongStorage", "4", [-(2**40), 7, 2**52 + 1])
    sd = OrderedDict()
    sd["conv.weight"] = Tensor(s_w, 0, (3, 4), (4, 1))  # contiguous
    sd["conv.weight_t"] = Tensor(s_w, 0, (4, 3), (1, 4))  # transposed view of the same storage
    sd["conv.window"] = Tensor(s_w, 5, (2, 2), (4, 1))  # offset into the shared storage
    sd["scale"] = Tensor(s_w, 11, (), ())  # a 0-d tensor
    sd["half"] = Tensor(s_h, 1, (3,), (1,))
    sd["bf16"] = Tensor(s_b, 0, (2, 3), (1, 2))  # column-major (TF-style) strides
    sd["double"] = Tensor(s_d, 0, (2,), (1,))
    sd["steps"] = Tensor(s_l, 0, (3,), (1,))
    sd._metadata = OrderedDict([("", {"version": 1}), ("conv", {"version": 1})])
    return sd


def write_legacy(path, sd):
    import io

    buf = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}}):
        pickle.dump(obj, buf, protocol=2)
    p = Pickler(buf, legacy=True)
    p.dump(sd)
    keys = list(p.seen)
    pickle.dump(keys, buf, protocol=2)
    for key in keys:
        s = p.seen[key]
        buf.write(struct.pack("<q", len(s.values)))
        buf.write(s.raw())
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_zip(path, sd, drop=()):
    import io

    stem = os.path.splitext(os.path.basename(path))[0]
    buf = io.BytesIO()
    p = Pickler(buf, legacy=False)
    p.dump(sd)
    entries = [("data.pkl", buf.getvalue()), ("byteorder", b"little")]
    entries += [(f"data/{k}", s.raw()) for k, s in p.seen.items() if k not in drop]
    entries += [("version", b"3\n")]
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(f"{stem}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # torch pads each record's local header with an extra field so data is 64-byte aligned.
            header = 30 + len(info.filename.encode())
            start = raw.tell() + header + 4
            pad = (-start) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            z.writestr(info, data)


def expected(sd):
    out = []
    for name, t in sd.items():
        out.append({"name": name, "dtype": KINDS[t.storage.kind][1], "shape": list(t.size), "values": t.values()})
    return out


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    sd = state_dict()
    write_zip(os.path.join(out, "state_dict_zip.pt"), sd)
    write_legacy(os.path.join(out, "state_dict_legacy.pt"), sd)
    write_zip(os.path.join(out, "missing_storage.pt"), sd, drop=("3",))
    write_zip(os.path.join(out, "bad_global.pt"), OrderedDict([("w", eval)]))
    write_zip(os.path.join(out, "not_tensors.pt"), {"epoch": 3, "lr": 0.5})
    write_zip(os.path.join(out, "training.pt"), {"epoch": 3, "state_dict": sd})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected(sd), f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
