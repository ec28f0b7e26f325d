"""
The Hugging Face Llama folder, both ways, with no Hugging Face package needed:
config.json (LlamaConfig's keys), model.safetensors (written and read here from the
format's description; tests check it against the `safetensors` package and
transformers' LlamaForCausalLM when the optional extra is installed), the sentencepiece
tokenizer for LlamaTokenizer, and the q/k permutation between the two RoPE layouts.

$ python export.py out/hf --latest --version=hf                # a run's model -> a folder
$ python export.py --from_hf=out/hf --out_dir=out/hf_import    # a folder -> a checkpoint

RoPE layouts. model.py (as llama2.c and Meta's code) rotates adjacent pairs (x[2i],
x[2i+1]) of each head by pos * theta^(-2i/hs); transformers' LlamaAttention rotates the
pair (x[i], x[i + hs/2]) by the same angle ("rotate_half"). Both compute the same
function when each head's rows of wq and wk are reordered: Hugging Face row i (< hs/2)
is our row 2i, row hs/2 + i is our row 2i + 1 (transformers'
convert_llama_weights_to_hf.py `permute`; llama2.c's PR #286 gave gibberish without it).
wv, wo and the MLP are not rotated and keep their order.

safetensors file: uint64 little-endian N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} (padded with spaces to a multiple
of 8), then the tensors' bytes, little-endian, row-major, offsets relative to the end of
the header.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import MAX_POSITIONS, ModelArgs, Transformer
from prebias.common import UserError, atomic_path, json_loads
from prebias.data import BOS_ID, EOS_ID, sha256_file

ROPE_THETA = 10000.0  # model.py's and run.c's (rope_cache, rope())
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
# per-layer tensors: ours -> Hugging Face's (LlamaForCausalLM state dict names)
LAYER_NAMES = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
               "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
               "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# -----------------------------------------------------------------------------
# safetensors

def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """{name: tensor} -> a .safetensors file, atomically (tensors keep their dtype: F32, F16, BF16)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {list(NAMES)}")
        b = (t.view(torch.int16) if t.dtype != torch.float32 else t).numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def read_safetensors(path) -> dict:
    """A .safetensors file -> {name: tensor}; every offset and size is checked first."""
    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    fix = "it is not a safetensors file, or it is truncated: export it again"
    if len(raw) < 8:
        raise UserError(f"{path} is {len(raw)} bytes, too short for a safetensors header: {fix}")
    n = int(np.frombuffer(raw[:8].tobytes(), "<u8")[0])
    if n > len(raw) - 8:
        raise UserError(f"{path} declares a {n}-byte header but has {len(raw) - 8} bytes after its size: {fix}")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except ValueError:
        raise UserError(f"{path}: its header is not JSON: {fix}") from None
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = DTYPES.get(info.get("dtype"))
        if dt is None:
            raise UserError(f"{path}: tensor {name} has dtype {info.get('dtype')}; this reader takes {list(DTYPES)}")
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        size = count * torch.tensor([], dtype=dt).element_size()
        if not 0 <= begin <= end <= len(raw) - base or end - begin != size:
            raise UserError(f"{path}: tensor {name} {info['shape']} has offsets {begin}..{end} outside the "
                            f"{len(raw) - base} data bytes or not {size} bytes long: {fix}")
        arr = np.frombuffer(raw, np.int16 if dt != torch.float32 else np.float32, count, base + begin)
        out[name] = torch.from_numpy(arr.copy()).view(dt).reshape(info["shape"])
    return out


# -----------------------------------------------------------------------------
# the RoPE permutation

def to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * hs, dim) from adjacent pairs to Hugging Face's halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of to_hf_rope."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -----------------------------------------------------------------------------
# out: a model -> a folder

def hf_config(model: Transformer, shared: bool, dtype=torch.float32) -> dict:
    """config.json: LlamaConfig's keys (rope_theta both at the top, as transformers 4 reads it,
    and in rope_parameters, as transformers 5 does)."""
    a = model.params
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab_size,
            "hidden_size": a.dim, "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0],
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "head_dim": a.dim // a.n_heads, "hidden_act": "silu",
            "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps, "rope_theta": ROPE_THETA,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}, "rope_scaling": None,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": shared,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "initializer_range": 0.02, "pretraining_tp": 1,
            "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch.")}


def hf_state_dict(model: Transformer, shared: bool, dtype=torch.float32) -> dict:
    """LlamaForCausalLM's tensors (lm_head.weight only when not shared: a tied model's is
    the embedding, and safetensors stores no shared tensors)."""
    a, sd = model.params, model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"]}
    for i in range(a.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours in ("attention.wq", "attention.wk"):
                w = to_hf_rope(w, a.n_heads if ours == "attention.wq" else a.n_kv_heads)
            out[f"model.layers.{i}.{theirs}.weight"] = w
    out["model.norm.weight"] = sd["norm.weight"]
    if not shared:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def write_tokenizer(folder: Path, tokenizer_model, max_len: int):
    """The sentencepiece model and the files LlamaTokenizer reads beside it."""
    shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", **specials, "pad_token": None, "add_bos_token": True,
         "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True,
         "model_max_length": max_len, "sp_model_kwargs": {}}, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def export_hf(model: Transformer, folder, shared: bool, tokenizer_model=None, dtype=torch.float32,
              record: dict | None = None) -> Path:
    """Write the Hugging Face folder: config.json, generation_config.json, model.safetensors
    and (with tokenizer_model) the tokenizer; record (where the weights came from) goes
    into the safetensors metadata. The folder appears whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(model, shared, dtype), indent=2) + "\n")
        # the models end a story by starting the next (BOS), as run.c stops: both end generation
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "do_sample": False}, indent=2) + "\n")
        meta = {"llama2_prebiasing": json.dumps(record or {}, sort_keys=True)}
        write_safetensors(tmp / "model.safetensors", hf_state_dict(model, shared, dtype), meta)
        if tokenizer_model:
            write_tokenizer(tmp, tokenizer_model, model.params.max_seq_len)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# -----------------------------------------------------------------------------
# in: a folder -> a model

def _config_args(cfg: dict, where: Path) -> ModelArgs:
    """ModelArgs of a LlamaConfig, refusing what model.py and run.c do not compute."""
    def bad(what):
        return UserError(f"{where}/config.json: {what}; model.py and run.c compute a plain Llama-2 "
                         "(silu MLP, no biases, RoPE with theta 10000 and no scaling)")
    if cfg.get("model_type") != "llama":
        raise bad(f"model_type is {cfg.get('model_type')!r}, not 'llama'")
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", ROPE_THETA))
    if float(theta) != ROPE_THETA or rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise bad(f"RoPE has theta {theta} / type {rope.get('rope_type')} / scaling {cfg.get('rope_scaling')}")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise bad(f"hidden_act={cfg.get('hidden_act')}, attention_bias={cfg.get('attention_bias')}, "
                  f"mlp_bias={cfg.get('mlp_bias')}")
    dim, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    sizes = {k: cfg.get(k, 1) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                         "intermediate_size", "max_position_embeddings")}
    if not all(isinstance(v, int) and v > 0 for v in sizes.values()) or \
            sizes["max_position_embeddings"] > MAX_POSITIONS:
        raise bad(f"sizes {sizes}: each a positive integer, max_position_embeddings at most {MAX_POSITIONS} (its "
                  "RoPE table is built before any weight is read)")
    if cfg.get("head_dim") not in (None, dim // nh) or dim % nh or (dim // nh) % 2:
        raise bad(f"head_dim {cfg.get('head_dim')} is not hidden_size / num_attention_heads = {dim / nh} (even)")
    return ModelArgs(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=nh,
                     n_kv_heads=int(cfg.get("num_key_value_heads") or nh), vocab_size=int(cfg["vocab_size"]),
                     hidden_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                     max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                     shared_classifier=bool(cfg.get("tie_word_embeddings", False)))


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, the shards its index names, or pytorch_model.bin."""
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"]
    raise UserError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin: "
                    "pass a Hugging Face Llama folder (as written by save_pretrained)")


def _read_weights(files: list[Path]) -> dict:
    sd = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(read_safetensors(f))
        else:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001  pickle / zip errors of a damaged or foreign file
                raise UserError(f"{f} cannot be read as a state dict ({type(e).__name__}): export it again") from None
    return sd


def _take(sd: dict, name: str, shape, where: Path) -> torch.Tensor:
    if name not in sd:
        raise UserError(f"{where}: tensor {name} is missing: not a LlamaForCausalLM of its config.json")
    t = sd.pop(name)
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{where}: tensor {name} has shape {tuple(t.shape)}, its config.json implies {tuple(shape)}")
    return t.float()


def load_hf(folder) -> tuple[Transformer, dict]:
    """(model, record) of a Hugging Face Llama folder; the record names the folder and the
    sha256 of every file read, for the checkpoint's provenance."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: pass a Hugging Face Llama folder")
    try:
        cfg = json_loads((folder / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{folder}/config.json is not JSON ({e})") from None
    args = _config_args(cfg, folder)
    files = _weight_files(folder)
    sd = _read_weights(files)
    kv, hid = args.n_kv_heads * (args.dim // args.n_heads), args.hidden_dim
    shapes = {"attention_norm": (args.dim,), "attention.wq": (args.dim, args.dim), "attention.wk": (kv, args.dim),
              "attention.wv": (kv, args.dim), "attention.wo": (args.dim, args.dim), "ffn_norm": (args.dim,),
              "feed_forward.w1": (hid, args.dim), "feed_forward.w2": (args.dim, hid), "feed_forward.w3": (hid, args.dim)}
    ours = {"tok_embeddings.weight": _take(sd, "model.embed_tokens.weight", (args.vocab_size, args.dim), folder)}
    for i in range(args.n_layers):
        for name, theirs in LAYER_NAMES.items():
            w = _take(sd, f"model.layers.{i}.{theirs}.weight", shapes[name], folder)
            if name in ("attention.wq", "attention.wk"):
                w = from_hf_rope(w, args.n_heads if name == "attention.wq" else args.n_kv_heads)
            ours[f"layers.{i}.{name}.weight"] = w
    ours["norm.weight"] = _take(sd, "model.norm.weight", (args.dim,), folder)
    head = sd.pop("lm_head.weight", None)
    if args.shared_classifier:
        if head is not None and not torch.equal(head.float(), ours["tok_embeddings.weight"]):
            raise UserError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        ours["output.weight"] = ours["tok_embeddings.weight"]  # the same parameter in a tied Transformer
    else:
        if head is None:
            raise UserError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
        sd["lm_head.weight"] = head
        ours["output.weight"] = _take(sd, "lm_head.weight", (args.vocab_size, args.dim), folder)
    extra = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]  # older exports keep RoPE's buffer
    if extra:
        raise UserError(f"{folder}: tensors {extra[:3]} are not part of a plain Llama model")
    model = Transformer(args)
    model.load_state_dict(ours)  # strict: every tensor of model.py's Transformer is set
    names = ["config.json", *[f.name for f in files], *[n for n in TOKENIZER_FILES if (folder / n).exists()]]
    record = {"kind": "hf", "from": str(folder.resolve()), "files": {n: sha256_file(folder / n) for n in names},
              "config": cfg}
    return model.eval(), record
