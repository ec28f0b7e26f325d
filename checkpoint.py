"""
Checkpoints: <out_dir>/ckpt/ckpt_<iter>.pt, one per checkpoint step, never overwritten.

Each holds plain types and tensors only (so torch.load(..., weights_only=True) works):
  model, optimizer          state dicts
  model_args, config        dicts (ModelArgs, TrainConfig)
  iter_num, prev_iter       this checkpoint is the model after iter_num optimizer steps;
                            the previous checkpoint was at prev_iter (-1 for the first)
  batch_ids                 int64 (iter_num - prev_iter, batches_per_step): the ids trained
                            on at steps prev_iter .. iter_num-1, row = step, in order
  schedule                  strategy name and fingerprint (the order is a pure function of it)
  data                      vocab_size, max_seq_len, tokenizer sha256 of the batch index
  rng                       torch RNG state, for exact resume
  train_loss, val_loss      measured at this checkpoint

The ids seen by checkpoint k are the concatenation of batch_ids of all checkpoints <= k.
"""

import json
import re
from pathlib import Path

import torch

from common import UserError, atomic_path

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def ckpt_dir(out_dir) -> Path:
    return Path(out_dir) / "ckpt"


def ckpt_path(out_dir, iter_num: int) -> Path:
    return ckpt_dir(out_dir) / f"ckpt_{iter_num}.pt"


def save_checkpoint(obj: dict, path):
    """Atomic: a process killed mid-save leaves earlier checkpoints and no partial file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    d = ckpt_dir(out_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt_*.pt") if (m := _NAME.match(p.name))]
    return sorted(found)


def run_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """[(iter, path)] of a run, or a UserError when it has none."""
    found = list_checkpoints(out_dir)
    if not found:
        raise UserError(f"no checkpoints in {ckpt_dir(out_dir)}: run python train.py --out_dir={out_dir}")
    return found


def latest_checkpoint(out_dir) -> Path:
    return run_checkpoints(out_dir)[-1][1]


def run_config(out_dir) -> dict:
    """The run's TrainConfig as a dict: <out_dir>/config.json, else the newest
    checkpoint's copy."""
    p = Path(out_dir) / "config.json"
    if p.exists():
        try:
            return json.loads(p.read_text())
        except ValueError:
            raise UserError(f"{p} is not valid JSON: delete it (the checkpoints hold a copy)") from None
    return dict(load_checkpoint(latest_checkpoint(out_dir))["config"])


def load_checkpoint(path, map_location="cpu", mmap=True) -> dict:
    """The checkpoint's dict. Tensors are memory-mapped, so reading only the small
    fields (batch_ids, losses, config) or one weight does not read the whole file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except Exception as e:  # pickle / zip errors of a damaged file
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): "
                        "it is damaged; delete it and resume from the previous one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a llama2_prebiasing v{FORMAT_VERSION} checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu"):
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs.from_dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])  # strict: a shape mismatch is an error
    return model.to(device).eval()


def batch_ids_by_checkpoint(out_dir) -> dict[int, torch.Tensor]:
    """{iter: ids (steps, batches_per_step) trained on since the previous checkpoint}."""
    out = {}
    for it, p in list_checkpoints(out_dir):
        out[it] = load_checkpoint(p)["batch_ids"].clone()
    return out


def batch_ids_seen(out_dir, iter_num: int) -> torch.Tensor:
    """All batch ids (steps, batches_per_step) trained on by checkpoint iter_num, in order."""
    parts = [ids for it, ids in batch_ids_by_checkpoint(out_dir).items() if it <= iter_num]
    return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.long)
