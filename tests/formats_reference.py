"""Independent numpy readers of llama2.c's versioned model files (version 1: fp32 with a
header; version 2: int8 Q8_0 in groups), a Q8_0 quantiser and an int8 forward pass,
written from the format description (llama2.c's export.py docstrings and runq.c's
header comment), sharing no code with export.py or runq.c.

Version 1 and 2 files: a 256-byte header
    uint32 magic 0x616b3432 ("ak42"), int32 version,
    int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
    uint8 shared_classifier, [version 2: int32 group_size], zero bytes up to 256;
then version 1: fp32 rms_att (L, dim), rms_ffn (L, dim), rms_final (dim), embedding
(V, dim), wq, wk, wv, wo, w1, w2, w3 (each (L, out, in)), wcls (V, dim) if not shared;
version 2: the same three norms in fp32, then each matrix (the embedding, then every
layer's wq, ..., every layer's w3, then wcls if not shared) as its int8 values followed
by fp32 scales, one per group of group_size consecutive values.

Q8_0: per group, scale = max|w| / 127, q = round(w / scale) (round half to even, as
torch.round in llama2.c's export), w ~ q * scale with |w - q * scale| <= scale / 2.

The int8 forward (runq.c): the embedding row dequantised; before each matrix product its
input is quantised per group (scale = max|x| / 127, q = round half away from zero of
x / scale, as C's round), and a product is sum over groups of
float(sum_k q_x q_w) * scale_w * scale_x; the rest (RMSNorm with eps 1e-5, RoPE on
adjacent pairs with theta 10000, causal attention, SwiGLU) in fp32."""

import struct
from pathlib import Path

import numpy as np

F32 = np.float32


def q80(w: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp32 scales) of w flattened in groups of gs."""
    g = np.asarray(w, F32).reshape(-1, gs)
    s = (np.abs(g).max(axis=1) / F32(127.0)).astype(F32)
    safe = np.where(s > 0, s, F32(1.0)).astype(F32)
    q = np.round(g / safe[:, None]).astype(np.int8)
    return q.reshape(-1), s


def parse(path) -> dict:
    """The header fields and tensors of a version 1 or 2 file. Matrices are (L, out, in)
    arrays (version 1) or lists over layers of (q (out, in) int8, scales) pairs (version 2)."""
    raw = Path(path).read_bytes()
    magic, version = struct.unpack_from("<Ii", raw, 0)
    assert magic == 0x616B3432 and version in (1, 2)
    dim, hid, L, nh, nkv, V, T = struct.unpack_from("<7i", raw, 8)
    shared = raw[36]
    gs = struct.unpack_from("<i", raw, 37)[0] if version == 2 else 0
    assert not any(raw[41 if version == 2 else 37:256])
    kv = dim // nh * nkv
    h = dict(version=version, dim=dim, hidden_dim=hid, n_layers=L, n_heads=nh, n_kv_heads=nkv, vocab_size=V,
             seq_len=T, shared=shared, group_size=gs)
    at = 256

    def f32(n):
        nonlocal at
        a = np.frombuffer(raw, "<f4", n, at)
        at += 4 * n
        return a

    def q8(rows, cols):
        nonlocal at
        n = rows * cols
        q = np.frombuffer(raw, np.int8, n, at).reshape(rows, cols)
        s = np.frombuffer(raw, "<f4", n // gs, at + n)
        at += n + 4 * (n // gs)
        return q, s

    h["rms_att"], h["rms_ffn"], h["rms_final"] = f32(L * dim).reshape(L, dim), f32(L * dim).reshape(L, dim), f32(dim)
    shapes = [("wq", dim, dim), ("wk", kv, dim), ("wv", kv, dim), ("wo", dim, dim), ("w1", hid, dim),
              ("w2", dim, hid), ("w3", hid, dim)]
    if version == 1:
        h["emb"] = f32(V * dim).reshape(V, dim)
        for name, r, c in shapes:
            h[name] = f32(L * r * c).reshape(L, r, c)
        h["wcls"] = h["emb"] if shared else f32(V * dim).reshape(V, dim)
    else:
        h["emb"] = q8(V, dim)
        for name, r, c in shapes:
            h[name] = [q8(r, c) for _ in range(L)]
        h["wcls"] = h["emb"] if shared else q8(V, dim)
    assert at == len(raw), "the file holds more than its header describes"
    return h


def dequant(qs) -> np.ndarray:
    q, s = qs
    gs = q.size // s.size
    return (q.reshape(-1, gs).astype(F32) * s[:, None]).reshape(q.shape)


def quant_act(x: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """runq's quantisation of an activation: round half away from zero, in float64 from the
    float32 quotient (exact), a group of zeros giving zeros."""
    g = x.astype(F32).reshape(-1, gs)
    s = (np.abs(g).max(axis=1) / F32(127.0)).astype(F32)
    v = (g / np.where(s > 0, s, F32(1.0))[:, None]).astype(F32).astype(np.float64)
    q = np.where(s[:, None] > 0, np.trunc(v + np.copysign(0.5, v)), 0).astype(np.int64)
    return q.reshape(-1), s


def qmatvec(qs, xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(out,) = W x for W given as (q, scales), x quantised: exact int sums per group, then
    float32 float(ival) * scale_w * scale_x summed over the groups."""
    q, s = qs
    rows, cols = q.shape
    gs = q.size // s.size
    ival = np.einsum("rgk,gk->rg", q.reshape(rows, cols // gs, gs).astype(np.int64), xq.reshape(-1, gs))
    terms = (ival.astype(F32) * s.reshape(rows, -1)).astype(F32) * xs[None, :]
    return terms.astype(F32).sum(axis=1, dtype=F32)


class Int8Reference:
    def __init__(self, path):
        self.h = parse(path)
        assert self.h["version"] == 2

    def rmsnorm(self, x, w):
        return (w * (x / np.sqrt(np.mean(x * x, dtype=F32) + F32(1e-5)))).astype(F32)

    def rope(self, v, pos):
        hs = self.h["dim"] // self.h["n_heads"]
        r = v.reshape(-1, hs // 2, 2)
        ang = (pos * (1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))).astype(F32)
        c, s = np.cos(ang).astype(F32), np.sin(ang).astype(F32)
        return np.stack([r[..., 0] * c - r[..., 1] * s, r[..., 0] * s + r[..., 1] * c], -1).reshape(-1).astype(F32)

    def logits(self, tokens) -> np.ndarray:
        h = self.h
        gs, dim, nh, nkv = h["group_size"], h["dim"], h["n_heads"], h["n_kv_heads"]
        hs, L = dim // nh, h["n_layers"]
        keys, vals, out = [[] for _ in range(L)], [[] for _ in range(L)], []

        def mm(w, x):
            return qmatvec(w, *quant_act(x, gs))
        for pos, tok in enumerate(tokens):
            q, s = h["emb"]
            x = (q[tok].astype(F32) * np.repeat(s.reshape(h["vocab_size"], -1)[tok], gs)).astype(F32)
            for l in range(L):
                xb = self.rmsnorm(x, h["rms_att"][l])
                keys[l].append(self.rope(mm(h["wk"][l], xb), pos))
                vals[l].append(mm(h["wv"][l], xb))
                qv = self.rope(mm(h["wq"][l], xb), pos)
                K = np.stack(keys[l]).reshape(pos + 1, nkv, hs)
                Vv = np.stack(vals[l]).reshape(pos + 1, nkv, hs)
                heads = []
                for j in range(nh):
                    g = j // (nh // nkv)
                    sc = (K[:, g] @ qv[j * hs:(j + 1) * hs] / np.sqrt(F32(hs))).astype(F32)
                    p = np.exp(sc - sc.max())
                    heads.append(((p / p.sum()) @ Vv[:, g]).astype(F32))
                x = (x + mm(h["wo"][l], np.concatenate(heads))).astype(F32)
                xb = self.rmsnorm(x, h["rms_ffn"][l])
                a, b = mm(h["w1"][l], xb), mm(h["w3"][l], xb)
                x = (x + mm(h["w2"][l], (a * (F32(1) / (F32(1) + np.exp(-a))) * b).astype(F32))).astype(F32)
            out.append(mm(h["wcls"], self.rmsnorm(x, h["rms_final"])))
        return np.stack(out)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(prompt):]
