"""
A run folder's layout, in one place. Every stage writes into `--out_dir` (default `out`, as
in llama2.c, so the seed's paths out/tables and out/visualize hold for the default run):

  ckpt/ckpt_<iter>.pt      the checkpoints (prebias/checkpoint.py names and lists them)
  tables/                  every table a stage writes (eval.py's summary.csv, ...)
  visualize/               every figure
  attribution/             attribute.py's caches and retrains
  config.json, run.json, history.jsonl, train.log                the run's record (train.py)
  batch_ids.npy, pool_ids.npy, insertions.npz, masked_rows.npy, weighted_rows.npy,
  holdout_ids.npy
                           what it trained on, as plain numpy (train.py, from the checkpoints)

An experiment's folder holds its own tables/ and visualize/ the same way.

$ python -c "from prebias.paths import RunPaths; print(RunPaths('out/x').tables / 'summary.csv')"
"""

from pathlib import Path

TABLES, VISUALIZE, CKPT, ATTRIBUTION = "tables", "visualize", "ckpt", "attribution"
CONFIG, RUN, HISTORY, LOG = "config.json", "run.json", "history.jsonl", "train.log"
BATCH_IDS, POOL_IDS, INSERTIONS = "batch_ids.npy", "pool_ids.npy", "insertions.npz"
MASKED_ROWS, WEIGHTED_ROWS, HOLDOUT_IDS = "masked_rows.npy", "weighted_rows.npy", "holdout_ids.npy"
# the files a run appends to or rewrites while it lives (train.py checks that they are plain files)
RECORD_FILES = (CONFIG, RUN, HISTORY, LOG, BATCH_IDS, INSERTIONS, MASKED_ROWS, WEIGHTED_ROWS, HOLDOUT_IDS)


class RunPaths:
    """The paths inside one run (or experiment) folder: RunPaths(cfg.out_dir).tables / "x.csv"."""

    def __init__(self, out_dir):
        d = self.dir = Path(out_dir)
        self.tables, self.visualize, self.ckpt, self.attribution = d / TABLES, d / VISUALIZE, d / CKPT, d / ATTRIBUTION
        self.config, self.run, self.history, self.log = d / CONFIG, d / RUN, d / HISTORY, d / LOG
        self.batch_ids, self.pool_ids, self.insertions = d / BATCH_IDS, d / POOL_IDS, d / INSERTIONS
        self.masked_rows, self.weighted_rows, self.holdout_ids = d / MASKED_ROWS, d / WEIGHTED_ROWS, d / HOLDOUT_IDS
