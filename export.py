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
from pathlib import Path

import numpy as np
import torch

from model import Transformer
from prebias.checkpoint import (build_checkpoint, ckpt_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                                model_from_checkpoint, save_checkpoint, source_record)
from prebias.common import UserError, main_guard, write_json_atomic
from prebias.data import DATA_DIR, TABLES_DIR, sha256_file
from prebias.hf import export_hf, load_hf
from prebias.llama2c import (GROUP_SIZE, MAGIC, RUN_EPS, V0_HEADER, VERSIONED_BYTES, export_bin,  # noqa: F401
                             export_v0, fake_quantise, group_size_for, layout, load_bin, load_v0, quantize_q80,
                             read_bin, read_header, shared_classifier, simulate_runq, tensor_bytes)
from prebias.paths import RunPaths
from prebias.sp_tokenizer import tokenizer_model_path

VERSIONS = ("0", "1", "2", "hf")


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
    write_json_atomic(RunPaths(out_dir).config, cfg)
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
