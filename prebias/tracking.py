"""
Optional experiment tracking with wandb (pip install -r requirements-extra.txt): the one
place that starts a wandb run, for train.py (config, per-step loss, lr, tok/s, MFU and
val_loss), eval.py (per-checkpoint eval metrics and generations, into the training run
when it has a fixed id) and experiment.py (the experiment's figures and tables). An
experiment groups its runs: group = the experiment, job type = the arm.

Works without an account or network in WANDB_MODE=offline: each run is a folder
<dir>/wandb/offline-run-<time>-<id>/ that `wandb sync` can upload later. <dir> is
$WANDB_DIR where it is set (on a cluster: scratch space, as wandb itself reads it), else
the run's folder. Nothing in the main job needs wandb.
"""

import os

from prebias.common import UserError


def check_wandb_dir():
    """$WANDB_DIR, when set, must be a folder (or not exist yet): a file there sent wandb's
    run files to another folder without a word."""
    d = os.environ.get("WANDB_DIR")
    if d and os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"WANDB_DIR={d} is a file, not a folder: set WANDB_DIR to a folder (or unset it to keep "
                        "wandb's files in the run folder)")


def start(*, project: str, dir, config: dict, name: str = "", group: str = "", job_type: str = "",
          run_id: str = ""):
    """A wandb run (resumed when run_id names one already started, e.g. by train.py), its
    files under $WANDB_DIR when set, else under dir."""
    check_wandb_dir()
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_log=True needs wandb: pip install -r requirements-extra.txt") from None
    try:
        return wandb.init(project=project, name=name or None, config=config, group=group or None,
                          job_type=job_type or None, id=run_id or None, resume="allow" if run_id else None,
                          dir=os.environ.get("WANDB_DIR") or str(dir))
    except Exception as e:  # no API key, no network, a bad setting: one line, not wandb's traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"wandb could not start a run ({msg}): run `wandb login`, or set WANDB_MODE=offline "
                        "to log locally, or drop --wandb_log=True") from None


def image(path):
    import wandb
    return wandb.Image(str(path))


def table(df):
    import wandb
    return wandb.Table(dataframe=df)
