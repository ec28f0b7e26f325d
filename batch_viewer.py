"""
Show what a training step trained on: its batch ids, where each batch lies in the data,
and its text as the model saw it (with tag insertions applied), as Pythia's
utils/batch_viewer.py does. Reads the run's plain-numpy record (<out_dir>/batch_ids.npy,
insertions.npz), so no checkpoint needs to be loaded.

$ python batch_viewer.py --out_dir=out --step=12
$ python batch_viewer.py --out_dir=out/canary --step=100 --chars=400
$ python batch_viewer.py --out_dir=out --step=12 --ids_only=True     # one id per line

A step the run has not trained (yet) is shown from its schedule, and says so.
"""

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoint import run_config
from common import UserError, main_guard, parse_config
from data import BatchData, window_texts
from stream import build_schedule, trained_windows
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
@dataclass
class ViewerConfig:
    out_dir: str = "out"
    step: int = 0
    chars: int = 160  # characters of text shown per batch (0: all)
    ids_only: bool = False
# -----------------------------------------------------------------------------


def recorded(out_dir) -> tuple[np.ndarray, dict | None]:
    """(ids (steps, B), insertions record or None) from the run's numpy files."""
    p = Path(out_dir) / "batch_ids.npy"
    if not p.exists():
        raise UserError(f"{p} not found: {out_dir} is not a train.py run (or has no checkpoint yet)")
    try:
        ids = np.load(p, allow_pickle=False)
        ins = None
        if (Path(out_dir) / "insertions.npz").exists():
            with np.load(Path(out_dir) / "insertions.npz", allow_pickle=False) as z:
                ins = {k: z[k] for k in ("insertions", "insert_tokens", "replaced_tokens")}
    except (OSError, ValueError) as e:
        raise UserError(f"{out_dir}: the batch record cannot be read ({type(e).__name__}): it is damaged; "
                        "train.py rewrites it at the next checkpoint") from None
    return ids, ins


def step_view(out_dir, step: int):
    """(ids, windows as trained (B, T+1), insertion rows of the step, source line)."""
    cfg = types.SimpleNamespace(**run_config(out_dir))
    data = BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len)
    ids, ins = recorded(out_dir)
    if step < 0:
        raise UserError(f"--step={step}: steps count from 0")
    if step < len(ids):
        rec = ins or {"insertions": np.zeros((0, 6), np.int64), "insert_tokens": np.zeros(0, np.int64)}
        wins = trained_windows(data, ids[step], step, rec)
        rows = rec["insertions"][rec["insertions"][:, 0] == step]
        return ids[step], wins, rows, f"trained at step {step} (recorded in {Path(out_dir) / 'batch_ids.npy'})"
    sched = build_schedule(cfg, data)
    sid = sched.step_ids(step)
    return sid, data.windows(sid), np.zeros((0, 6), np.int64), (
        f"NOT TRAINED: the run has trained steps 0..{len(ids) - 1}; these are the ids its schedule gives "
        f"step {step} (without selection or tags, which depend on the model at that step)")


def main(argv=None):
    cfg = parse_config(ViewerConfig(), sys.argv[1:] if argv is None else argv)
    ids, wins, rows, source = step_view(cfg.out_dir, cfg.step)
    if cfg.ids_only:
        print("\n".join(map(str, ids)))
        return ids
    run = run_config(cfg.out_dir)
    data = BatchData(run["data_dir"], run["vocab_size"], run["max_seq_len"])
    enc = Tokenizer.for_vocab(run["vocab_size"], run["data_dir"])
    texts = window_texts(list(wins), enc)
    print(f"step {cfg.step}: {len(ids)} batches, {source}")
    for r, (i, text) in enumerate(zip(ids, texts)):
        rec = data.index[i]
        text = text.replace("\n", " | ")
        print(f"batch_id:{i} shard:{rec['shard']} offset:{rec['offset']} stories:{rec['story_first']}-"
              f"{rec['story_last']} | {text[:cfg.chars] if cfg.chars else text}")
        for row in rows[rows[:, 1] == r]:
            kind = "replaced" if row[5] == 0 else "inserted"
            print(f"    tag {row[3]} {kind} at token {row[2]} ({row[4]} tokens)")
    return ids


if __name__ == "__main__":
    main_guard(main)
