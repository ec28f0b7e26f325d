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

import numpy as np

from prebias.common import UserError, main_guard, parse_config
from prebias.stream import RunBatches


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
    if cfg.chars < 0:
        raise UserError(f"--chars={cfg.chars}: characters of text per batch, >= 0 (0: all)")
    run = RunBatches(cfg.out_dir)
    if cfg.ids_only:
        ids, _, _, source = run.step(cfg.step)
        if source.startswith("NOT TRAINED"):  # ids only on stdout (for pipes); the warning beside them
            print(source, file=sys.stderr)
        print("\n".join(map(str, ids)))
        return ids
    rows, source = run.rows(cfg.step, cfg.chars)
    print(f"step {cfg.step}: {len(rows)} batches, {source}")
    for r in rows:
        text = r["text"].replace("\n", " | ")
        print(f"batch_id:{r['batch_id']} shard:{r['shard']} offset:{r['offset']} stories:{r['stories']} | {text}")
        for t in r["tags"]:
            print(f"    {t}")
        if r["masked"]:
            print("    loss weight 0 at this step (--train_mask: removed in place)")
    return np.array([r["batch_id"] for r in rows])


if __name__ == "__main__":
    main_guard(main)
