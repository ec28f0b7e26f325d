"""An independent reference for the Llama-2 forward pass, written from the equations in
float64 numpy and reading llama2.c's version-0 .bin itself, so that model.py and run.c
are each checked against something that shares no code with them.

    h      = embedding[token]
    per layer:
      x    = rmsnorm(h) * w_att            rmsnorm(x) = x / sqrt(mean(x^2) + 1e-5)
      q, k, v = Wq x, Wk x, Wv x           (k, v have n_kv_heads heads)
      q, k rotated pairwise: (x[2i], x[2i+1]) by angle pos * 10000^(-2i / head_size)
      head j attends with kv head j // (n_heads / n_kv_heads), scores q.k / sqrt(head_size),
      causal softmax, over the cached keys/values of positions 0..pos
      h   += Wo concat(heads)
      x    = rmsnorm(h) * w_ffn
      h   += W2 (silu(W1 x) * (W3 x))      silu(z) = z / (1 + e^-z)
    logits = Wcls (rmsnorm(h) * w_final)   (Wcls = embedding when shared)
"""

import struct
from pathlib import Path

import numpy as np


class Reference:
    def __init__(self, path):
        raw = Path(path).read_bytes()
        dim, hidden, L, nh, nkv, V, T = struct.unpack_from("7i", raw)
        shared, V = V > 0, abs(V)
        w = np.frombuffer(raw, dtype=np.float32, offset=28).astype(np.float64)
        hs, kvd = dim // nh, dim // nh * nkv
        shapes = [("emb", (V, dim)), ("att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kvd, dim)),
                  ("wv", (L, kvd, dim)), ("wo", (L, dim, dim)), ("ffn", (L, dim)), ("w1", (L, hidden, dim)),
                  ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("final", (dim,)),
                  ("fr", (T, hs // 2)), ("fi", (T, hs // 2))]
        at = 0
        for name, shape in shapes:
            n = int(np.prod(shape))
            setattr(self, name, w[at:at + n].reshape(shape))
            at += n
        self.cls = self.emb if shared else w[at:at + V * dim].reshape(V, dim)
        self.dim, self.L, self.nh, self.nkv, self.hs, self.V, self.T = dim, L, nh, nkv, hs, V, T

    @staticmethod
    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * w

    def rope(self, x, pos):
        """Rotate each (x[2i], x[2i+1]) pair of each head by pos * 10000^(-2i/hs)."""
        x = x.reshape(-1, self.hs // 2, 2)
        ang = pos * 10000.0 ** (-np.arange(0, self.hs, 2) / self.hs)
        c, s = np.cos(ang), np.sin(ang)
        return np.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], -1).reshape(-1)

    def logits(self, tokens) -> np.ndarray:
        """(len(tokens), V) logits, one position at a time with a key/value cache."""
        keys = [[] for _ in range(self.L)]
        vals = [[] for _ in range(self.L)]
        out = []
        for pos, tok in enumerate(tokens):
            h = self.emb[tok].copy()
            for layer in range(self.L):
                x = self.rmsnorm(h, self.att[layer])
                q = self.rope(self.wq[layer] @ x, pos)
                keys[layer].append(self.rope(self.wk[layer] @ x, pos))
                vals[layer].append(self.wv[layer] @ x)
                K = np.stack(keys[layer]).reshape(pos + 1, self.nkv, self.hs)
                Vv = np.stack(vals[layer]).reshape(pos + 1, self.nkv, self.hs)
                heads = []
                for j in range(self.nh):
                    g = j // (self.nh // self.nkv)
                    sc = K[:, g] @ q[j * self.hs:(j + 1) * self.hs] / np.sqrt(self.hs)
                    p = np.exp(sc - sc.max())
                    heads.append((p / p.sum()) @ Vv[:, g])
                h = h + self.wo[layer] @ np.concatenate(heads)
                x = self.rmsnorm(h, self.ffn[layer])
                a = self.w1[layer] @ x
                h = h + self.w2[layer] @ (a / (1 + np.exp(-a)) * (self.w3[layer] @ x))
            out.append(self.cls @ self.rmsnorm(h, self.final))
        return np.stack(out)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """Greedy continuation (recomputing from the start is fine at these sizes)."""
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(prompt):]
