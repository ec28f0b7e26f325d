"""
Export any checkpoint in llama2.c's model formats or as a Hugging Face Llama folder, and
bring models back in: a llama2.c .bin or a Hugging Face folder becomes a checkpoint that
eval.py, the views, sample.py and train.py --init_from=<ckpt> use.

$ python export.py model.bin --checkpoint=out/ckpt/ckpt_400.pt      # version 0 (legacy): ./run
$ python export.py model.bin --latest --out_dir=out --version=1     # fp32 with a header: ./run
$ python export.py model_q80.bin --latest --version=2               # int8 Q8_0: ./runq (make runq)
$ python export.py out/hf --latest --version=hf                     # a Hugging Face Llama folder
$ python export.py --from_hf=out/hf --out_dir=out/hf_import         # -> out/hf_import/ckpt/ckpt_0.pt
$ python export.py --from_bin=stories15M.bin --out_dir=out/s15M --max_seq_len=256  # llama2.c's models
$ python export.py model_q80.bin --from_bin=model.bin --version=2   # convert between formats

Formats (llama2.c's export.py, byte for byte; L = n_layers, every matrix row-major (out, in)):
  0  seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
     vocab_size < 0 when the classifier is separate), then fp32: token embedding, rms_att
     (L), wq (L), wk (L), wv (L), wo (L), rms_ffn (L), w1 (L), w2 (L), w3 (L), final rms,
     the legacy RoPE tables (cos, sin: seq_len x hs/2 each), the classifier when separate.
  1  a 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version, the seven int32
     (vocab_size > 0), uint8 shared_classifier, zeros; then fp32: rms_att (L), rms_ffn (L),
     final rms, token embedding, wq (L), wk (L), wv (L), wo (L), w1 (L), w2 (L), w3 (L),
     the classifier when separate.
  2  the same header with int32 group_size after the flag; fp32 rms_att, rms_ffn, final
     rms; then every matrix of version 1's order quantised Q8_0: per group of group_size
     consecutive values, scale = max|w| / 127 and q = round(w / scale) in int8 (the
     int8 values of a matrix, then its fp32 scales). group_size is 64, halved until it
     divides dim and hidden_dim.
  hf a folder: config.json, generation_config.json, model.safetensors and the tokenizer
     (tokenizer.model, tokenizer_config.json, special_tokens_map.json), wq/wk rows permuted
     to Hugging Face's RoPE layout (prebias/hf.py explains). Open it with
     transformers.LlamaForCausalLM.from_pretrained(folder) and LlamaTokenizer.from_pretrained(folder).
A classifier equal to the embedding is written as shared, as llama2.c does.
"""

import argparse
import struct
from pathlib import Path

import numpy as np
import torch

from model import MAX_POSITIONS, ModelArgs, Transformer
from prebias.checkpoint import (build_checkpoint, ckpt_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                                model_from_checkpoint, save_checkpoint, source_record)
from prebias.common import UserError, atomic_path, main_guard, write_json_atomic
from prebias.data import DATA_DIR, TABLES_DIR, sha256_file
from prebias.hf import export_hf, load_hf
from tokenizer import tokenizer_model_path

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V0_HEADER = struct.Struct("<7i")
VERSIONED_BYTES = 256
VERSIONS = ("0", "1", "2", "hf")
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


# -----------------------------------------------------------------------------
# one entry point for every version, and checkpoints from foreign models

def export_model(model: Transformer, path, version: str = "0", tokenizer_model=None, record=None,
                 group_size: int = GROUP_SIZE) -> Path:
    """Write model as version '0', '1', '2' (a file) or 'hf' (a folder, with the
    sentencepiece tokenizer_model when given; record goes into its metadata)."""
    if str(version) not in VERSIONS:
        raise UserError(f"--version={version}: choose one of {', '.join(VERSIONS)}")
    if str(version) == "hf":
        return export_hf(model, path, shared_classifier(model), tokenizer_model, record=record)
    return export_bin(model, path, int(version), group_size)


def import_checkpoint(model: Transformer, record: dict, out_dir, tokenizer_model=None, **config) -> Path:
    """Write <out_dir>/ckpt/ckpt_0.pt for a model that this toolkit did not train: a format-2
    checkpoint at step 0 with no batches seen, whose `init` record says where its weights
    came from (files and sha256). eval.py and the views read it; train.py
    --init_from=<it> continues from it with the run's provenance from then on."""
    out_dir = Path(out_dir)
    if list_checkpoints(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints: choose another --out_dir")
    a = model.params
    # the keys of train.py's config that eval.py and the views read (the rest keep their defaults)
    cfg = {"out_dir": str(out_dir), "data_dir": str(DATA_DIR), "tables_dir": str(TABLES_DIR), "dim": a.dim,
           "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
           "max_seq_len": a.max_seq_len}
    cfg.update({k: v for k, v in config.items() if v is not None})
    if cfg["max_seq_len"] > a.max_seq_len:
        raise UserError(f"--max_seq_len={cfg['max_seq_len']} is longer than the model's {a.max_seq_len} positions")
    tok_sha = sha256_file(tokenizer_model) if tokenizer_model else ""
    obj = build_checkpoint(
        model=model.state_dict(), model_args=a.to_dict(), config=cfg, iter_num=0,
        prev_iter=-1, record={"batch_ids": np.zeros((0, 0), np.int64), "pool_ids": np.zeros((0, 0), np.int64),
                              "insertions": np.zeros((0, 6), np.int64), "insert_tokens": np.zeros(0, np.int64),
                              "replaced_tokens": np.zeros(0, np.int64)},
        schedule={"imported": True, "fingerprint": "", "desc": f"imported ({record['kind']})"},
        data_meta={"vocab_size": a.vocab_size, "max_seq_len": cfg["max_seq_len"], "tokenizer_sha256": tok_sha,
                   "n_batches": 0},
        rng={"torch": torch.get_rng_state()}, train_loss=float("nan"), val_loss=float("nan"), init=record)
    path = ckpt_path(out_dir, 0)
    save_checkpoint(obj, path)
    write_json_atomic(out_dir / "config.json", cfg)
    return path


def tokenizer_of(ckpt: dict, given: str = ""):
    """The sentencepiece model a checkpoint's run was trained with (its data folder's, by
    vocab size), checked against the sha256 it recorded; or the --tokenizer given."""
    want = ckpt.get("data", {}).get("tokenizer_sha256", "")
    if given:
        p = Path(given)
        if not p.is_file():
            raise UserError(f"--tokenizer={given}: no such file")
    else:
        try:
            p = tokenizer_model_path(int(ckpt["config"]["vocab_size"]), ckpt["config"].get("data_dir", "data"))
        except UserError as e:
            raise UserError(f"{e}; or pass --tokenizer=path/to/tokenizer.model") from None
    if want and sha256_file(p) != want:
        raise UserError(f"tokenizer {p} is not the one the checkpoint was trained with (sha256 differs): "
                        "pass --tokenizer=<the run's tokenizer .model>")
    return p


def _load_input(a) -> tuple[Transformer, dict, dict | None]:
    """(model, provenance record, checkpoint dict or None) of the command line's input."""
    if a.from_hf:
        model, record = load_hf(a.from_hf)
        return model, record, None
    if a.from_bin:
        model = load_bin(a.from_bin)
        return model, {"kind": "bin", "from": str(Path(a.from_bin).resolve()),
                       "files": {Path(a.from_bin).name: sha256_file(a.from_bin)}}, None
    path = a.checkpoint or latest_checkpoint(a.out_dir)
    ck = load_checkpoint(path)
    return model_from_checkpoint(ck), source_record(path, ck), ck


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filepath", nargs="?", help="the output: a model file, or a folder for --version=hf")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a ckpt_<iter>.pt")
    src.add_argument("--latest", action="store_true", help="the newest checkpoint of --out_dir")
    src.add_argument("--from_hf", help="a Hugging Face Llama folder (config.json + weights)")
    src.add_argument("--from_bin", help="a llama2.c model file (version 0, 1 or 2)")
    ap.add_argument("--version", default="0", choices=VERSIONS)
    ap.add_argument("--group_size", type=int, default=GROUP_SIZE, help="version 2: values per Q8_0 group")
    ap.add_argument("--tokenizer", default="", help="the sentencepiece .model (default: the run's; for --from_hf "
                    "the folder's tokenizer.model)")
    ap.add_argument("--out_dir", default="out", help="--latest: the run; --from_hf/--from_bin without a filepath: "
                    "the folder for the imported checkpoint")
    ap.add_argument("--data_dir", default=None, help="import: the data folder its runs evaluate on")
    ap.add_argument("--tables_dir", default=None, help="import: where its batch_metrics.csv lives")
    ap.add_argument("--max_seq_len", type=int, default=None, help="import: the window length of its data "
                    "(default: the model's max positions)")
    a = ap.parse_args()
    if not (a.checkpoint or a.latest or a.from_hf or a.from_bin):
        raise UserError("give --checkpoint=PATH, --latest, --from_hf=FOLDER or --from_bin=FILE")
    if a.tokenizer and not Path(a.tokenizer).is_file():
        raise UserError(f"--tokenizer={a.tokenizer}: no such file")
    if not 0 < a.group_size <= 65536:  # 0 divided by zero, a negative one looped (group_size_for halves it)
        raise UserError(f"--group_size={a.group_size}: values per Q8_0 group, 1..65536 (default {GROUP_SIZE})")
    model, record, ck = _load_input(a)
    # the tokenizer: a checkpoint's run's (sha256-checked), else --tokenizer, else an HF folder's own
    folder_tok = Path(a.from_hf) / "tokenizer.model" if a.from_hf else None
    tok = a.tokenizer or (folder_tok if folder_tok and folder_tok.is_file() else None)
    note = "" if tok else " (without a tokenizer: pass --tokenizer=path/to/tokenizer.model)"
    if a.filepath is None:
        if ck is not None:
            raise UserError("give the output filepath (model.bin, or a folder for --version=hf)")
        path = import_checkpoint(model, record, a.out_dir, tok, data_dir=a.data_dir, tables_dir=a.tables_dir,
                                 max_seq_len=a.max_seq_len)
        print(f"wrote {path} from {record['from']}{note}")
        return
    if a.version == "hf" and ck is not None:
        tok, note = tokenizer_of(ck, a.tokenizer), ""
    export_model(model, a.filepath, a.version, tok if a.version == "hf" else None, record, a.group_size)
    print(f"wrote {a.filepath} (version {a.version}) from {record['from']}{note if a.version == 'hf' else ''}")

if __name__ == "__main__":
    main_guard(main)
