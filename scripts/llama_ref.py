#!/usr/bin/env python3
"""Float64 reference forward of a llama-family GGUF model (numpy only), for slimnn's checks.

Independent of slimnn's code: its own GGUF reader and dequantizers (F32, F16, Q8_0, Q4_0,
Q4_1), and Hugging Face's formulation of the model: the converter's Q/K row permutation is
undone and RoPE uses HF's "rotate half" pairing. Everything is computed in float64.

Usage: llama_ref.py MODEL.gguf IDS.json OUT.npy
  IDS.json: a list of token-id lists; OUT.npy: float64 [len(list), vocab], the logits of the last
  position of each list.
"""
import json
import struct
import sys

import numpy as np


def read_gguf(path):
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = bytes(buf[: 8 << 20])  # the header fits in the first MiB for the models used here
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = raw[pos : pos + n].decode("utf-8")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"metadata type {t}")

    assert raw[:4] == b"GGUF", "not a GGUF file"
    pos = 4
    take("I")
    n_tensors, n_meta = take("Q"), take("Q")
    meta = {}
    for _ in range(n_meta):
        k = string()
        meta[k] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    return meta, {n: (d, t, start + o) for n, d, t, o in infos}, buf


BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


def dequant(buf, info):
    dims, ty, off = info
    n = int(np.prod(dims))
    vals, nbytes = BLOCK[ty]
    raw = np.asarray(buf[off : off + n // vals * nbytes])
    if ty == 0:
        x = raw.view(np.float32).astype(np.float64)
    elif ty == 1:
        x = raw.view(np.float16).astype(np.float64)
    else:
        b = raw.reshape(-1, nbytes)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
        if ty == 8:
            q = b[:, 2:].view(np.int8).astype(np.float64)
            x = d * q
        else:
            qs = b[:, 2:] if ty == 2 else b[:, 4:]
            q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)
            if ty == 2:
                x = d * (q - 8)
            else:
                m = b[:, 2:4].copy().view(np.float16).astype(np.float64)
                x = d * q + m
    return x.reshape(list(reversed(dims)))


def unpermute(w, heads):
    """GGUF row order -> Hugging Face row order of a Q or K projection."""
    rows, cols = w.shape
    hd = rows // heads
    return w.reshape(heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def main():
    model, ids_path, out_path = sys.argv[1:4]
    meta, infos, buf = read_gguf(model)
    arch = meta["general.architecture"]
    layers = meta[f"{arch}.block_count"]
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    d = meta[f"{arch}.embedding_length"]
    hd = d // heads
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta.get(f"{arch}.rope.freq_base", 10000.0)
    prompts = json.load(open(ids_path))

    W = lambda name: dequant(buf, infos[name])  # noqa: E731
    emb = W("token_embd.weight")
    xs = [emb[np.array(p)] for p in prompts]
    inv_freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)

    def rope(x, n_heads):  # x [seq, n_heads * hd], HF rotate-half pairing
        s = x.shape[0]
        ang = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        x = x.reshape(s, n_heads, hd)
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    for i in range(layers):
        p = f"blk.{i}."
        wq = unpermute(W(p + "attn_q.weight"), heads)
        wk = unpermute(W(p + "attn_k.weight"), kv_heads)
        wv, wo = W(p + "attn_v.weight"), W(p + "attn_output.weight")
        wg, wu, wd = W(p + "ffn_gate.weight"), W(p + "ffn_up.weight"), W(p + "ffn_down.weight")
        an, fn = W(p + "attn_norm.weight"), W(p + "ffn_norm.weight")
        for j, x in enumerate(xs):
            s = x.shape[0]
            h = rms_norm(x, an, eps)
            q, k, v = rope(h @ wq.T, heads), rope(h @ wk.T, kv_heads), (h @ wv.T).reshape(s, kv_heads, hd)
            group = heads // kv_heads
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            scores = scores + np.triu(np.full((s, s), -np.inf), 1)[None]
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", probs, v).reshape(s, d)
            x = x + a @ wo.T
            m = rms_norm(x, fn, eps)
            g = m @ wg.T
            x = x + ((g / (1 + np.exp(-g))) * (m @ wu.T)) @ wd.T
            xs[j] = x
    head = W("output.weight") if "output.weight" in infos else emb
    on = W("output_norm.weight")
    logits = np.stack([rms_norm(x[-1], on, eps) @ head.T for x in xs])
    np.save(out_path, logits)


if __name__ == "__main__":
    main()
