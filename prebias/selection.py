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
             scorer's ref_nll of the batch, or a reference model's loss (--select_ref)
    el2n     mean over the window's tokens of ||softmax(logits) - onehot(next)||_2
             (EL2N, Paul et al. 2021)
    metric   -|metric - target| of a batch metric: steer toward a value

To add a score: one function here (or in your own module) under @SCORES.register("name");
set .needs_model = False where it reads no model, .needs_ref / .needs_metric where it
reads the irreducible loss or a metric target. train.py --select and select_batches.py
--by take it at once.

$ python -c "from prebias.selection import SCORES; print(list(SCORES))"
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from export import load_v0
from model import per_row_loss
from prebias.checkpoint import load_checkpoint, model_from_checkpoint
from prebias.common import Registry, UserError

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


def register(name: str, needs_model: bool = True, needs_ref: bool = False, needs_metric: bool = False):
    """@register("name") on a score function; the flags say what it reads."""
    def deco(fn):
        fn.needs_model, fn.needs_ref, fn.needs_metric = needs_model, needs_ref, needs_metric
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


class Irreducible:
    """ids -> irreducible loss of each batch (rho): the batch metrics' ref_nll column (the
    reference scorer), or with ref_model (a model.bin or .pt) that model's mean token loss,
    computed once per batch and cached."""

    def __init__(self, data, batch_metric, ref_model: str = "", device: str = "cpu"):
        self.data, self.device, self.cache = data, device, {}
        self.ref_nll = self.model = None
        if not ref_model:
            self.ref_nll = batch_metric("ref_nll")
            return
        self.model = (model_from_checkpoint(load_checkpoint(ref_model), device) if ref_model.endswith(".pt")
                      else load_v0(ref_model).to(device).eval())
        if self.model.params.vocab_size != data.vocab_size:
            raise UserError(f"--select_ref={ref_model} has vocab_size {self.model.params.vocab_size}, "
                            f"the data {data.vocab_size}: train the reference model on this data")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.model is None:
            return self.ref_nll[ids]
        todo = [int(i) for i in ids if int(i) not in self.cache]
        if todo:
            x, y = self.data.get(todo)
            for i, v in zip(todo, per_row_loss(self.model, x.to(self.device), y.to(self.device)).tolist()):
                self.cache[i] = v
        return np.array([self.cache[int(i)] for i in ids])


def keep_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n highest scores (NaN never before a number; ties: the earlier
    position), in position order."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    return np.sort(np.lexsort((np.arange(len(s)), -s))[:n])
