"""
Training-data attribution over a run's own record: which batches pushed a probe's loss.

The record says exactly which batch was trained at which step (checkpoint.py), so every
estimator here reads the same Trajectory: the checkpoints, the steps of each interval
between them, the windows as trained (tags applied), and the rows a --train_mask zeroed
(which contributed nothing and get nothing). Each estimator is one unit registered in
ESTIMATORS and returns a score per (trained batch, probe), > 0 = training on the batch
lowered the probe's loss (a proponent):

  grad_dot     <g_probe, g_z> at the last checkpoint (Kronfluence's `identity` strategy:
               the plain gradient dot product the field compares against)
  tracin       TracIn-CP (Pruthi et al. 2020): sum over the steps s that trained z of
               lr_s <g_probe(theta_k), g_z(theta_k)>, theta_k the checkpoint starting s's interval
  tracin_adam  the same with AdamW's preconditioning (as LESS, Xia et al. 2024): g_z is divided
               by sqrt(v_hat) + eps of the optimizer moments saved at theta_k (train.py
               --keep_optimizer=True), since an Adam step moves the weights by that, not by g
  trak         TRAK-style (Park et al. 2023): phi = P g (projected gradients),
               phi_probe (Phi^T Phi + lambda I)^-1 phi_z, averaged over the regular checkpoints
  ekfac        EK-FAC influence at the last checkpoint (Grosse et al. 2023) through
               Kronfluence (optional: pip install kronfluence, see requirements-extra.txt)
  magic        exact metagradients (MAGIC, Ilyas & Engstrom 2025): -d probe / d w[s, r] by
               reverse-mode through every AdamW step of the replayed run, summed over the
               batch's trained occurrences (prebias/magic.py; the (step, row) table is kept
               in <out_dir>/attribution/magic_<hash>.npz)

Gradients are of the window's mean token loss, projected to d dimensions by a seeded
random projection (P, Gaussian or Rademacher entries of variance 1/d, generated block by
block, as TRAK and LoGra do, so <Pa, Pb> estimates <a, b>), and cached per checkpoint by
window content (GradStore). lds() is the linear datamodeling score (Park et al. 2023)
that grades them against retraining; move_effect() is the order-aware prediction of
what moving batches to other steps does.

$ python -c "from prebias.attribution import ESTIMATORS; print(list(ESTIMATORS))"
"""

import hashlib
import math
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prebias import magic
from prebias.checkpoint import (list_checkpoints, load_checkpoint, model_from_checkpoint, optimizer_path, run_config,
                                stream_records)
from prebias.common import LEVEL, DoneRecord, Registry, UserError, atomic_path, file_signature
from prebias.data import BatchData
from prebias.schedule import get_lr
from prebias.stream import trained_windows

ESTIMATORS = Registry("attribution estimator")  # name -> Estimator subclass


# -----------------------------------------------------------------------------
# gradients

class Projector:
    """x (m, n_params) -> (m, d), P generated per parameter block from a seeded
    generator (never the whole d x n_params matrix at once); d = 0: the identity."""

    def __init__(self, sizes: list[int], d: int, kind: str, seed: int):
        self.sizes, self.d, self.kind, self.seed = sizes, d, kind, seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.d == 0:
            return x.double()
        out = torch.zeros(x.shape[0], self.d, dtype=torch.float64)
        at = 0
        for b, n in enumerate(self.sizes):
            step = max(256, (1 << 22) // self.d)  # a block of P holds at most 4M entries (32 MB)
            for c0 in range(0, n, step):
                c1 = min(n, c0 + step)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + b * 7919 + c0)
                if self.kind == "gaussian":
                    P = torch.randn(c1 - c0, self.d, generator=g)
                else:  # int8 draws: 3x faster than int64 ones; float32 blocks, float64 sums
                    P = torch.randint(0, 2, (c1 - c0, self.d), generator=g, dtype=torch.int8).float() * 2 - 1
                out += (x[:, at + c0:at + c1].float() @ P).double()
            at += n
        return out / math.sqrt(self.d)


def flat_grad(model, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the mean token loss (over the positions where weight > 0) as one vector."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(x)
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
    loss = ce.mean() if weight is None else (ce * weight).sum() / weight.sum()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach()


def batch_grads(model, windows: np.ndarray) -> torch.Tensor:
    """(m, n_params): each window's own gradient (one window = one batch of the index)."""
    model.train(False)
    w = torch.from_numpy(np.asarray(windows))
    return torch.stack([flat_grad(model, w[i:i + 1, :-1], w[i:i + 1, 1:]) for i in range(len(w))])


def adam_preconditioner(model, opt_state: dict, eps: float | None = None) -> torch.Tensor:
    """(n_params,) 1 / (sqrt(v_hat) + eps) from an AdamW state dict, in model.parameters()
    order (model.configure_optimizers puts the >= 2-D weights in group 0, the rest in 1)."""
    params = list(model.parameters())
    order = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
    groups = opt_state["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    beta2 = groups[0]["betas"][1]
    eps = groups[0]["eps"] if eps is None else eps
    by_param = {}
    for i, p in zip(ids, order):
        st = opt_state["state"].get(i)
        if st is None or "exp_avg_sq" not in st:
            raise UserError("the optimizer state has no second moments (a checkpoint before any step)")
        v_hat = st["exp_avg_sq"].double() / (1 - beta2 ** float(st["step"]))
        by_param[id(p)] = 1.0 / (v_hat.sqrt() + eps)
    return torch.cat([by_param[id(p)].reshape(-1) for p in params])


@dataclass
class Item:
    """One sequence whose loss gradient is wanted: tokens (L,), optional weight (L-1,)."""
    tokens: np.ndarray
    weight: np.ndarray | None = None

    def key(self) -> str:
        h = hashlib.sha1(np.asarray(self.tokens, np.int64).tobytes())
        if self.weight is not None:
            h.update(np.asarray(self.weight, np.float32).tobytes())
        return h.hexdigest()


class GradStore:
    """Projected gradients (m, d) of items at a checkpoint, cached on disk per checkpoint
    and kind ('plain', or 'adam' for Adam-preconditioned), keyed by item content."""

    def __init__(self, cache_dir, d: int, proj: str, seed: int, chunk: int = 0):
        self.dir, self.d, self.proj, self.seed, self.chunk = Path(cache_dir), d, proj, seed, chunk
        # version: bump when P changes
        self.done = DoneRecord(self.dir / "done.json", {"d": d, "proj": proj, "seed": seed, "version": 4})
        self.mem = {}  # (ckpt stem, kind) -> {key: row}
        self.computed = 0  # gradients computed (not read from the cache) by this store

    def _load(self, ck_path: Path, kind: str) -> dict:
        name = (Path(ck_path).stem, kind)
        if name not in self.mem:
            self.mem[name] = {}
            path = self.dir / f"{name[0]}_{kind}.npz"
            if self.done.is_done(f"{name[0]}_{kind}", file_signature(ck_path), path):
                with np.load(path) as z:
                    self.mem[name] = dict(zip(z["keys"].tolist(), z["grads"]))
        return self.mem[name]

    def get(self, ck_path, items: list[Item], kind: str = "plain", model=None, precond=None,
            desc: str = "") -> np.ndarray:
        """(len(items), d); model: the checkpoint's model (loaded when None); precond:
        (n_params,) multiplied into the gradient before projection (kind 'adam')."""
        have = self._load(ck_path, kind)
        keys = [it.key() for it in items]
        todo = list(dict.fromkeys(k for k in keys if k not in have))
        if todo:
            model = model or model_from_checkpoint(load_checkpoint(ck_path))
            sizes = [p.numel() for p in model.parameters()]
            P = Projector(sizes, self.d, self.proj, self.seed)
            by_key = {k: it for k, it in zip(keys, items)}
            chunk = self.chunk or int(min(512, max(16, (1 << 27) // sum(sizes))))
            model.train(False)
            bar = tqdm(total=len(todo), desc=f"gradients {desc or Path(ck_path).stem} ({kind})", leave=False,
                       unit="win", mininterval=2)
            for c0 in range(0, len(todo), chunk):
                part = todo[c0:c0 + chunk]
                G = torch.stack([_item_grad(model, by_key[k]) for k in part])
                if precond is not None:
                    G = G.double() * precond
                for k, row in zip(part, P(G).numpy()):
                    have[k] = row
                bar.update(len(part))
            bar.close()
            self.computed += len(todo)
            self._save(ck_path, kind, have)
        return np.stack([have[k] for k in keys]) if keys else np.zeros((0, self.d))

    def _save(self, ck_path, kind, have: dict):
        name = f"{Path(ck_path).stem}_{kind}"
        path = self.dir / f"{name}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=np.array(list(have)), grads=np.stack(list(have.values())))
        self.done.mark(name, file_signature(ck_path), save=True)


def _item_grad(model, it: Item) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(it.tokens, np.int64))[None]
    w = None if it.weight is None else torch.from_numpy(np.asarray(it.weight, np.float32))[None]
    return flat_grad(model, t[:, :-1], t[:, 1:], w)


# -----------------------------------------------------------------------------
# the trajectory: what every estimator reads

@dataclass
class Interval:
    p0: Path  # the checkpoint that starts it (the parameters its first step used)
    it0: int
    it1: int
    steps: np.ndarray  # (n,)
    ids: np.ndarray  # (n, B)
    keep: np.ndarray  # (n, B) bool: False where --train_mask (or a --train_weights weight of 0) zeroed the row
    win: np.ndarray  # (n, B) index into Trajectory.items: the window as trained


class Trajectory:
    """A run's record, read once: config, data, checkpoints, and every trained (step,
    row) with its window and whether it counted (a masked row did not)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.run = types.SimpleNamespace(**run_config(out_dir))
        self.data = BatchData(self.run.data_dir, self.run.vocab_size, self.run.max_seq_len)
        self.rec = stream_records(out_dir)
        self.ckpts = list_checkpoints(out_dir)
        masked = {(int(s), int(r)) for s, r in self.rec["masked_rows"]}  # and a --train_weights weight of 0:
        masked |= {(int(s), int(r)) for s, r, w in self.rec["weighted_rows"] if w == 0}  # both added nothing
        self.items, self.item_bid, seen, self.intervals = [], [], {}, []
        for (it0, p0), (it1, _) in zip(self.ckpts, self.ckpts[1:]):
            steps = np.arange(it0, it1)
            if not len(steps):
                continue
            ids = self.rec["batch_ids"][it0:it1]
            keep = np.array([[(int(s), r) not in masked for r in range(ids.shape[1])] for s in steps], bool)
            win = np.zeros(ids.shape, np.int64)
            for j, (s, row) in enumerate(zip(steps, ids)):
                for r, w in enumerate(trained_windows(self.data, row, int(s), self.rec)):
                    it = Item(w)
                    k = (int(row[r]), it.key())
                    if k not in seen:
                        seen[k] = len(self.items)
                        self.items.append(it)
                        self.item_bid.append(int(row[r]))
                    win[j, r] = seen[k]
            self.intervals.append(Interval(Path(p0), it0, it1, steps, ids, keep, win))
        if not self.intervals:
            raise UserError(f"{out_dir} has no trained interval (only a step-0 checkpoint?)")
        self.item_bid = np.asarray(self.item_bid, np.int64)
        kept = np.concatenate([iv.ids[iv.keep] for iv in self.intervals])
        self.batches = np.unique(kept)  # the trained batch ids (rows of every score matrix)
        self.row_of = {int(b): i for i, b in enumerate(self.batches)}
        # every trained occurrence (step, row) that counted, step-major: what a per-occurrence
        # score (and train.py --train_weights) addresses; occ_batch: its row of self.batches
        self.occurrences = np.array([(s, r) for iv in self.intervals for j, s in enumerate(iv.steps)
                                     for r in np.flatnonzero(iv.keep[j])], np.int64).reshape(-1, 2)
        self.occ_batch = np.array([self.row_of[int(self.rec["batch_ids"][s, r])] for s, r in self.occurrences],
                                  np.int64)

    @property
    def last(self) -> Path:
        return Path(self.ckpts[-1][1])

    def lr(self, step: int) -> float:
        return get_lr(int(step), self.run)

    def interval_of(self, step: int) -> Interval:
        for iv in self.intervals:
            if iv.it0 <= step < iv.it1:
                return iv
        raise UserError(f"step {step} is not a trained step of {self.out_dir}")

    def regular_checkpoints(self) -> list[Path]:
        """The checkpoints at multiples of eval_interval and the last, not step 0."""
        ev = self.run.eval_interval
        return [Path(p) for it, p in self.ckpts if it > 0 and (it % ev == 0 or it == self.ckpts[-1][0])]

    def occurrence_sum(self, by_occ: np.ndarray) -> np.ndarray:
        """(n_occurrences, P) -> (n_batches, P): each batch's occurrences summed."""
        out = np.zeros((len(self.batches), by_occ.shape[1]))
        np.add.at(out, self.occ_batch, by_occ)
        return out

    def spread(self, by_batch: np.ndarray) -> np.ndarray:
        """(n_batches, P) -> (n_occurrences, P): a batch's score split evenly over the
        occurrences that trained it (so they sum to it)."""
        n = np.bincount(self.occ_batch, minlength=len(self.batches))
        return by_batch[self.occ_batch] / n[self.occ_batch, None]

    def per_batch(self, by_item: np.ndarray) -> np.ndarray:
        """(n_items, P) -> (n_batches, P): the windows of each batch id summed, each once."""
        out = np.zeros((len(self.batches), by_item.shape[1]))
        used = np.unique(np.concatenate([iv.win[iv.keep] for iv in self.intervals]))
        rows = np.array([self.row_of[int(b)] for b in self.item_bid[used]], np.int64)
        np.add.at(out, rows, by_item[used])
        return out

    def preconditioner_available(self) -> bool:
        """Whether every checkpoint after step 0 kept its optimizer moments (--keep_optimizer)."""
        return all(optimizer_path(self.out_dir, it).exists() for it, _ in self.ckpts if it > 0)

    def preconditioner(self, model, it0: int) -> torch.Tensor:
        """Adam's 1 / (sqrt(v_hat) + eps) at the checkpoint of step it0 (the next one for step 0,
        whose moments are still empty)."""
        its = [it for it, _ in self.ckpts]
        use = it0 if it0 > 0 else next(it for it in its if it > 0)
        p = optimizer_path(self.out_dir, use)
        if not p.exists():
            raise UserError(f"{p} is missing: tracin_adam needs the optimizer moments of every checkpoint; retrain "
                            f"with python train.py --keep_optimizer=True (--out_dir={self.out_dir})")
        return adam_preconditioner(model, torch.load(p, map_location="cpu", weights_only=True))


# -----------------------------------------------------------------------------
# estimators

@dataclass
class Context:
    """What an estimator is given: the trajectory, the probes, the gradient store, settings."""
    traj: Trajectory
    probes: list  # [Item]
    store: GradStore
    damping: float = 0.01  # trak: lambda = damping * mean eigenvalue of Phi^T Phi
    ekfac_damping: float = 0.0  # ekfac: Kronfluence's damping_factor (0: its default heuristic)
    cache_dir: Path = field(default_factory=lambda: Path("."))


class Estimator:
    """One way to score (trained batch, probe) pairs, registered by name. scores(ctx) ->
    (n_batches, n_probes) over ctx.traj.batches, > 0 = proponent."""
    needs_optimizer = False
    optional = ""  # a package it needs that is an optional extra

    def scores(self, ctx: Context) -> np.ndarray:
        raise NotImplementedError

    def occurrence_scores(self, ctx: Context) -> np.ndarray:
        """(n_occurrences, P) over ctx.traj.occurrences, > 0 = proponent. An estimator that
        scores batches, not steps, gets its batch score spread evenly over the batch's
        occurrences (Trajectory.spread); one that scores each step overrides this."""
        return ctx.traj.spread(self.scores(ctx))


def step_influence(ctx: Context, iv: Interval, kind: str, windows: list[Item] | None = None) -> np.ndarray:
    """(n_windows, P): <P g_probe(theta_k), P u(theta_k)> at the checkpoint starting `iv`,
    with u the window's gradient, Adam-preconditioned for kind 'adam'. windows default to
    the interval's own; multiply by a step's learning rate for that step's influence."""
    model = model_from_checkpoint(load_checkpoint(iv.p0))
    items = windows if windows is not None else [ctx.traj.items[i] for i in np.unique(iv.win)]
    pre = ctx.traj.preconditioner(model, iv.it0) if kind == "adam" else None
    G = ctx.store.get(iv.p0, items, kind, model, pre, desc=f"step {iv.it0}")
    Q = ctx.store.get(iv.p0, ctx.probes, "plain", model, desc=f"probes at step {iv.it0}")
    return G @ Q.T


def tracin_occurrences(ctx: Context, kind: str) -> np.ndarray:
    """(n_occurrences, P): lr_s <g_probe, u_z> of each trained (step, row), in the order of
    Trajectory.occurrences (repeats count, masked rows do not)."""
    traj = ctx.traj
    out, o = np.zeros((len(traj.occurrences), len(ctx.probes))), 0
    for iv in tqdm(traj.intervals, desc=f"intervals ({kind})", unit="ckpt"):
        uniq = np.unique(iv.win)
        dots = step_influence(ctx, iv, kind)
        pos = {int(w): i for i, w in enumerate(uniq)}
        for j, s in enumerate(iv.steps):
            lr = traj.lr(s)
            for r in np.flatnonzero(iv.keep[j]):
                out[o] = lr * dots[pos[int(iv.win[j, r])]]
                o += 1
    return out


@ESTIMATORS.register("tracin")
class TracIn(Estimator):
    """TracIn-CP: sum of lr_s <g_probe, g_z> at the checkpoint starting each step's interval"""
    kind = "plain"

    def occurrence_scores(self, ctx):
        return tracin_occurrences(ctx, self.kind)

    def scores(self, ctx):
        return ctx.traj.occurrence_sum(self.occurrence_scores(ctx))


@ESTIMATORS.register("tracin_adam")
class TracInAdam(TracIn):
    """TracIn-CP with AdamW's preconditioning 1 / (sqrt(v_hat) + eps) from the saved moments (LESS)"""
    needs_optimizer = True
    kind = "adam"


def all_windows(traj: Trajectory) -> list[Item]:
    used = np.unique(np.concatenate([iv.win[iv.keep] for iv in traj.intervals]))
    return used, [traj.items[i] for i in used]


@ESTIMATORS.register("grad_dot")
class GradDot(Estimator):
    """<g_probe, g_z> at the last checkpoint (Kronfluence's identity strategy)"""

    def scores(self, ctx):
        used, items = all_windows(ctx.traj)
        model = model_from_checkpoint(load_checkpoint(ctx.traj.last))
        G = ctx.store.get(ctx.traj.last, items, "plain", model, desc="last")
        Q = ctx.store.get(ctx.traj.last, ctx.probes, "plain", model, desc="probes at last")
        by_item = np.zeros((len(ctx.traj.items), len(ctx.probes)))
        by_item[used] = G @ Q.T
        return ctx.traj.per_batch(by_item)


@ESTIMATORS.register("trak")
class Trak(Estimator):
    """phi_probe (Phi^T Phi + lambda I)^-1 phi_z on projected gradients, averaged over checkpoints"""

    def scores(self, ctx):
        used, items = all_windows(ctx.traj)
        if ctx.store.d == 0 or ctx.store.d >= len(items) * 4:
            raise UserError(f"trak needs projected gradients with d well below the {len(items)} training windows "
                            f"(--d={ctx.store.d})")
        by_item = np.zeros((len(ctx.traj.items), len(ctx.probes)))
        cks = ctx.traj.regular_checkpoints()
        for ck in tqdm(cks, desc="checkpoints (trak)", unit="ckpt"):
            model = model_from_checkpoint(load_checkpoint(ck))
            Phi = ctx.store.get(ck, items, "plain", model, desc=ck.stem)
            Q = ctx.store.get(ck, ctx.probes, "plain", model, desc=f"probes at {ck.stem}")
            by_item[used] += trak_scores(Phi, Q, ctx.damping) / len(cks)
        return ctx.traj.per_batch(by_item)


def trak_scores(Phi: np.ndarray, Q: np.ndarray, damping: float) -> np.ndarray:
    """(n, P): Phi (Phi^T Phi + lambda I)^-1 Q^T, lambda = damping * trace / d."""
    K = Phi.T @ Phi
    K[np.diag_indices_from(K)] += damping * np.trace(K) / len(K)
    return Phi @ np.linalg.solve(K, Q.T)


@ESTIMATORS.register("ekfac")
class EKFAC(Estimator):
    """EK-FAC influence at the last checkpoint through Kronfluence (Grosse et al. 2023)"""
    optional = "kronfluence"

    def scores(self, ctx):
        used, items = all_windows(ctx.traj)
        model = model_from_checkpoint(load_checkpoint(ctx.traj.last))
        S = kronfluence_scores(model, [it.tokens for it in items], ctx.probes, ctx.cache_dir / "ekfac",
                               damping=ctx.ekfac_damping or None)  # (P, n)
        by_item = np.zeros((len(ctx.traj.items), len(ctx.probes)))
        by_item[used] = S.T
        return ctx.traj.per_batch(by_item)


@ESTIMATORS.register("magic")
class Magic(Estimator):
    """-d probe / d w summed over the batch's occurrences, through every replayed AdamW step"""

    def scores(self, ctx):
        return magic.batch_scores(ctx.traj, magic.cached_table(ctx.traj, ctx.probes, ctx.cache_dir))

    def occurrence_scores(self, ctx):
        """(n_occurrences, P) over ctx.traj.occurrences ([step, row]): each occurrence's own -dw."""
        occ = np.asarray(ctx.traj.occurrences)
        return -magic.cached_table(ctx.traj, ctx.probes, ctx.cache_dir)["dw"][:, occ[:, 0], occ[:, 1]].T


class _Seqs(torch.utils.data.Dataset):
    """Sequences for Kronfluence: tokens (L,) and a loss weight (L-1,) per item."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        w = np.ones(len(it.tokens) - 1, np.float32) if it.weight is None else np.asarray(it.weight, np.float32)
        return {"tokens": torch.from_numpy(np.asarray(it.tokens, np.int64)), "weight": torch.from_numpy(w)}


def _kronfluence_task():
    from kronfluence.task import Task

    class LMTask(Task):
        """Next-token loss: the training loss summed over tokens (Kronfluence's convention),
        with labels sampled from the model for the true Fisher; the measurement is the
        probe's mean token loss (weighted where the probe has a weight)."""

        def compute_train_loss(self, batch, model, sample=False):
            t = batch["tokens"]
            logits = model(t[:, :-1])[0].float()
            y = t[:, 1:]
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1).view_as(y)
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="sum")

        def compute_measurement(self, batch, model):
            t, w = batch["tokens"], batch["weight"]
            ce = torch.nn.functional.cross_entropy(model(t[:, :-1])[0].float().transpose(1, 2), t[:, 1:],
                                                   reduction="none")
            return ((ce * w).sum(1) / w.sum(1)).sum()
    return LMTask()


def kronfluence_scores(model, train_tokens: list, probes: list[Item], out_dir, damping: float | None = None,
                       strategy: str = "ekfac", batch_size: int = 16, empirical_fisher: bool = False) -> np.ndarray:
    """(n_probes, n_train) influence scores from Kronfluence (factors fitted on the training
    windows themselves), > 0 = training on it lowers the probe's loss."""
    import copy
    import logging
    import warnings

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    task = _kronfluence_task()
    warnings.filterwarnings("ignore", message=".*GradScaler.*", category=FutureWarning)  # its CPU path, harmless
    model = prepare_model(copy.deepcopy(model).float().train(False), task)  # it freezes and wraps the modules
    train = _Seqs([Item(np.asarray(t)) for t in train_tokens])
    an = Analyzer("attribution", model, task, cpu=True, log_level=logging.WARNING, output_dir=str(out_dir),
                  disable_tqdm=True)  # its bars are per query: one line per phase here instead
    print(f"ekfac: fitting factors on {len(train)} windows, then {len(probes)} probes x {len(train)} scores")
    an.fit_all_factors("factors", train, per_device_batch_size=batch_size, overwrite_output_dir=True,
                       factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher))
    same = len({len(p.tokens) for p in probes}) == 1  # one query batch: one pass over the training windows
    an.compute_pairwise_scores("scores", "factors", _Seqs(probes), train,
                               per_device_query_batch_size=len(probes) if same else 1,
                               per_device_train_batch_size=batch_size, overwrite_output_dir=True,
                               score_args=ScoreArguments(damping_factor=damping))
    return an.load_pairwise_scores("scores")["all_modules"].double().numpy()


def available(name: str) -> bool:
    import importlib.util
    opt = ESTIMATORS[name].optional
    return not opt or importlib.util.find_spec(opt) is not None


def run_estimator(name: str, ctx: Context, per: str = "batch") -> tuple[np.ndarray, dict]:
    """(scores (n_batches, P), or (n_occurrences, P) for per='occurrence', cost {seconds,
    gradients computed})."""
    est = ESTIMATORS.lookup(name, "--estimator")
    if est.optional and not available(name):
        raise UserError(f"--estimator={name} needs the optional package {est.optional}: see requirements-extra.txt")
    t0, g0 = time.perf_counter(), ctx.store.computed
    S = est().occurrence_scores(ctx) if per == "occurrence" else est().scores(ctx)
    return S, {"seconds": time.perf_counter() - t0, "gradients": ctx.store.computed - g0}


# -----------------------------------------------------------------------------
# grading: the linear datamodeling score

def spearman_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P,) Spearman correlation of each column of a (M, P) with the same column of b."""
    from scipy.stats import rankdata
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, np.nan)


def lds(scores: np.ndarray, kept: np.ndarray, measured: np.ndarray, n_boot: int = 1000, seed: int = 0,
        boot_idx: np.ndarray | None = None) -> dict:
    """Linear datamodeling score (Park et al. 2023). scores (n, P) per (batch, probe), > 0 =
    lowers the probe's loss; kept (M, n) bool: the batches each retrain kept; measured
    (M, P): each retrain's probe losses. The datamodel predicts subset m's goodness on
    probe j as sum_{i kept} scores[i, j]; LDS = mean over probes of the Spearman correlation
    (across the M subsets) of that prediction with -loss. 95% bootstrap interval over
    subsets, bias-corrected (bc_interval; boot_idx (n_boot, M) pairs several estimators on
    the same resamples)."""
    pred = kept.astype(np.float64) @ scores  # (M, P)
    per = spearman_cols(pred, -measured)
    M = len(kept)
    if boot_idx is None:
        boot_idx = np.random.default_rng(seed).integers(0, M, (n_boot, M))
    boot = np.array([np.nanmean(spearman_cols(pred[ix], -measured[ix])) for ix in boot_idx])
    est = float(np.nanmean(per))
    lo, hi = bc_interval(boot, est)
    return {"lds": est, "lo": lo, "hi": hi, "per_probe": per, "boot": boot}


def bc_interval(boot: np.ndarray, est: float, level: float = LEVEL) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval (Efron 1981): a resample's repeated
    subsets tie in rank and pull a rank correlation down, so the plain percentiles sit
    below the estimate; z0 = Phi^-1(share of resamples below it) shifts them back."""
    from scipy.stats import norm
    boot = boot[np.isfinite(boot)]
    if not len(boot) or not math.isfinite(est):
        return math.nan, math.nan
    share = (np.sum(boot < est) + 0.5 * np.sum(boot == est)) / len(boot)
    z0 = norm.ppf(min(max(share, 0.5 / len(boot)), 1 - 0.5 / len(boot)))
    a = (1 - level) / 2
    q = norm.cdf(2 * z0 + norm.ppf([a, 1 - a])) * 100
    lo, hi = np.percentile(boot, q)
    return float(lo), float(hi)


def bootstrap_corr(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0, kind: str = "pearson") -> dict:
    """Correlation of x and y with a 95% bias-corrected bootstrap interval over the pairs."""
    def corr(a, b):
        if kind == "spearman":
            return float(spearman_cols(a[:, None], b[:, None])[0])
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan
    rng = np.random.default_rng(seed)
    boot = np.array([corr(x[ix], y[ix]) for ix in rng.integers(0, len(x), (n_boot, len(x)))])
    r = corr(x, y)
    lo, hi = bc_interval(boot, r)
    return {"r": r, "lo": lo, "hi": hi}


# -----------------------------------------------------------------------------
# order-aware attribution: what moving batches to other steps does

def unrolled_adjoints(T: int, lr, hvp, precond, v_final: torch.Tensor, want) -> dict:
    """{t: v_t} for t in want: v_t = d probe(theta_T) / d theta_t along the run, by the
    backward recursion v_t = v_{t+1} - lr_t H_t D_t v_{t+1} (the step theta_{t+1} = theta_t -
    lr_t D_t g_t(theta_t) linearised; H_t the Hessian of step t's loss, hvp(t, x) = H_t x,
    D_t = precond(t), a vector: Adam's 1 / (sqrt(v_hat) + eps) with frozen moments, or 1).
    On a quadratic with SGD this is exact: the dynamics are affine."""
    want, out, v = set(want), {}, v_final.clone()
    if T in want:
        out[T] = v.clone()
    for t in tqdm(range(T - 1, -1, -1), desc="adjoint (backward through the steps)", unit="step", leave=False):
        v = v - lr(t) * hvp(t, precond(t) * v)
        if not torch.isfinite(v).all():
            raise UserError(f"the adjoint overflowed at step {t}: the linearised run is unstable there")
        if t in want:
            out[t] = v.clone()
    return out


def move_prediction(moves, lr, B: int, grad, adjoint, precond) -> float:
    """The first-order change of the probe when batches move, moves [(batch, old step,
    new step)]: taking z out of step s changes the step's gradient by -g_z / B (the
    denominator stays B x T), so theta_{s+1} by +lr_s D_s g_z / B and the probe by
    v_{s+1} . that; putting it in at s' the opposite. grad(z, s): g_z at step s's
    parameters; adjoint(s): v_{s+1}; precond(s): D_s."""
    total = 0.0
    for z, s_old, s_new in moves:
        for s, sign in ((s_old, 1.0), (s_new, -1.0)):
            total += sign * lr(s) / B * float(adjoint(s) @ (precond(s) * grad(z, s)))
    return total


def damped(D: torch.Tensor) -> torch.Tensor:
    """1 / (sqrt(v_hat) + median sqrt(v_hat)) from 1 / (sqrt(v_hat) + eps): with eps = 1e-8 the
    weights whose moments are ~0 get ~1e8, and the linearised recursion through 200 steps
    overflows; damping by the median bounds the preconditioner at 1 / median."""
    s = 1 / D.double()  # sqrt(v_hat) + eps
    return 1 / (s + s.median())


def move_effect_unrolled(ctx: Context, move_sets: list, adam: bool = True) -> np.ndarray:
    """move_prediction for each move set on the run: the adjoint from the last checkpoint's
    mean probe gradient back through every step (Hessian-vector products of each step's
    kept rows at the checkpoint starting its interval), Adam's preconditioner of that
    checkpoint damped by its median (damped; 1 without saved moments). Exact gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    traj = ctx.traj
    B = traj.rec["batch_ids"].shape[1]
    models, pre = {}, {}

    def model_of(s):
        iv = traj.interval_of(s)
        if iv.it0 not in models:
            models[iv.it0] = model_from_checkpoint(load_checkpoint(iv.p0))
            pre[iv.it0] = (damped(traj.preconditioner(models[iv.it0], iv.it0)).float() if adam else
                           torch.ones(sum(p.numel() for p in models[iv.it0].parameters())))
        return models[iv.it0], pre[iv.it0], iv

    def hvp(t, x):
        m, _, iv = model_of(t)
        j = t - iv.it0
        rows = np.flatnonzero(iv.keep[j])
        w = torch.from_numpy(np.stack([traj.items[i].tokens for i in iv.win[j, rows]])) if len(rows) else None
        if w is None:
            return torch.zeros_like(x)
        ps = list(m.parameters())
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            ce = torch.nn.functional.cross_entropy(m(w[:, :-1])[0].float().transpose(1, 2), w[:, 1:], reduction="sum")
            g = torch.autograd.grad(ce / (B * (w.shape[1] - 1)), ps, create_graph=True)
            hv = torch.autograd.grad(torch.cat([a.reshape(-1) for a in g]) @ x, ps)
        return torch.cat([h.reshape(-1) for h in hv]).detach()
    last = model_from_checkpoint(load_checkpoint(traj.last))
    v_T = torch.stack([_item_grad(last, it) for it in ctx.probes]).mean(0)
    steps = {s for ms in move_sets for _, a, b in ms for s in (a, b)}
    adj = unrolled_adjoints(traj.run.max_iters, traj.lr, hvp, lambda t: model_of(t)[1], v_T, {s + 1 for s in steps})
    grads = {}

    def grad(z, s):
        m, _, iv = model_of(s)
        if (z, iv.it0) not in grads:
            grads[(z, iv.it0)] = _item_grad(m, Item(traj.data.window(int(z))))
        return grads[(z, iv.it0)]
    return np.array([move_prediction(ms, traj.lr, B, grad, lambda s: adj[s + 1], lambda s: model_of(s)[1])
                     for ms in move_sets])


def move_effect(ctx: Context, moves: list[tuple[int, int, int]], kind: str = "plain") -> np.ndarray:
    """The first-order change of each probe's loss (P,) when batches move: moves =
    [(batch id, old step, new step)]. A batch's step influence at step s is
    lr_s <g_probe(theta_k(s)), u_z(theta_k(s))> (tracin's term, theta_k(s) the checkpoint
    starting s's interval); moving it takes that away at the old step and adds it at the new:
    change = sum over moves of influence(old) - influence(new) (> 0: the loss rises)."""
    traj = ctx.traj
    by_iv = {}
    for b, s_old, s_new in moves:
        for s, sign in ((s_old, 1.0), (s_new, -1.0)):
            by_iv.setdefault(traj.interval_of(s).it0, []).append((b, s, sign))
    out = np.zeros(len(ctx.probes))
    for it0, rows in by_iv.items():
        iv = traj.interval_of(it0)
        items = [Item(traj.data.window(int(b))) for b, _, _ in rows]
        dots = step_influence(ctx, iv, kind, items)  # (len(rows), P)
        for (b, s, sign), d in zip(rows, dots):
            out += sign * traj.lr(s) * d
    return out
