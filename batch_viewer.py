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
from dataclasses import dataclass


from checkpoint import run_config
from common import main_guard, parse_config
from data import BatchData, window_texts
from stream import step_view
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
@dataclass
class ViewerConfig:
    out_dir: str = "out"
    step: int = 0
    chars: int = 160  # characters of text shown per batch (0: all)
    ids_only: bool = False
# -----------------------------------------------------------------------------


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
