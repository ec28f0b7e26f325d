"""
Batch selection scores: one registered function each, used both online (stream.py's
Selector scores each step's pool) and offline (select_batches.py scores every training
batch), so every score works both ways. A score is

    score(model, data, ids, ctx) -> float64 array, one value per id, higher = kept

where `ctx` (a ScoreContext) carries what a score may need besides the model and the
data: device, autocast, windows per forward pass, the DDP rank layout, the batch metric
columns, the irreducible loss and the metric target. Registered:

    uniform  -position in the pool (online: the schedule's own B ids come first, so
             uniform trains exactly the ids of no selection; offline the pool is a
             seeded permutation, so it keeps a random subset)
    loss     the model's mean token loss on the window (Loshchilov & Hutter 2015)
    rho      loss - irreducible loss (RHO-LOSS, Mindermann et al. 2022): the reference
             scorer's ref_nll of the batch (fitted on the holdout), or the loss of a
             reference model trained on the holdout (--select_ref; train.py --holdout=only)
    el2n     mean over the window's tokens of ||softmax(logits) - onehot(next)||_2
             (EL2N, Paul et al. 2021)
    metric   -|metric - target| of a batch metric: steer toward a value
    magic    offline only (select_batches.py --by=magic --out_dir=<proxy run>): minus the
             first-order change of the validation loss from adding the batch to a short
             proxy run, <lambda_t, g_z(theta_t)> / B from the run's exact reverse pass
             (prebias/magic.py), averaged over a few steps t spread over the run

To add a score: one function here (or in your own module) under @SCORES.register("name");
set .needs_model = False where it reads no model, .needs_ref / .needs_metric where it
reads the irreducible loss or a metric target, .needs_run where it reads a recorded run
(offline only). train.py --select and select_batches.py --by take it at once.

$ python -c "from prebias.selection import SCORES; print(list(SCORES))"
"""

import contextlib
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from prebias.llama2c import load_v0
from model import per_row_loss
from prebias import magic as M
from prebias.batchmetrics import REF_COLUMNS  # the batch metrics that read the reference scorer
from prebias.checkpoint import load_checkpoint, model_from_checkpoint, stream_records
from prebias.common import Registry, UserError
from prebias.compute import train_flops_per_window
from prebias.data import sha256_file

SCORES = Registry("selection score")  # name -> score function


@dataclass
class ScoreContext:
    device: str = "cpu"
    ctx: object = field(default_factory=contextlib.nullcontext)  # autocast of the forward passes
    batch_size: int = 32  # windows per forward pass
    rank: int = 0  # DDP: rank r scores chunks r, r+W, ... (the same rows at any world size)
    world: int = 1
    batch_metric: object = None  # name -> that batch metric for every batch id
    irreducible: object = None  # ids -> irreducible loss of each (rho)
    metric: str = ""  # metric: the batch metric to steer by...
    target: float = 0.0  # ...toward this value
    run: object = None  # magic: the proxy run (an attribution.Trajectory) whose reverse pass scores...
    magic_steps: int = 4  # ...at this many steps spread over it...
    n_val: int = 32  # ...for the mean loss of this many validation windows
    cost: dict = field(default_factory=dict)  # what a score spends besides forward passes (magic fills it)


def register(name: str, needs_model: bool = True, needs_ref: bool = False, needs_metric: bool = False,
             needs_run: bool = False):
    """@register("name") on a score function; the flags say what it reads (needs_run: a
    recorded run, ctx.run_dir, so offline only)."""
    def deco(fn):
        fn.needs_model, fn.needs_ref, fn.needs_metric, fn.needs_run = needs_model, needs_ref, needs_metric, needs_run
        return SCORES.register(name)(fn)
    return deco


def per_window(row_fn, model, data, ids: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """row_fn(model, x, y) -> (rows,) for every window of ids, ctx.batch_size rows per
    forward pass; rank r fills chunks r, r+W, ... and the ranks sum their parts, so every
    chunk holds the same rows, and every rank the same values, at any world size."""
    B = ctx.batch_size
    chunks = [ids[i:i + B] for i in range(0, len(ids), B)]
    out = torch.zeros(len(chunks), B, device=ctx.device)
    for c in range(ctx.rank, len(chunks), ctx.world):
        x, y = data.get(chunks[c])
        with ctx.ctx:
            out[c, :len(chunks[c])] = row_fn(model, x.to(ctx.device), y.to(ctx.device)).float()
    if ctx.world > 1:
        import torch.distributed as dist
        dist.all_reduce(out)  # each chunk was filled by exactly one rank
    return out.reshape(-1)[:len(ids)].cpu().numpy().astype(np.float64)


@torch.no_grad()
def el2n_rows(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) mean per-token EL2N of each row, in eval mode."""
    was_training = model.training
    model.eval()
    logits, _ = model(x)
    model.train(was_training)
    p = torch.softmax(logits.float(), -1)
    p.scatter_add_(-1, y[..., None], -torch.ones_like(y, dtype=p.dtype)[..., None])
    return p.norm(dim=-1).mean(1)


# -----------------------------------------------------------------------------

@register("uniform", needs_model=False)
def uniform(model, data, ids, ctx):
    return -np.arange(len(ids), dtype=np.float64)


@register("loss")
def loss(model, data, ids, ctx):
    return per_window(per_row_loss, model, data, ids, ctx)


@register("rho", needs_ref=True)
def rho(model, data, ids, ctx):
    return per_window(per_row_loss, model, data, ids, ctx) - ctx.irreducible(ids)


@register("el2n")
def el2n(model, data, ids, ctx):
    return per_window(el2n_rows, model, data, ids, ctx)


@register("metric", needs_model=False, needs_metric=True)
def metric(model, data, ids, ctx):
    return -np.abs(ctx.batch_metric(ctx.metric)[ids] - ctx.target)


@register("magic", needs_model=False, needs_run=True)
def magic(model, data, ids, ctx):
    eff, cost, _ = proxy_effects(ctx.run, data.windows(ids), ctx.magic_steps, ctx.n_val, ctx.device,
                                 ctx.batch_size)
    ctx.cost.update(cost)
    return -eff.mean(1)


def reads_reference(score, select_metric: str = "", metrics=()) -> bool:
    """Whether a run (or a pruning) reads the reference: its score reads the irreducible
    loss, or it steers, sorts or filters by a ref_* batch metric. Such a run never trains
    on the holdout the reference was fitted on (stream.holdout_mode)."""
    return bool(score is not None and (score.needs_ref or (score.needs_metric and select_metric in REF_COLUMNS))) \
        or any(m in REF_COLUMNS for m in metrics)


HOLDOUT_FIX = "; or pass --holdout=keep to use it anyway (the run then also trains on the holdout)"


def check_fit(fit: dict, data, where: str):
    """The batch metrics' reference scorer (batch_metrics.json's scorer_fit) must have been
    fitted on this data's holdout, unless it is the user's model (pretokenize --ref_model)."""
    if fit.get("on") == "model":
        return
    if fit.get("on") != "holdout" or fit.get("stories_sha256") != data.holdout_meta.get("stories_sha256"):
        raise UserError(f"{where}: the ref_nll column of batch_metrics.csv comes from a reference scorer fitted on "
                        f"{fit.get('on', 'the validation shard (an older pretokenize)')}, not on this data's holdout: "
                        f"re-run python tinystories.py pretokenize{HOLDOUT_FIX}")


class Irreducible:
    """ids -> irreducible loss of each batch (rho): the batch metrics' ref_nll column (the
    reference scorer, fitted on the holdout), or with ref_model (a model.bin or .pt, e.g.
    a train.py run on the holdout: --holdout=only) that model's mean token loss, computed
    once per batch and cached. .record says which reference it is (kept in checkpoints),
    .fit_flops / .fit_s what fitting it cost (a .pt's recorded compute), .scored counts
    the reference model's forward passes (the compute record)."""

    def __init__(self, data, batch_metric, ref_model: str = "", device: str = "cpu", bm_meta: dict | None = None):
        self.data, self.device, self.cache = data, device, {}
        self.ref_nll = self.model = None
        self.fit_flops = self.fit_s = 0.0
        self.scored = 0
        if not ref_model:
            self.ref_nll = batch_metric("ref_nll")
            meta = bm_meta or {}
            self.record = {"kind": "ref_nll", "scorer": meta.get("scorer", ""), "fit": meta.get("scorer_fit", {})}
            self.fit_s = float(self.record["fit"].get("seconds", 0.0))
            return
        self.model, self.record = _reference_model(ref_model, data, device)
        if self.model.params.vocab_size != data.vocab_size:
            raise UserError(f"--select_ref={ref_model} has vocab_size {self.model.params.vocab_size}, "
                            f"the data {data.vocab_size}: train the reference model on this data")
        self.fit_flops, self.fit_s = self.record.pop("fit_flops"), self.record.pop("fit_s")

    def check_held_out(self, where: str):
        """A reference that leaves the holdout is refused: ref_nll must come from a scorer
        fitted on this data's holdout, a .pt of this data must have trained on holdout
        batches only (--holdout=keep opts out of both)."""
        if self.record["kind"] == "ref_nll":
            check_fit(self.record["fit"], self.data, where)
        elif self.record.get("outside_holdout"):
            raise UserError(f"{where}: --select_ref={self.record['path']} trained on "
                            f"{self.record['outside_holdout']} batches outside the holdout of this data: train the "
                            f"reference with python train.py --holdout=only{HOLDOUT_FIX}")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.model is None:
            return self.ref_nll[ids]
        todo = [int(i) for i in ids if int(i) not in self.cache]
        if todo:
            x, y = self.data.get(todo)
            for i, v in zip(todo, per_row_loss(self.model, x.to(self.device), y.to(self.device)).tolist()):
                self.cache[i] = v
            self.scored += len(todo)
        return np.array([self.cache[int(i)] for i in ids])


def _reference_model(path: str, data, device: str):
    """(model, record) of --select_ref: for a train.py checkpoint of this data, the record
    says how many of the batches it trained on lie outside the holdout, and what its
    training cost (its compute record; else its steps x batches x FLOPs per window)."""
    if not Path(path).is_file():
        raise UserError(f"--select_ref={path} is {'a folder' if Path(path).is_dir() else 'not a file'}: give a "
                        "checkpoint (out/<ref>/ckpt/ckpt_<n>.pt) or a model.bin trained on this data's holdout")
    rec = {"kind": "model", "path": str(path), "sha256": sha256_file(path)[:16], "fit_flops": 0.0, "fit_s": 0.0}
    if not str(path).endswith(".pt"):
        rec["trained_on"] = "unknown (a model.bin has no record of its data)"
        print(f"note: --select_ref={path} is a model.bin, which records no tokenizer or data: make sure it was trained "
              "on this data's holdout (its ckpt_<n>.pt would be checked)")
        return load_v0(path).to(device).eval(), rec
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck, device)
    comp = ck.get("compute") or {}
    cfg = ck["config"]
    rec["fit_flops"] = float(comp.get("total_flops", train_flops_per_window(model) * ck["iter_num"]
                                      * cfg["batch_size"] * cfg["gradient_accumulation_steps"]))
    rec["fit_s"] = float(comp.get("wall_s", 0.0))
    if ck["data"]["tokenizer_sha256"] != data.meta["tokenizer_sha256"]:
        raise UserError(f"--select_ref={path} was trained with another tokenizer than this data's: its ids mean other "
                        "text; train the reference model on this data's holdout (train.py --holdout=only)")
    same_data = (ck["data"]["tokenizer_sha256"] == data.meta["tokenizer_sha256"]
                 and ck["data"]["n_batches"] == len(data) and ck["data"]["max_seq_len"] == data.max_seq_len)
    if not same_data:
        rec["trained_on"] = "other data (another tokenizer, length or batch index)"
        return model, rec
    seen = stream_records(Path(path).parent.parent)["batch_ids"][:ck["iter_num"]]
    rec["outside_holdout"] = int((~np.isin(np.unique(seen), data.holdout_ids)).sum())
    rec["trained_on"] = "holdout only" if rec["outside_holdout"] == 0 else "batches outside the holdout"
    return model, rec


def keep_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n highest scores (NaN never before a number; ties: the earlier
    position), in position order."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    return np.sort(np.lexsort((np.arange(len(s)), -s))[:n])


# -----------------------------------------------------------------------------
# magic: the proxy run's adjoints, and each candidate's first-order effect

def spread_steps(T: int, k: int) -> list[int]:
    """k steps of a T-step run at the midpoints of k equal parts: a midpoint rule for the
    mean over a uniformly random step (where a shuffled schedule puts a batch)."""
    return sorted({min(T - 1, int((i + 0.5) * T / k)) for i in range(min(k, T))})


def proxy_effects(traj, windows: np.ndarray, k: int = 4, n_val: int = 32, device: str = "cpu",
                  chunk: int = 32, steps: list | None = None) -> tuple[np.ndarray, dict, object]:
    """(n, len(steps)) first-order change of the mean loss of the first n_val validation
    windows at the end of the run `traj` (an attribution.Trajectory) from training each window (n, T+1) at each step
    t once more with weight 1: <lambda_t, g_z(theta_t)> / B, lambda_t = d val / d G_t from
    one exact reverse pass (prebias/magic.py: the same quantity as its step_effect, and as
    d val / d w[t, r] where z is the row r it trained at t), g_z by forward-mode AD (one
    JVP per chunk of windows). Its cost: the proxy run's own (its compute record), the
    reverse pass's and the JVPs' FLOPs (each kind of call counted once by torch's
    FlopCounterMode, times the calls: counting every call would slow the pass 5x), with
    their seconds; and the reverse pass itself (magic.Pass: dw of every trained (step, row))."""
    run = M.run_of(traj, device)
    steps = spread_steps(run.steps, k) if steps is None else list(steps)
    run.replay = cap = _Capture(run.replay, steps)
    probes = [types.SimpleNamespace(tokens=w, weight=None) for w in traj.data.windows(traj.data.val_ids[:n_val])]
    grads = M.probe_gradients(cap, probes)

    def mean_grad(theta):  # one adjoint: the mean probe, as magic.metagradients(mean=True)
        flops, gs = counted(grads, theta)
        cap.flops += flops
        return [[sum(g[i] for g in gs) / len(gs) for i in range(len(gs[0]))]]
    t0 = time.perf_counter()
    res = M.reverse_pass(run, mean_grad)
    cost = {"reverse_flops": cap.total_flops(), "reverse_s": round(time.perf_counter() - t0, 3),
            "replay_max_diff": res.replay_max_diff, "steps": steps}
    t0, B = time.perf_counter(), run.w.shape[1]
    wins = torch.from_numpy(np.asarray(windows, np.int64)).to(device)
    cols = []
    for t in steps:
        d, per_window = directional(cap, *cap.got[t], wins, chunk)
        cols.append(d / B)
    cost.update(score_flops=per_window * len(wins) * len(steps), score_s=round(time.perf_counter() - t0, 3),
                **proxy_cost(traj))
    return np.stack(cols, axis=1), cost, res


def counted(fn, *args):
    """(FLOPs as torch's FlopCounterMode counts them, fn(*args))."""
    with FlopCounterMode(display=False) as fc:
        out = fn(*args)
    return float(fc.get_total_flops()), out


def proxy_cost(traj) -> dict:
    """The proxy run's training FLOPs and seconds, from its last checkpoint's compute record."""
    comp = load_checkpoint(traj.last).get("compute") or {}
    return {"proxy_flops": float(comp.get("total_flops", 0.0)), "proxy_s": float(comp.get("wall_s", 0.0)),
            "proxy": str(traj.out_dir), "proxy_steps": int(traj.intervals[-1].it1)}


def directional(replay, theta: list, lam: list, wins: torch.Tensor, chunk: int) -> tuple[np.ndarray, float]:
    """((n,) <lam, grad of each window's mean token loss at theta>, FLOPs per window): one
    forward-mode JVP per chunk of windows (each row's loss is a function of theta alone, so
    one tangent gives every row's directional derivative), the first chunk counted. SDPA's
    math kernel: the fused one has no forward AD."""
    out, per_window = [], 0.0

    def one(win):
        return jvp(lambda *th: replay.token_loss(list(th), win).mean(1), tuple(theta), tuple(lam))[1]
    with sdpa_kernel(SDPBackend.MATH):
        for c in range(0, len(wins), chunk):
            win = wins[c:c + chunk]
            if c == 0:
                flops, d = counted(one, win)
                per_window = flops / len(win)
            else:
                d = one(win)
            out.append(d.detach().double().cpu().numpy())
    return (np.concatenate(out) if out else np.zeros(0)), per_window


class _Capture:
    """The run's replay (every attribute forwarded) that keeps (theta_t, lambda_t) at the
    chosen steps on the way back, and counts its calls: the FLOPs of one step and of one
    reverse step are counted once (the last step's, the first the pass reverses), every
    call of each kind costs the same (same shapes)."""

    def __init__(self, replay, steps):
        self._replay, self.want, self.got = replay, set(int(t) for t in steps), {}
        self.n_step = self.n_reverse = 0
        self.step_flops = self.reverse_flops = self.flops = 0.0

    def __getattr__(self, name):
        return getattr(self._replay, name)

    def step(self, s, t, windows, w=None):
        self.n_step += 1
        return self._replay.step(s, t, windows, w)

    def reverse(self, s, t, windows, w, G, lams):
        if not self.n_reverse:  # measured on copies of the inputs; the pass's own call follows
            self.step_flops = counted(self._replay.step, s, t, windows, None if bool((w == 1).all()) else w)[0]
            self.reverse_flops = counted(self._replay.reverse, s, t, windows, w, G, lams)[0]
        self.n_reverse += 1
        back, dw, lam_G = self._replay.reverse(s, t, windows, w, G, lams)
        if t in self.want:
            self.got[t] = ([x.detach() for x in s.theta], [x.detach() for x in lam_G[0]])
        return back, dw, lam_G

    def total_flops(self) -> float:
        """The pass's FLOPs: its replayed steps, its reverse steps and the probes' gradient."""
        return self.n_step * self.step_flops + self.n_reverse * self.reverse_flops + self.flops
