"""
A run's compute, as "No Train No Gain" (Kaddour et al. 2023) counts it for methods that
spend work to save steps: FLOPs of the training steps, of selection's scoring passes
and of the irreducible-loss model (its forward passes over the candidates and the cost
of fitting it), and wall-clock. train.py keeps one ComputeRecord and saves it, cumulative,
in every checkpoint ("compute"), so the validation loss can be read against compute as
well as against steps; compute_curve and reach read it back (bench/bench_select.py).

FLOPs follow PaLM's count (model.flops_per_token: 6N + 12 L H Q T per token, forward and
backward); a forward pass alone is a third of it. Scoring a window costs one forward pass
of the scoring model; a step trains B windows. The n-gram reference costs no matrix
FLOPs (it counts and looks up): its fit and lookups show in wall-clock only.

$ python -c "from prebias.compute import reach; print(reach([0, 10, 20], [5, 4, 3], 3.5))"   # 15.0
"""

import math

import numpy as np

from prebias.checkpoint import list_checkpoints, load_checkpoint

FLOP_FIELDS = ("train_flops", "select_flops", "ref_score_flops", "ref_fit_flops")
TIME_FIELDS = ("train_s", "select_s", "ckpt_s", "ref_fit_s")


def train_flops_per_window(model) -> float:
    """Forward + backward FLOPs of one window of max_seq_len tokens."""
    return model.flops_per_token() * model.params.max_seq_len


def forward_flops_per_window(model) -> float:
    return train_flops_per_window(model) / 3


class ComputeRecord:
    """Cumulative compute of a run. step() adds one optimizer step: B trained windows,
    the windows selection scored with the model and those the reference model scored
    (both counted where they ran: the pool once, each rank's reference passes each), and
    the step's seconds (select_s: the stream's, i.e. the pool, its scoring and reading the
    windows; train_s: forward, backward and the optimizer). ref_fit_flops / ref_fit_s: fitting the irreducible-loss model
    (a train.py run's own recorded compute), counted once, from step 0."""

    def __init__(self, model, ref_model=None, ref_fit_flops: float = 0.0, ref_fit_s: float = 0.0,
                 saved: dict | None = None, step: int = 0):
        self.win = train_flops_per_window(model)
        self.fwd = forward_flops_per_window(model)
        self.ref_fwd = forward_flops_per_window(ref_model) if ref_model is not None else 0.0
        self.d = {k: 0.0 for k in FLOP_FIELDS + TIME_FIELDS}
        self.d.update(ref_fit_flops=float(ref_fit_flops), ref_fit_s=float(ref_fit_s), counted_from_step=0)
        if saved:
            self.d.update({k: v for k, v in saved.items() if k in self.d})
        elif step:  # a resumed run whose checkpoints predate this record: counted from here on
            self.d["counted_from_step"] = int(step)

    def step(self, n_windows: int, n_scored: int = 0, n_ref_scored: int = 0, select_s: float = 0.0,
             train_s: float = 0.0):
        d = self.d
        d["train_flops"] += self.win * n_windows
        d["select_flops"] += self.fwd * n_scored
        d["ref_score_flops"] += self.ref_fwd * n_ref_scored
        d["select_s"] += select_s
        d["train_s"] += train_s

    def add_checkpoint_time(self, seconds: float):
        self.d["ckpt_s"] += seconds

    def as_dict(self) -> dict:
        """The record as plain floats, with total_flops (every FLOP field) and wall_s
        (steps, selection and the reference's fit; checkpoint evaluation apart)."""
        out = dict(self.d)
        out["total_flops"] = sum(self.d[k] for k in FLOP_FIELDS)
        out["wall_s"] = self.d["train_s"] + self.d["select_s"] + self.d["ref_fit_s"]
        return out


# -----------------------------------------------------------------------------
# reading it back

def compute_curve(out_dir) -> dict:
    """{"step", "flops", "wall", "val"}: arrays over a run's checkpoints (total_flops and
    wall_s as recorded; NaN for checkpoints without a record)."""
    rows = []
    for it, p in list_checkpoints(out_dir):
        ck = load_checkpoint(p)
        c = ck.get("compute") or {}
        rows.append((it, c.get("total_flops", math.nan), c.get("wall_s", math.nan), float(ck["val_loss"])))
    step, flops, wall, val = (np.array(x, dtype=np.float64) for x in zip(*rows)) if rows else [np.zeros(0)] * 4
    return {"step": step, "flops": flops, "wall": wall, "val": val}


def reach(x, val, target: float) -> float:
    """The first x (steps, FLOPs, seconds) at which val reaches target (val <= target),
    linearly interpolated between the checkpoints around the crossing; inf if never."""
    x, val = np.asarray(x, np.float64), np.asarray(val, np.float64)
    if len(val) and val[0] <= target:
        return float(x[0])
    for i in range(1, len(val)):
        if val[i] <= target:
            f = (val[i - 1] - target) / max(val[i - 1] - val[i], 1e-12)
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return math.inf


def matched_steps(budget_flops: float, flops_per_step: float) -> int:
    """The steps a plain run of flops_per_step gets for a budget: the max_iters of a
    compute-matched baseline, whose cosine schedule then ends (min_lr) at the budget."""
    return max(1, int(round(budget_flops / flops_per_step)))
