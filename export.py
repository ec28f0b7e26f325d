"""
llama2.c version-0 ("legacy") model.bin: export from a checkpoint, and load back.

$ python export.py model.bin --checkpoint=out/ckpt/ckpt_100.pt
$ python export.py model.bin --latest --out_dir=out       # the run's newest checkpoint

Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
max_seq_len; vocab_size < 0 when the classifier is not shared with the embedding),
then fp32: token embedding, per-layer rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
final rms, the legacy RoPE tables (cos, sin: max_seq_len x hs/2 each), and the
classifier when unshared. Files written by llama2.c load here and the reverse.
"""

import argparse
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import ModelArgs, Transformer
from prebias.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint
from prebias.common import UserError, atomic_path, main_guard

HEADER = struct.Struct("7i")


def _layer_tensors(model: Transformer):
    L = model.layers
    yield from (l.attention_norm.weight for l in L)
    for name in ("wq", "wk", "wv", "wo"):
        yield from (getattr(l.attention, name).weight for l in L)
    yield from (l.ffn_norm.weight for l in L)
    for name in ("w1", "w2", "w3"):
        yield from (getattr(l.feed_forward, name).weight for l in L)


def export_v0(model: Transformer, path) -> Path:
    """Write model in llama2.c's legacy format, atomically."""
    p = model.params
    shared = model.output.weight is model.tok_embeddings.weight
    header = HEADER.pack(p.dim, model.layers[0].feed_forward.w1.weight.shape[0], p.n_layers,
                         p.n_heads, p.n_kv_heads, p.vocab_size if shared else -p.vocab_size,
                         p.max_seq_len)
    tensors = [model.tok_embeddings.weight, *_layer_tensors(model), model.norm.weight,
               model.rope_cos[:p.max_seq_len], model.rope_sin[:p.max_seq_len]]
    if not shared:
        tensors.append(model.output.weight)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for t in tensors:
            f.write(t.detach().float().cpu().numpy().astype("<f4").tobytes())
    return Path(path)


def load_v0(path) -> Transformer:
    """Read a llama2.c legacy model.bin into a Transformer (fp32, CPU)."""
    path = Path(path)
    fix = "re-export it with python export.py"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read model file {path}: {e.strerror}") from None
    if len(raw) < HEADER.size:
        raise UserError(f"model file {path} is too short for a header: {fix}")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw)
    shared, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or \
            n_heads % n_kv or (dim // n_heads) % 2:
        raise UserError(f"model file {path} has an invalid header "
                        f"{(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)}: {fix}")
    hs, kv_dim = dim // n_heads, dim * n_kv // n_heads
    sizes = [vocab * dim] + [dim] * n_layers + [dim * dim] * n_layers + [kv_dim * dim] * n_layers * 2 \
        + [dim * dim] * n_layers + [dim] * n_layers + [hidden * dim] * n_layers * 3 + [dim] \
        + [seq_len * hs // 2] * 2 + ([] if shared else [vocab * dim])
    expected = HEADER.size + 4 * sum(sizes)
    if len(raw) != expected:
        raise UserError(f"model file {path} has {len(raw)} bytes but its header implies "
                        f"{expected} (truncated or not a v0 model.bin): {fix}")
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=vocab, hidden_dim=hidden, max_seq_len=seq_len)
    model = Transformer(args)
    if not shared:
        model.output = nn.Linear(dim, vocab, bias=False)
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    targets = [model.tok_embeddings.weight, *_layer_tensors(model), model.norm.weight]
    chunks = flat.split(sizes)
    with torch.no_grad():
        for t, c in zip(targets, chunks):
            t.copy_(c.view_as(t))
        if not shared:
            model.output.weight.copy_(chunks[-1].view(vocab, dim))
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filepath", help="the output model.bin")
    ap.add_argument("--checkpoint", help="a ckpt_<iter>.pt")
    ap.add_argument("--latest", action="store_true", help="use the newest checkpoint of --out_dir")
    ap.add_argument("--out_dir", default="out")
    a = ap.parse_args()
    if not a.checkpoint and not a.latest:
        raise UserError("give --checkpoint=PATH or --latest")
    ckpt_path = a.checkpoint or latest_checkpoint(a.out_dir)
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    export_v0(model, a.filepath)
    print(f"wrote {a.filepath} from {ckpt_path}")


if __name__ == "__main__":
    main_guard(main)
