"""
The Llama-2 transformer as llama2.c's: RoPE, RMSNorm, SwiGLU, grouped-query attention,
tied input/output embeddings (or a separate classifier, for imported models). Plus
batched KV-cached generation with a sampler that mirrors run.c's (same RNG, same top-p
rule), and capture of attention probabilities.

Dimension legend: B batch, T time, C = dim, nh query heads, nkv kv heads, hs head size.

$ python -c "from model import *; m = Transformer(ModelArgs(dim=64, n_layers=2)); print(m)"
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prebias.data import BOS_ID


MAX_POSITIONS = 1 << 20  # the most a model file may declare: its RoPE table is built, the file cannot bound it


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None
    vocab_size: int = 512
    hidden_dim: int | None = None
    multiple_of: int = 32  # SwiGLU hidden size rounds up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    shared_classifier: bool = True  # the output classifier is the token embedding (llama2.c's
    #                                  models); False for imported models with their own lm_head

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:  # llama2.c's rule: 2/3 of 4*dim, rounded up
            h = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        assert self.dim % self.n_heads == 0, "dim must be divisible by n_heads"
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half types, else the dtype itself: the norm and RoPE compute in at
    least float32, and a float64 model (prebias/magic.py's planted-truth checks) stays float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(wide(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(head_size: int, end: int, theta: float = 10000.0):
    """cos, sin of shape (end, hs/2): pair j of a head rotates by pos * theta^(-2j/hs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """x (B, T, n, hs) with adjacent pairs (x0, x1) rotated, as run.c does."""
    xr = x.to(wide(x.dtype)).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Per-layer key/value buffers (B, nkv, max_len, hs) filled as generation goes."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        hs = args.dim // args.n_heads
        shape = (batch, args.n_kv_heads, max_len, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.n_rep = args.n_heads // args.n_kv_heads
        self.head_size = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_size, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_size, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_size, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_size, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0, return_probs=False):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hs)
        if cache is not None:  # write this chunk, attend over everything so far
            cache.k[layer][:, :, start_pos:start_pos + T] = k
            cache.v[layer][:, :, start_pos:start_pos + T] = v
            k = cache.k[layer][:, :, :start_pos + T]
            v = cache.v[layer][:, :, :start_pos + T]
        # grouped-query attention: query head h reads kv head h // n_rep
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        T_k = k.shape[2]
        if T == T_k and not return_probs:  # training / prefill: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            probs = None
        else:  # cached step: query at start_pos+i sees keys 0..start_pos+i
            mask = torch.ones(T, T_k, dtype=torch.bool, device=x.device).tril(diagonal=T_k - T)
            if return_probs:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)
                probs = att.float().masked_fill(~mask, float("-inf")).softmax(-1)
                y = probs.type_as(v) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                probs = None
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y)), probs


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, start_pos=0, return_probs=False):
        a, probs = self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id,
                                  start_pos, return_probs)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), probs


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.shared_classifier:
            self.output.weight = self.tok_embeddings.weight  # tied, as llama2.c
        cos, sin = rope_cache(params.dim // params.n_heads, params.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, cache=None, start_pos=0, return_probs=False):
        """tokens (B, T) -> logits (B, T, V), loss (mean cross-entropy, or None) and,
        with return_probs, the attention probabilities of every layer (L, B, nh, T, S)."""
        B, T = tokens.shape
        # contiguous: train.py's inputs are a view (windows[:, :-1]), and the embedding's backward
        # on a strided index tensor cost ~4% of a step at dim 16 (1 thread); the same bits either way
        h = self.dropout(self.tok_embeddings(tokens.contiguous()))
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        all_probs = []
        for layer in self.layers:
            h, probs = layer(h, cos, sin, cache, start_pos, return_probs)
            all_probs.append(probs)
        logits = self.output(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        if return_probs:
            return logits, loss, torch.stack(all_probs)
        return logits, loss

    @torch.no_grad()
    def attention_probs(self, tokens) -> torch.Tensor:
        """Attention probabilities (L, B, nh, T, T) of every layer and head on tokens."""
        return self(tokens, return_probs=True)[2]

    # -------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused on CPU too (llama2.c fuses on CUDA only): one kernel over all tensors, ~4x faster
        # than the per-tensor loop (15M shape: 132 -> 34 ms a step, 1 thread), the same state dict;
        # deterministic, so a resumed run is still bitwise the uninterrupted one
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self) -> float:
        """PaLM appendix B: 6N + 12 L H Q T (forward + backward)."""
        N = sum(p.numel() for p in self.parameters())
        a = self.params
        return 6 * N + 12 * a.n_layers * a.n_heads * (a.dim // a.n_heads) * a.max_seq_len

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 0.0, seed: int = 1, stop_at_bos: bool = True) -> list[list[int]]:
        """Batched generation with a KV cache. prompts: list of token lists (any lengths,
        each starting with BOS as run.c's do). Returns the new tokens of each prompt.

        Rows whose prompt is longer keep feeding prompt tokens while shorter rows already
        sample, so no padding is needed. Sampling mirrors run.c: row i draws its coins
        from XorShift(seed + i), so row 0 with seed s equals `./run -s s`."""
        self.eval()
        dev = self.tok_embeddings.weight.device
        P = self.params.max_seq_len
        prompts = [list(p)[:P] for p in prompts]
        B, lens = len(prompts), [len(p) for p in prompts]
        # the token at index P can still be predicted (from position P-1), as run.c does
        total = min(max(lens) + max_new_tokens, P + 1)
        seqs = torch.zeros(B, total, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            seqs[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        plen = torch.tensor(lens, device=dev)
        cache = KVCache(self.params, B, min(total, P), dev, self.tok_embeddings.weight.dtype)
        rngs = [XorShiftRng(seed + i) for i in range(B)]
        done = [False] * B
        new = [[] for _ in range(B)]
        pos = min(lens)  # the index being predicted
        logits, _ = self(seqs[:, :pos], cache=cache, start_pos=0)  # prefill the common prefix
        logits = logits[:, -1]
        while pos < total:
            nxt = sample_logits(logits, temperature, top_k, top_p, rngs)
            nxt = torch.where(pos < plen, seqs[:, pos], nxt)  # still inside a prompt: teacher-force
            for i, t in enumerate(nxt.tolist()):  # one device->host copy per step
                if pos >= lens[i] and not done[i]:
                    if stop_at_bos and t == BOS_ID:
                        done[i] = True
                    else:
                        new[i].append(t)
                        done[i] = len(new[i]) >= max_new_tokens
            if all(done) or pos + 1 >= total:
                break
            seqs[:, pos] = nxt
            logits, _ = self(nxt[:, None], cache=cache, start_pos=pos)
            logits = logits[:, -1]
            pos += 1
        return new

    @torch.no_grad()
    def generate_nocache(self, prompt, max_new_tokens: int) -> list[int]:
        """Greedy generation that recomputes the whole sequence each step (llama2.c's
        model.generate): the baseline the KV cache is measured against."""
        self.eval()
        dev = self.tok_embeddings.weight.device
        idx = torch.tensor([prompt], dtype=torch.long, device=dev)
        out = []
        for _ in range(max_new_tokens):
            if idx.size(1) > self.params.max_seq_len:
                break
            logits, _ = self(idx)
            nxt = int(logits[0, -1].argmax())
            if nxt == BOS_ID:
                break
            out.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]], device=dev)], dim=1)
        return out


@torch.no_grad()
def mean_loss(model, data, ids: np.ndarray, batch_size: int, device: str,
              ctx=contextlib.nullcontext()) -> float:
    """Mean next-token cross-entropy (nats/token) of model over the batches `ids`,
    batch_size at a time. `data` is a data.BatchData; used for train.py's checkpoint
    losses and eval.py's."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        x, y = data.get(chunk)
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total += float(loss) * len(chunk)
    model.train(was_training)
    return total / len(ids)


@torch.no_grad()
def per_row_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each row, in eval mode (no dropout): the
    score of online batch selection (stream.py)."""
    was_training = model.training
    model.eval()
    logits, _ = model(x)
    model.train(was_training)
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    return ce.mean(1)


# -----------------------------------------------------------------------------
# sampling: the same algorithm and RNG as run.c, so that runs agree at a fixed seed

class XorShiftRng:
    """run.c's xorshift64* generator: random_u32 and random_f32 in [0, 1)."""
    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.MASK

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & self.MASK
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & self.MASK) >> 32

    def f32(self) -> float:
        return np.float32((self.u32() >> 8) / 16777216.0)


def sample_probs(probs: np.ndarray, coin: float, top_p: float) -> int:
    """Draw from probs with coin in [0,1): multinomial, or run.c's nucleus rule."""
    n = len(probs)
    if top_p <= 0 or top_p >= 1:
        idx = int(np.searchsorted(np.cumsum(probs, dtype=np.float32), coin, side="right"))
        return min(idx, n - 1)
    cutoff = (1.0 - top_p) / (n - 1)
    keep = np.flatnonzero(probs >= cutoff)
    keep = keep[np.argsort(-probs[keep], kind="stable")]
    cum = np.cumsum(probs[keep], dtype=np.float32)
    last = int(np.searchsorted(cum, np.float32(top_p), side="right"))  # first with cum > top_p
    last = min(last, len(keep) - 1)
    r = np.float32(coin) * cum[last]
    j = int(np.searchsorted(cum[:last + 1], r, side="right"))
    return int(keep[min(j, last)])


def sampling_problem(temperature: float, top_k: int, top_p: float) -> str:
    """'' when the sampler's settings are in range, else the line that says which is not
    (the commands raise it: eval.py, sample.py). run.c's rules: temperature 0 is greedy,
    top_p 0 or 1 plain sampling; a negative temperature or a top_p outside [0, 1] would
    silently mean one of those instead of what was asked."""
    if not (math.isfinite(temperature) and temperature >= 0):
        return f"--temperature={temperature}: must be a finite number >= 0 (0 = greedy only, no sampling)"
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        return f"--top_p={top_p}: must be in [0, 1] (a nucleus in (0, 1); 0 or 1 = plain sampling, as run.c's -p)"
    if top_k < 0:
        return f"--top_k={top_k}: must be >= 0 (0 = every token)"
    return ""


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  rngs: list) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is argmax (first maximum)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    out = []
    lf = logits.float().cpu().numpy() / np.float32(temperature)
    for i, row in enumerate(lf):
        if top_k:
            kth = np.partition(row, -top_k)[-top_k]
            row = np.where(row < kth, -np.inf, row).astype(np.float32)
        p = np.exp(row - row.max()).astype(np.float32)
        p /= np.cumsum(p, dtype=np.float32)[-1]  # sequential float32 sum, as run.c's loop
        out.append(sample_probs(p, rngs[i].f32(), top_p))
    return torch.tensor(out, device=logits.device)
