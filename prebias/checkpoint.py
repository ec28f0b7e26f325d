"""
Checkpoints: <out_dir>/ckpt/ckpt_<iter>.pt, one per checkpoint step, never overwritten.

Each holds plain types and tensors only (so torch.load(..., weights_only=True) works):
  model                     state dict
  model_args, config        dicts (ModelArgs, TrainConfig)
  iter_num, prev_iter       this checkpoint is the model after iter_num optimizer steps;
                            the previous checkpoint was at prev_iter (-1 for the first)
  batch_ids                 int64 (iter_num - prev_iter, batches_per_step): the ids trained
                            on at steps prev_iter .. iter_num-1, row = step, in order
  pool_ids                  int64 (steps, K*B): each step's candidate pool when online
                            selection ran (stream.py), else (steps, 0)
  insertions                int64 (n, 6): one row per tag insertion [step, row, pos, tag,
                            n_tokens, mode] (stream.py explains), with insert_tokens and
                            replaced_tokens (int64, concatenated in row order)
  masked_rows               int64 (n, 2): [step, row] of each row trained with loss weight 0
                            (train.py --train_mask: in-place removal; the step's denominator
                            stays all rows x T). Absent in older checkpoints: nothing masked
  weighted_rows             float64 (n, 3): [step, row, weight] of each row trained with a loss
                            weight other than 1 by train.py --train_weights (same denominator).
                            Absent in older checkpoints and runs without weights: none
  tags                      the JSON text of the run's tags ('' without tags)
  schedule                  the structured record of the order (schedule.Schedule.record:
                            spec, seed, phase bounds, hashes of ids and metrics) and its
                            fingerprint; the order is a pure function of it
  data                      vocab_size, max_seq_len, tokenizer sha256 of the batch index
  rng                       torch RNG state, for exact resume
  train_loss, val_loss      measured at this checkpoint
  init                      where the weights at step 0 came from, when not from a seeded
                            random start: {kind: checkpoint | hf | bin, from: path, sha256
                            of the files read, ...} (train.py --init_from=<ckpt>, and
                            export.py's imports); {} for a run trained from scratch
  compute                   the run's compute up to here (compute.ComputeRecord: FLOPs of
                            training, selection's scoring and the irreducible-loss model,
                            seconds); absent in checkpoints written before it was recorded

The optimizer state lives beside it in ckpt/optimizer_<iter>.pt, kept for the latest
checkpoint only (train.py --keep_optimizer=True keeps all), so checkpoints are written
once and never rewritten, and old ones stay small. It is the optimizer's state dict plus
"checkpoint": {iter_num, identity (the IDENTITY fields), weights_sha256 (weights_digest
of the checkpoint's model)}, so a resume takes only the file saved with its checkpoint. The ids seen by checkpoint k are the
concatenation of batch_ids of all checkpoints <= k; <out_dir>/batch_ids.npy holds the
same as plain numpy (Pythia's batch viewer needs no torch).
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from model import ModelArgs, Transformer
from prebias.common import UserError, atomic_path, json_loads
from prebias.data import sha256_file
from prebias.inputs import read_json
from prebias.paths import RunPaths

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: optimizer inside, no pool/insertions; eval and views read both
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
# what a reader may rely on: field -> type (a checkpoint holding other types was not written here)
FIELDS = {"model": dict, "model_args": dict, "config": dict, "iter_num": int, "prev_iter": int,
          "batch_ids": torch.Tensor, "schedule": dict, "data": dict, "train_loss": float, "val_loss": float,
          "pool_ids": torch.Tensor, "insertions": torch.Tensor, "insert_tokens": torch.Tensor,
          "replaced_tokens": torch.Tensor, "masked_rows": torch.Tensor, "weighted_rows": torch.Tensor, "tags": str, "init": dict, "compute": dict}
REQUIRED = ("model", "model_args", "config", "iter_num", "prev_iter", "batch_ids")


def ckpt_dir(out_dir) -> Path:
    return RunPaths(out_dir).ckpt


def ckpt_path(out_dir, iter_num: int) -> Path:
    return ckpt_dir(out_dir) / f"ckpt_{iter_num}.pt"


def optimizer_path(out_dir, iter_num: int) -> Path:
    return ckpt_dir(out_dir) / f"optimizer_{iter_num}.pt"


def weights_digest(state_dict: dict) -> str:
    """sha256 of a model state dict (names, dtypes, shapes and bytes): what ties an optimizer
    file to the checkpoint it was saved with."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_optimizer(state: dict, path, ck: dict):
    """The optimizer's state dict, with the record of the checkpoint `ck` it belongs to (atomic)."""
    rec = {"iter_num": int(ck["iter_num"]), "identity": {k: ck["config"].get(k) for k in IDENTITY},
           "weights_sha256": weights_digest(ck["model"])}
    save_torch({**state, "checkpoint": rec}, path)


def load_optimizer(path, ck: dict, optimizer) -> tuple[dict, str]:
    """(the state dict to load into `optimizer`, a warning or ''): refused with one line
    unless it is the file saved with checkpoint ck (its record; a file from before the
    record is taken when its tensors fit the parameters, with a warning) and its tensors
    have the parameters' shapes (Adam's step would fail on them mid-run)."""
    path, name = Path(path), f"ckpt_{ck['iter_num']}.pt"
    fix = ("restore the file saved with it, or resume from an earlier checkpoint whose optimizer file you keep "
           "(--keep_optimizer=True keeps them all)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file (zip error), not a torch file
        raise UserError(f"{path} cannot be read as this run's optimizer state ({type(e).__name__}): it is damaged "
                        f"or belongs to another run; {fix}") from None
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise UserError(f"{path} cannot be read as this run's optimizer state (not an optimizer's state dict): {fix}")
    state = dict(state)
    rec, note = state.pop("checkpoint", None), ""
    if isinstance(rec, dict):
        why = _foreign_optimizer(rec, ck)
        if why:
            raise UserError(f"{path} is not the optimizer state saved with {name}: it was saved {why}; {fix}")
    else:
        note = (f"warning: {path} predates the record that ties an optimizer file to its checkpoint: taken as "
                f"{name}'s because its tensors fit the model (it cannot be checked further)")
    bad = _optimizer_misfit(state, optimizer)
    if bad:
        raise UserError(f"{path} cannot be read as this run's optimizer state ({bad}): it is damaged or belongs to "
                        f"another run; {fix}")
    return state, note


def _foreign_optimizer(rec: dict, ck: dict) -> str:
    """Why an optimizer file's record says it is not checkpoint ck's ('' when it is)."""
    for k in IDENTITY:
        have, want = rec.get("identity", {}).get(k), ck["config"].get(k)
        if have != want:
            return f"by a run with {k}={have!r}, not {want!r}"
    if rec.get("iter_num") != ck["iter_num"]:
        return f"at step {rec.get('iter_num')}, not {ck['iter_num']}"
    if rec.get("weights_sha256") != weights_digest(ck["model"]):
        return "with other weights (another run of the same settings)"
    return ""


def _optimizer_misfit(state: dict, optimizer) -> str:
    """What in a saved optimizer state does not fit `optimizer`'s parameters ('' when all does)."""
    groups, saved = optimizer.param_groups, state["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups) or \
            any(len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved)):
        return "other parameter groups"
    params = [p for g in groups for p in g["params"]]
    ids = [i for s in saved for i in s["params"]]
    for i, p in zip(ids, params):
        for k, v in (state["state"].get(i) or {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                return f"its {k} has shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}"
    return ""


def save_checkpoint(obj: dict, path):
    """Atomic: a process killed mid-save leaves earlier checkpoints and no partial file."""
    save_torch(obj, path)


def save_torch(obj, path):
    """torch.save through atomic_path, into an open file: given a path, torch.save names the
    zip archive inside after the file, here the temp's random name and writer pid, so a
    checkpoint's bytes and size changed with the process that wrote it (a resumed run's
    checkpoints were 64 bytes off the uninterrupted run's when the pid had one digit more).
    Given a file it names the archive "archive": the same object, the same bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """[(iter, path)] of ckpt/ckpt_<iter>.pt, sorted; a UserError when one is a link or not
    a plain file (a link to another checkpoint would be read as a second copy of its steps)."""
    d = ckpt_dir(out_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt_*.pt") if (m := _NAME.match(p.name))]
    for _, p in found:
        if p.is_symlink() or not p.is_file():
            raise UserError(f"{p} is {'a symbolic link' if p.is_symlink() else 'not a plain file'}: a checkpoint "
                            f"is a file that train.py writes; remove {p.name} from {d} (or put the file itself "
                            "there)")
    return sorted(found)


def run_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """[(iter, path)] of a run, each checked to belong to it (check_member; the files are
    memory-mapped, so this reads their small fields only), or a UserError when it has none."""
    found = list_checkpoints(out_dir)
    if not found:
        raise UserError(f"no checkpoints in {ckpt_dir(out_dir)}: run python train.py --out_dir={out_dir}")
    identity = run_identity(out_dir, found[0][1])
    for it, p in found:
        ck = load_checkpoint(p)
        check_member(ck, identity, p, out_dir)
        if int(ck["iter_num"]) != it:  # a copy or a rename: its batches would count twice
            raise UserError(f"{p} holds step {int(ck['iter_num'])}, not {it} (a copy or a rename of "
                            f"ckpt_{int(ck['iter_num'])}.pt): delete it, or restore the real {p.name}")
    return found


# what every checkpoint of one run shares (a checkpoint of another run dropped into ckpt/
# must not be evaluated as this run's)
IDENTITY = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len", "seed",
            "batch_size", "gradient_accumulation_steps")


def run_identity(out_dir, first_ckpt=None) -> dict:
    """The identity fields of the run in out_dir, from config.json (written once, when the
    run started), else its first checkpoint."""
    p = RunPaths(out_dir).config
    if p.exists():
        try:
            cfg = json_loads(p.read_text())
        except ValueError as e:
            raise UserError(f"{p} is not valid JSON ({e}): restore it or start a new --out_dir") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{p} is not a run's config (a JSON object): restore it or start a new --out_dir")
    else:
        cfg = dict(load_checkpoint(first_ckpt or list_checkpoints(out_dir)[0][1])["config"])
    return {k: cfg.get(k) for k in IDENTITY}


def check_member(ck: dict, identity: dict, path, out_dir):
    """A UserError unless the checkpoint belongs to the run of `identity` (run_identity)."""
    got = ck.get("config", {})
    args = ck.get("model_args", {})
    for k, want in identity.items():
        if want is not None and got.get(k) != want:
            raise UserError(f"{path} is not a checkpoint of the run in {out_dir}: it was trained with {k}="
                            f"{got.get(k)!r}, the run with {want!r}; move it out of {ckpt_dir(out_dir)}")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        if k in args and args[k] != got.get(k):
            raise UserError(f"{path}: its weights have {k}={args[k]} but its config says {got.get(k)!r}: the file "
                            f"was not written by train.py; move it out of {ckpt_dir(out_dir)}")


def latest_checkpoint(out_dir) -> Path:
    found = list_checkpoints(out_dir)
    if not found:
        raise UserError(f"no checkpoints in {ckpt_dir(out_dir)}: run python train.py --out_dir={out_dir}")
    return found[-1][1]


def run_config(out_dir) -> dict:
    """The run's TrainConfig as a dict, as it stands now: the newest checkpoint's copy
    (a resume may have changed a non-defining field), else <out_dir>/config.json (the
    config the run started with; history.jsonl beside it lists each resume's changes)."""
    if list_checkpoints(out_dir):
        return dict(load_checkpoint(latest_checkpoint(out_dir))["config"])
    p = RunPaths(out_dir).config
    if not p.exists():
        raise UserError(f"no run in {out_dir} (no checkpoints, no config.json): run python train.py --out_dir={out_dir}")
    try:
        return json_loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON ({e}): restore it or start a new --out_dir") from None


def run_record(out_dir) -> dict:
    """<out_dir>/run.json (commit, library versions, command, start time: train.py writes it
    once); {} for a folder without one."""
    return read_json(RunPaths(out_dir).run, "a run record (train.py writes it)",
                     f"it is damaged: restore it from a copy, or rerun python train.py --out_dir={out_dir}", missing={})


def build_checkpoint(*, model, model_args: dict, config: dict, iter_num: int, prev_iter: int,
                     record: dict, schedule: dict, data_meta: dict, rng: dict, train_loss: float,
                     val_loss: float, init: dict | None = None, compute: dict | None = None) -> dict:
    """The checkpoint dict (the format this module's docstring describes). `record` holds
    the stream's arrays since the previous checkpoint: batch_ids, pool_ids, insertions,
    insert_tokens, replaced_tokens (numpy), and tags (str)."""
    obj = {"format_version": FORMAT_VERSION, "model": model, "model_args": model_args, "config": config,
           "iter_num": iter_num, "prev_iter": prev_iter, "schedule": schedule, "data": data_meta,
           "rng": rng, "train_loss": train_loss, "val_loss": val_loss, "tags": record.get("tags", ""),
           "init": init or {}}
    if compute is not None:
        obj["compute"] = compute
    for k in ("batch_ids", "pool_ids", "insertions", "insert_tokens", "replaced_tokens"):
        obj[k] = torch.from_numpy(record[k].astype("int64"))
    obj["masked_rows"] = torch.from_numpy(np.asarray(record.get("masked_rows", np.zeros((0, 2))), "int64"))
    obj["weighted_rows"] = torch.from_numpy(np.asarray(record.get("weighted_rows", np.zeros((0, 3))), "float64"))
    return obj


def check_resume(ck: dict, cfg: dict, defining, tokenizer_sha: str, fingerprint: str, out_dir):
    """Refuse a resume that would make the run's record untrue: another value of a field
    that defines the run, another tokenizer, or another order of batches."""
    for k in defining:
        if ck["config"].get(k) != cfg.get(k):
            raise UserError(f"checkpoint in {out_dir} was trained with {k}={ck['config'].get(k)!r}, not "
                            f"{cfg.get(k)!r}: pass the same value, or use another --out_dir to start a new run")
    if ck["data"]["tokenizer_sha256"] != tokenizer_sha:
        raise UserError(f"the checkpoints in {out_dir} were trained on data of another tokenizer than the "
                        "current batch index: re-pretokenize with that tokenizer or start a new --out_dir")
    if ck.get("format_version") != FORMAT_VERSION:
        raise UserError(f"the checkpoints in {out_dir} are format v{ck.get('format_version')}; this train.py "
                        f"resumes v{FORMAT_VERSION} only (eval and the views still read them): start a new --out_dir")
    if ck["schedule"]["fingerprint"] != fingerprint:
        raise UserError(f"the data, schedule spec, tags or selection changed since the checkpoints in {out_dir} "
                        "were written (fingerprint mismatch; a spec's fractions and competence/mixture phases also "
                        "depend on --max_iters); use the same ones or start a new --out_dir")


def stream_records(out_dir) -> dict:
    """The whole run's stream record, concatenated over its checkpoints in order: batch_ids
    (steps, B), pool_ids (steps, K*B), insertions (n, 6), insert_tokens, replaced_tokens,
    masked_rows (n, 2), weighted_rows (n, 3), and tags (the run's tag JSON). Checks that the chain of
    checkpoints is unbroken."""
    parts = {k: [] for k in ("batch_ids", "pool_ids", "insertions", "insert_tokens", "replaced_tokens",
                             "masked_rows", "weighted_rows")}
    prev, tags = -1, ""
    for it, p in list_checkpoints(out_dir):
        ck = load_checkpoint(p)
        if ck["prev_iter"] != prev:
            raise UserError(f"{p} follows step {ck['prev_iter']} but the previous checkpoint is step {prev}: "
                            f"restore ckpt_{ck['prev_iter']}.pt so the batches seen are known")
        prev = it
        n = ck["batch_ids"].shape[0]
        parts["batch_ids"].append(ck["batch_ids"].numpy())
        parts["pool_ids"].append(ck["pool_ids"].numpy() if "pool_ids" in ck else np.zeros((n, 0), np.int64))
        parts["insertions"].append(ck["insertions"].numpy() if "insertions" in ck else np.zeros((0, 6), np.int64))
        for k in ("insert_tokens", "replaced_tokens"):
            parts[k].append(ck[k].numpy() if k in ck else np.zeros(0, np.int64))
        parts["masked_rows"].append(ck["masked_rows"].numpy() if "masked_rows" in ck
                                    else np.zeros((0, 2), np.int64))
        parts["weighted_rows"].append(ck["weighted_rows"].numpy() if "weighted_rows" in ck
                                      else np.zeros((0, 3), np.float64))
        tags = ck.get("tags", "") or tags
    if not parts["batch_ids"]:
        raise UserError(f"no checkpoints in {ckpt_dir(out_dir)}: run python train.py --out_dir={out_dir}")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["tags"] = tags
    return out


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
    if not isinstance(ckpt, dict) or ckpt.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"checkpoint {path} is not a llama2_prebiasing checkpoint (format "
                        f"{ckpt.get('format_version') if isinstance(ckpt, dict) else '?'}; this code reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}): give a ckpt_<iter>.pt that train.py wrote "
                        "(or move this file out of the run's ckpt/)")
    for k, kind in FIELDS.items():
        if k in ckpt and not isinstance(ckpt[k], kind) or (k not in ckpt and k in REQUIRED):
            raise UserError(f"checkpoint {path} has no {k} of the right kind ({getattr(kind, '__name__', kind)}): it "
                            "was not written by train.py, or is damaged; delete it and resume from the previous one")
    it, prev, ids = ckpt["iter_num"], ckpt["prev_iter"], ckpt["batch_ids"]
    if ids.ndim != 2 or it < 0 or not -1 <= prev < max(it, 0) + (it == 0) or len(ids) != it - max(prev, 0):
        raise UserError(f"checkpoint {path}: its steps (prev_iter {prev}, iter_num {it}) and its {len(ids)} rows of "
                        "batch_ids do not fit: it is damaged; delete it and resume from the previous one")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu"):
    model = Transformer(ModelArgs.from_dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])  # strict: a shape mismatch is an error
    return model.to(device).eval()


def source_record(path, ckpt: dict) -> dict:
    """Where weights taken from a checkpoint came from: its path, sha256 and step, and its
    own init record (so a chain of imports and continued runs stays traceable)."""
    return {"kind": "checkpoint", "from": str(Path(path).resolve()), "sha256": sha256_file(path),
            "iter_num": int(ckpt["iter_num"]), **({"init": ckpt["init"]} if ckpt.get("init") else {})}


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
