"""
llama2.c's model files, versions 0, 1 and 2, byte for byte as llama2.c's export.py writes
them: the tensors of each version in order (layout), writing them (export_bin, with Q8_0
quantisation for version 2) and reading any of them back as a Transformer (load_bin, with
the same checks as run.c and runq.c). export.py at the root is the command face, and
re-exports these names; the byte layout of each version is in its docstring.

$ python -c "from prebias.llama2c import load_bin; print(load_bin('model.bin').params)"
"""

import struct
from pathlib import Path

import numpy as np
import torch

from model import MAX_POSITIONS, ModelArgs, Transformer
from prebias.common import UserError, atomic_path

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V0_HEADER = struct.Struct("<7i")
VERSIONED_BYTES = 256
GROUP_SIZE = 64  # llama2.c's default Q8_0 group
RUN_EPS = 1e-5  # the RMSNorm epsilon run.c and runq.c compute with
FIX = "re-export it with python export.py"


# -----------------------------------------------------------------------------
# the layout: one list of (state dict name, shape) per version, used to write and to read

def shared_classifier(model: Transformer) -> bool:
    return torch.equal(model.tok_embeddings.weight, model.output.weight)


def layout(version: int, a: ModelArgs, shared: bool) -> list[tuple[str, tuple]]:
    """The tensors of a version's file in order, as (model.py state dict name, shape);
    rope_cos/rope_sin are version 0's legacy tables (model.py's buffers)."""
    dim, hid, L, V = a.dim, a.hidden_dim, a.n_layers, a.vocab_size
    hs, kv = a.dim // a.n_heads, a.n_kv_heads * (a.dim // a.n_heads)
    shape = {"attention_norm": (dim,), "attention.wq": (dim, dim), "attention.wk": (kv, dim),
             "attention.wv": (kv, dim), "attention.wo": (dim, dim), "ffn_norm": (dim,),
             "feed_forward.w1": (hid, dim), "feed_forward.w2": (dim, hid), "feed_forward.w3": (hid, dim)}

    def per_layer(*names):
        return [(f"layers.{i}.{n}.weight", shape[n]) for n in names for i in range(L)]

    emb, norm = ("tok_embeddings.weight", (V, dim)), ("norm.weight", (dim,))
    mats = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
    ffn = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    if version == 0:
        items = [emb, *per_layer("attention_norm", *mats, "ffn_norm", *ffn), norm,
                 ("rope_cos", (a.max_seq_len, hs // 2)), ("rope_sin", (a.max_seq_len, hs // 2))]
    else:
        items = [*per_layer("attention_norm", "ffn_norm"), norm, emb, *per_layer(*mats, *ffn)]
    return items + ([] if shared else [("output.weight", (V, dim))])


def is_quantised(version: int, name: str, shape) -> bool:
    return version == 2 and len(shape) == 2


def group_size_for(a: ModelArgs, group_size: int = GROUP_SIZE) -> int:
    """llama2.c's rule (halve until it divides dim), also made to divide hidden_dim, which
    runq's products over a hidden vector need."""
    while a.dim % group_size or a.hidden_dim % group_size:
        group_size //= 2
    return group_size


def quantize_q80(w: torch.Tensor, group_size: int):
    """llama2.c's Q8_0 (the same torch operations, so the same bytes): symmetric int8 in
    [-127, 127] per group of group_size values. Returns (int8 values, fp32 scales, max
    error). A group of zeros gets scale 0 and values 0 (llama2.c would divide by zero)."""
    w = w.detach().float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).to(torch.int8)
    err = (q.float() * scale[:, None] - w).abs().max().item()
    return q.view(-1), scale, err


# -----------------------------------------------------------------------------
# writing

def _header(version: int, a: ModelArgs, shared: bool, group_size: int) -> bytes:
    shape = (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)
    if version == 0:
        return V0_HEADER.pack(*shape[:5], a.vocab_size if shared else -a.vocab_size, shape[6])
    h = struct.pack("<Ii", MAGIC, version) + V0_HEADER.pack(*shape) + struct.pack("<B", int(shared))
    if version == 2:
        h += struct.pack("<i", group_size)
    return h + b"\0" * (VERSIONED_BYTES - len(h))


def export_bin(model: Transformer, path, version: int = 0, group_size: int = GROUP_SIZE) -> Path:
    """Write a llama2.c model file of version 0, 1 or 2, atomically."""
    a = model.params
    if abs(a.norm_eps - RUN_EPS) > 1e-12:
        raise UserError(f"this model's RMSNorm epsilon is {a.norm_eps} but run.c computes with {RUN_EPS}: "
                        "a .bin would compute another function; export it with --version=hf")
    shared = shared_classifier(model)
    gs = group_size_for(a, group_size) if version == 2 else 0
    sd = {**model.state_dict(), "rope_cos": model.rope_cos, "rope_sin": model.rope_sin}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_header(version, a, shared, gs))
        for name, shape in layout(version, a, shared):
            t = sd[name].detach().float().cpu()[:shape[0]]  # the RoPE tables: seq_len rows
            if is_quantised(version, name, shape):
                q, s, _ = quantize_q80(t, gs)
                f.write(q.numpy().tobytes())
                f.write(s.numpy().astype("<f4").tobytes())
            else:
                f.write(t.numpy().astype("<f4").tobytes())
    return Path(path)


def export_v0(model: Transformer, path) -> Path:
    return export_bin(model, path, 0)


# -----------------------------------------------------------------------------
# reading: the same checks as run.c and runq.c, then the tensors

def read_header(raw: bytes, path) -> dict:
    """version, args (ModelArgs), shared, group_size, header_bytes of a model file."""
    if len(raw) < V0_HEADER.size:
        raise UserError(f"model file {path} is {len(raw)} bytes, too short for a header: {FIX}")
    h = {"version": 0, "group_size": 0, "header_bytes": V0_HEADER.size}
    if struct.unpack_from("<I", raw)[0] == MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        if version not in (1, 2):
            raise UserError(f"model file {path} has llama2.c's magic 'ak42' but version {version}; "
                            f"versions 0, 1 and 2 exist: {FIX}")
        if len(raw) < VERSIONED_BYTES:
            raise UserError(f"model file {path} is {len(raw)} bytes, too short for the 256-byte header of a "
                            f"version-{version} export: {FIX}")
        shape = V0_HEADER.unpack_from(raw, 8)
        flag = raw[36]
        used = 41 if version == 2 else 37
        if flag > 1 or any(raw[used:VERSIONED_BYTES]) or shape[5] <= 0:
            raise UserError(f"model file {path} has a version-{version} header with unknown contents "
                            f"(shared flag {flag}, vocab_size {shape[5]}): {FIX}")
        h.update(version=version, shared=flag == 1, header_bytes=VERSIONED_BYTES,
                 group_size=struct.unpack_from("<i", raw, 37)[0] if version == 2 else 0)
    else:
        shape = V0_HEADER.unpack_from(raw)
        h["shared"] = shape[5] > 0
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = shape
    vocab = abs(vocab)
    gs = h["group_size"]
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab < 2 or dim % n_heads or \
            n_heads % n_kv or (dim // n_heads) % 2 or (h["version"] == 2 and not (0 < gs <= 65536 and dim % gs == 0
                                                                           and hidden % gs == 0)):
        raise UserError(f"model file {path} has an invalid header {shape}"
                        + (f" (group_size {gs})" if h["version"] == 2 else "") + f": {FIX}")
    if seq_len > MAX_POSITIONS:  # versions 1 and 2 hold no RoPE table: the file size does not bound it
        raise UserError(f"model file {path} has seq_len {seq_len}: at most {MAX_POSITIONS} positions are read "
                        f"(the RoPE table is built for each): {FIX}")
    h["args"] = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                          hidden_dim=hidden, max_seq_len=seq_len, shared_classifier=h["shared"])
    return h


def tensor_bytes(version: int, name: str, shape, group_size: int) -> int:
    n = int(np.prod(shape))
    return n + 4 * (n // group_size) if is_quantised(version, name, shape) else 4 * n


def read_bin(path) -> tuple[dict, dict]:
    """(header, {name: fp32 tensor}) of a llama2.c model file of any version; version 2's
    tensors dequantised (q * scale). The size must match the header exactly."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read model file {path}: {e.strerror}") from None
    h = read_header(raw, path)
    v, a, gs = h["version"], h["args"], h["group_size"]
    items = layout(v, a, h["shared"])
    want = h["header_bytes"] + sum(tensor_bytes(v, n, s, gs) for n, s in items)
    if len(raw) != want:
        raise UserError(f"model file {path} has {len(raw)} bytes but its version-{v} header implies {want} "
                        f"(truncated, or not a llama2.c model file): {FIX}")
    out, at = {}, h["header_bytes"]
    for name, shape in items:
        n = int(np.prod(shape))
        if is_quantised(v, name, shape):
            q = np.frombuffer(raw, np.int8, n, at).astype(np.float32).reshape(-1, gs)
            s = np.frombuffer(raw, "<f4", n // gs, at + n)
            arr = (q * s[:, None]).reshape(shape)  # float32 q * scale, as runq dequantises
        else:
            arr = np.frombuffer(raw, "<f4", n, at).reshape(shape)
        out[name] = torch.from_numpy(arr.copy())
        at += tensor_bytes(v, name, shape, gs)
    return h, out


def fake_quantise(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """runq's quantize() of activations, then back to float: per group of the last axis,
    scale = max|x| / 127 and round(x / scale) half away from zero (C's roundf)."""
    g = x.float().reshape(*x.shape[:-1], -1, group_size)
    scale = g.abs().amax(-1, keepdim=True) / 127.0
    v = g / torch.where(scale > 0, scale, 1.0)
    r = torch.where((v - v.trunc()).abs() == 0.5, v.trunc() + v.sign(), torch.round(v))
    return (r * scale).reshape(x.shape).type_as(x)


def simulate_runq(model: Transformer, group_size: int) -> Transformer:
    """Make model compute as runq does: the input of every linear layer quantised to Q8_0
    first (its weights are already the dequantised ones). The products then differ from
    runq's only in float summation order."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda _m, inp: (fake_quantise(inp[0], group_size),))
    model.q80_group_size = group_size
    return model


def load_bin(path, activations: bool = True) -> Transformer:
    """A llama2.c model file of any version as a Transformer (fp32, CPU). Version 2 gives
    the dequantised weights with runq's activation quantisation (simulate_runq; with
    activations=False the weights alone)."""
    h, tensors = read_bin(path)
    model = Transformer(h["args"])
    sd = {k: v for k, v in tensors.items() if not k.startswith("rope_")}
    if h["shared"]:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd)
    if h["version"] == 2 and activations:
        simulate_runq(model, h["group_size"])
    return model.eval()


load_v0 = load_bin  # the name other modules import: it reads every version
