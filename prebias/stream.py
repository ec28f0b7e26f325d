"""
What one optimizer step trains on, as one stream with an exact record:

    schedule (the step's ids: schedule.py, a pure function of spec + seed + data)
      -> optional online selection (a pool K times larger, scored, the best B kept)
      -> optional tag insertion (canaries, conditional tags: tags.py)
      -> the batch windows

Each stage is deterministic given the step, the seed and the model state at that step,
and the checkpoint records what came out of it (checkpoint.py): the ids, the pool where
selection ran, each insertion where tags ran. The batch viewer, eval, durability and
attribution read the same record (apply_insertions rebuilds a trained window), resume
replays it, and world size never changes it (every rank computes the whole step's
decisions; ranks only split the forward/backward work).

Online selection (--select, --select_pool=K): the pool of step t is the schedule's B ids
of step t followed by (K-1)*B candidates from a second stream of the same spec with the
seed (seed, 'pool'); so `uniform` (keep the pool's first B) trains on exactly the ids of
no selection. The pool is scored by a registered selection score (selection.py: uniform,
loss, rho, el2n, metric; higher = kept, ties: the earlier pool position), the same
functions select_batches.py uses offline.
A batch chosen from the second stream may come again later in the first: selection
trades the once-per-epoch guarantee for the choice.
The training ids are the data's training batches, less its holdout where the run reads
the reference fitted on it (holdout_mode: rho, a ref_* metric; train.py --holdout), or the
holdout alone (--holdout=only: an irreducible-loss model); checkpoints record which.

Insertions: a row [step, row, pos, tag, n_tokens, mode] says that at `step`, in row `row`
(0..B-1) of that step's ids, the tag's n tokens sit at window position `pos`; mode 0
replaced window[pos:pos+n], mode 1 inserted them there (the tail shifts right and its
last n tokens fall off). Rows apply in recorded order; replaced_tokens keeps what was
overwritten or pushed off, so the original window is recoverable without the data too.
Canaries replace (at the window start or a seeded random position, in `rows` seeded
rows of each active step); conditional tags insert after the BOS of each story whose
story-level metric lies in the tag's range, and their controls after the BOS of stories
drawn at random at the same rate (Inserter).
"""

import dataclasses
import hashlib
import json
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np

import metrics
from prebias import batchmetrics, metrics_engine
from prebias import tags as tagmod
from prebias.checkpoint import list_checkpoints, run_config
from prebias.common import DoneRecord, UserError, atomic_path, autocast_ctx
from prebias.data import BOS_ID, BatchData, tok_dir, window_texts
from prebias.paths import RunPaths
from prebias.schedule import (STRATEGIES, Schedule, SpecError, load_ids, load_spec, spec_from_flags, spec_metrics,
                              validate_spec)
from prebias.selection import SCORES, Irreducible, ScoreContext, keep_best, reads_reference
from prebias.sp_tokenizer import Tokenizer

REPLACE, INSERT = 0, 1
INS_COLUMNS = ("step", "row", "pos", "tag", "n_tokens", "mode")


# -----------------------------------------------------------------------------
# insertions: apply a record to a window

def apply_insertions(window: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The window as trained: `rows` (k, 6) are this window's insertion rows in recorded
    order and `tokens` their inserted tokens, concatenated."""
    w = np.asarray(window, dtype=np.int64).copy()
    L, at = len(w), 0
    for _, _, pos, _, n, mode in np.asarray(rows).reshape(-1, 6):
        t = tokens[at:at + n]
        at += n
        if mode == REPLACE:
            w[pos:pos + n] = t
        else:
            w = np.concatenate([w[:pos], t, w[pos:]])[:L]
    return w


def trained_windows(data: BatchData, ids: np.ndarray, step: int, rec: dict) -> np.ndarray:
    """(B, T+1) windows that step `step` trained on, from a record of
    checkpoint.stream_records (ids = rec['batch_ids'][step])."""
    wins = data.windows(ids)
    ins = rec["insertions"]
    if len(ins) == 0:
        return wins
    offs = np.concatenate([[0], np.cumsum(ins[:, 4])])
    for row in np.unique(ins[ins[:, 0] == step, 1]):
        sel = np.flatnonzero((ins[:, 0] == step) & (ins[:, 1] == row))
        toks = np.concatenate([rec["insert_tokens"][offs[i]:offs[i + 1]] for i in sel])
        wins[row] = apply_insertions(wins[row], ins[sel], toks)
    return wins


# -----------------------------------------------------------------------------
# story-level metrics (conditional tags), cached per shard beside the tokens

def story_metric(data: BatchData, data_dir, metric: str) -> list[np.ndarray]:
    """One value of a text metric per story of each shard (index = story within the
    shard, as the batch index numbers them), from the tokens the model sees."""
    out_dir = tok_dir(data_dir, data.vocab_size) / "story_metrics"
    rec = DoneRecord(out_dir / f"{metric}.json", {"metric": metric, "versions": metrics.metric_versions([metric]),
                                                   "tokenizer": data.meta["tokenizer_sha256"]})
    enc, out = None, []
    for s, info in enumerate(data.meta["shards"]):
        path = out_dir / f"{metric}_shard{s:02d}.npy"
        if rec.is_done(s, info["n_tokens"], path):
            out.append(np.load(path))
            continue
        enc = enc or Tokenizer.for_vocab(data.vocab_size, data_dir)
        tok = np.asarray(data.tokens[s])
        starts = np.flatnonzero(tok == BOS_ID)
        stories = [tok[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tok)])]
        vals = metrics_engine.text_metrics(enc.sp.decode(stories) if stories else [], [metric])[metric]
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(vals, dtype=np.float64), allow_pickle=False)
        rec.mark(s, info["n_tokens"], save=True)
        out.append(np.asarray(vals, dtype=np.float64))
    return out


class Inserter:
    """Decides and applies the tag insertions of a step: a pure function of (tags, seed,
    step, the step's windows). A conditional tag's control (tags.py) goes after the BOS of
    stories drawn at random, once per story and seed, at the tag's rate: the share of
    training stories whose metric is in the tag's range. Controls come after the file's
    tags, so a story that has both reads BOS, tag, control: the tag keeps its place."""

    def __init__(self, tagset, data: BatchData, data_dir, seed: int):
        self.tags, self.data, self.seed = tagset.tags, data, seed
        self.file_seed = int(json.loads(tagset.json).get("seed", 0) or 0)
        self.L = data.max_seq_len + 1
        self.story_vals = {t.metric: story_metric(data, data_dir, t.metric)
                           for t in self.tags if t.kind == "conditional"}
        self._starts, self._chosen = {}, {}

    def _in_range(self, tag, shard: int) -> np.ndarray:
        v = self.story_vals[tag.metric][shard]
        lo = -np.inf if tag.lo is None else tag.lo
        hi = np.inf if tag.hi is None else tag.hi
        return (v >= lo) & (v <= hi)  # NaN: out of range

    def _stories(self, tag, shard: int) -> np.ndarray:
        """(stories of the shard,) bool: which get the tag (its range) or the control (a draw)."""
        if (tag.index, shard) not in self._chosen:
            if tag.kind == "control":
                self._chosen.update({(tag.index, s): c for s, c in enumerate(self._control_stories(tag))})
            else:
                self._chosen[tag.index, shard] = self._in_range(tag, shard)
        return self._chosen[tag.index, shard]

    def _control_stories(self, ctl) -> list[np.ndarray]:
        """Per shard, which stories get the control: each with the parent tag's rate over
        the training shards (1..), independently of any metric."""
        parent = self.tags[ctl.control_of]
        n = [len(v) for v in self.story_vals[parent.metric]]
        hits = [int(self._in_range(parent, s).sum()) for s in range(1, len(n))]
        rate = sum(hits) / max(sum(n[1:]), 1)
        return [np.random.default_rng([self.seed, self.file_seed, ctl.index, 0x63746C, s]).random(n[s]) < rate
                for s in range(len(n))]

    def _story_starts(self, shard: int) -> np.ndarray:
        if shard not in self._starts:
            self._starts[shard] = np.flatnonzero(np.asarray(self.data.tokens[shard]) == BOS_ID)
        return self._starts[shard]

    def _rng(self, tag_index: int, step: int):
        return np.random.default_rng([self.seed, self.file_seed, tag_index, step])

    def apply(self, step: int, ids: np.ndarray, wins: np.ndarray):
        """Insert this step's tags into wins (B, T+1) in place; returns (rows (k, 6),
        inserted tokens, replaced tokens)."""
        out = ([], [], [])  # rows, inserted tokens, replaced tokens
        origin = np.broadcast_to(np.arange(self.L), wins.shape).copy()  # window pos -> data pos, -1: a tag's
        for tag in self.tags:
            if not tag.active(step):
                continue
            if tag.kind == "canary":
                self._canary(tag, step, ids, wins, origin, out)
            else:
                for r, bid in enumerate(ids):
                    self._after_bos(tag, step, r, int(bid), wins, origin, out)
        rows, ins, rep = out
        if not rows:
            return np.zeros((0, 6), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.asarray(rows, np.int64), np.concatenate(ins), np.concatenate(rep)

    def _canary(self, tag, step, ids, wins, origin, out):
        """Replace tokens of `rows` seeded rows, at the start or a seeded position."""
        toks, rng = np.asarray(tag.tokens, dtype=np.int64), self._rng(tag.index, step)
        n = len(toks)
        for r in np.sort(rng.choice(len(ids), min(tag.rows, len(ids)), replace=False)):
            pos = 0 if tag.position == "start" else int(rng.integers(0, self.L - n + 1))
            out[2].append(wins[r, pos:pos + n].copy())
            wins[r, pos:pos + n] = toks
            origin[r, pos:pos + n] = -1
            out[0].append((step, r, pos, tag.index, n, REPLACE))
            out[1].append(toks)

    def _after_bos(self, tag, step, r, bid, wins, origin, out):
        """Insert a conditional tag (or a control) after each chosen story's BOS of row r,
        left to right; a control goes after any tag tokens already there."""
        toks = np.asarray(tag.tokens, dtype=np.int64)
        n, L = len(toks), self.L
        shard, off = int(self.data.index[bid]["shard"]), int(self.data.index[bid]["offset"])
        starts = self._story_starts(shard)
        chosen = self._stories(tag, shard)
        q = 0
        while q < L - n:
            # a BOS the data put there (origin >= 0), not one inside inserted tokens
            if wins[r, q] == BOS_ID and origin[r, q] >= 0 and chosen[np.searchsorted(starts, off + origin[r, q])]:
                pos = q + 1
                while tag.kind == "control" and pos < L and origin[r, pos] < 0:
                    pos += 1
                if pos + n <= L:
                    out[2].append(wins[r, L - n:].copy())
                    wins[r] = np.concatenate([wins[r, :pos], toks, wins[r, pos:]])[:L]
                    origin[r] = np.concatenate([origin[r, :pos], np.full(n, -1), origin[r, pos:]])[:L]
                    out[0].append((step, r, pos, tag.index, n, INSERT))
                    out[1].append(toks)
                    q = pos + n - 1
            q += 1


# -----------------------------------------------------------------------------
# online selection

class Selector:
    """Builds each step's pool and keeps the best B of it by a registered score
    (selection.py; see the module docstring for the pool)."""

    def __init__(self, method: str, K: int, spec: dict, data: BatchData, B: int, seed: int, max_iters: int,
                 batch_metric, micro_bs: int, device: str, ctx, ref_model: str = "", metric: str = "",
                 target: float = 0.0, train_ids: np.ndarray | None = None):
        """batch_metric(name) -> that batch metric for every batch id (batch_metrics.csv);
        train_ids: the ids the pool's second stream draws from (the schedule's: the
        training batches, less the holdout where the run excludes it)."""
        self.method, self.K, self.B, self.data = method, K, B, data
        self.score = SCORES.lookup(method, "--select")
        if self.score.needs_run:
            raise UserError(f"--select={method} scores batches from a whole recorded run, offline only: python "
                            f"select_batches.py --by={method} --out_dir=<a short proxy run>, then train on its spec")
        ids = data.train_ids if train_ids is None else train_ids
        self.aux = Schedule(spec, ids, (K - 1) * B, seed=_pool_seed(seed), max_iters=max_iters,
                            metric_of=lambda m: batch_metric(m)[ids]) if K > 1 else None
        if self.score.needs_metric:
            batch_metric(metric)  # an unknown metric is refused now, not at the first step
        self.irreducible = Irreducible(data, batch_metric, ref_model, device, getattr(batch_metric, "meta", None)) \
            if self.score.needs_ref else None
        self.ctx = ScoreContext(device=device, ctx=ctx, batch_size=micro_bs, batch_metric=batch_metric,
                                irreducible=self.irreducible, metric=metric, target=target)
        self.scored, self._ref_seen = 0, 0  # windows scored by the model since take_counts; the reference's so far

    def pool(self, step: int, ids: np.ndarray) -> np.ndarray:
        return ids if self.aux is None else np.concatenate([ids, self.aux.step_ids(step)])

    def scores(self, model, pool: np.ndarray, rank: int = 0, world: int = 1) -> np.ndarray:
        self.scored += len(pool) if self.score.needs_model else 0
        return self.score(model, self.data, pool, dataclasses.replace(self.ctx, rank=rank, world=world))

    def choose(self, model, pool: np.ndarray, rank: int = 0, world: int = 1) -> np.ndarray:
        """The B kept ids, in pool order."""
        return pool[keep_best(self.scores(model, pool, rank, world), self.B)]

    def take_counts(self) -> tuple[int, int]:
        """(windows the model scored, windows the reference model scored) since the last call."""
        ref = self.irreducible.scored if self.irreducible is not None else 0
        out = (self.scored, ref - self._ref_seen)
        self.scored, self._ref_seen = 0, ref
        return out


def _pool_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, 0x706F6F6C]).generate_state(1)[0])  # 'pool'


# -----------------------------------------------------------------------------
# the record kept between checkpoints

class Record:
    """The stream's output since the last checkpoint, in the checkpoint's layout."""

    def __init__(self, B: int, pool_width: int, tags_json: str = ""):
        self.B, self.P, self.tags = B, pool_width, tags_json
        self.clear()

    def clear(self):
        self.ids, self.pools, self.ins, self.ins_tok, self.rep_tok = [], [], [], [], []
        self.masked = []  # [step, row] of every row trained with loss weight 0 (--train_mask)
        self.weighted = []  # [step, row, weight] of every row --train_weights gave a weight other than 1

    def add(self, ids, pool=None, ins=None, ins_tok=None, rep_tok=None, step=None, masked=(), weighted=()):
        self.ids.append(np.asarray(ids, np.int64))
        self.pools.append(np.asarray(pool if pool is not None else np.zeros(0), np.int64))
        if ins is not None and len(ins):
            self.ins.append(ins)
            self.ins_tok.append(ins_tok)
            self.rep_tok.append(rep_tok)
        self.masked += [(step, int(r)) for r in masked]
        self.weighted += [(step, int(r), float(w)) for r, w in weighted]

    def arrays(self) -> dict:
        n = len(self.ids)
        cat = (lambda xs, empty: np.concatenate(xs) if xs else empty)
        return {"batch_ids": np.stack(self.ids) if n else np.zeros((0, self.B), np.int64),
                "pool_ids": np.stack(self.pools).reshape(n, self.P) if n else np.zeros((0, self.P), np.int64),
                "insertions": cat(self.ins, np.zeros((0, 6), np.int64)),
                "insert_tokens": cat(self.ins_tok, np.zeros(0, np.int64)),
                "replaced_tokens": cat(self.rep_tok, np.zeros(0, np.int64)),
                "masked_rows": np.asarray(self.masked, np.int64).reshape(-1, 2),
                "weighted_rows": np.asarray(self.weighted, np.float64).reshape(-1, 3),
                "tags": self.tags}


class Stream:
    """schedule -> selection -> tags for each step (train.py drives it)."""

    def __init__(self, schedule: Schedule, data: BatchData, selector: Selector | None = None,
                 inserter: Inserter | None = None, tags_json: str = "", mask: np.ndarray | None = None,
                 weights: np.ndarray | None = None):
        self.schedule, self.data, self.selector, self.inserter = schedule, data, selector, inserter
        pool_width = selector.K * schedule.B if selector else 0
        self.record = Record(schedule.B, pool_width, tags_json)
        self.mask = np.zeros(0, np.int64) if mask is None else np.unique(np.asarray(mask, np.int64))
        self.weights = weights  # (steps, B) float32 loss weights (--train_weights, load_weights) or None

    def masked(self, ids: np.ndarray) -> np.ndarray:
        """(B,) bool: the rows of a step whose batch is in the train mask (loss weight 0)."""
        return np.isin(ids, self.mask)

    def row_weights(self, step: int, ids: np.ndarray) -> np.ndarray | None:
        """(B,) float32: the loss weight of each row of the step, --train_weights' row (1
        without it) and 0 where --train_mask masks the batch; None when every row weighs 1,
        so such a step takes the plain path (train.py: bitwise the run without weights)."""
        w = np.ones(len(ids), np.float32) if self.weights is None else self.weights[step]
        w = np.where(self.masked(ids), np.float32(0), w)
        return None if (w == 1).all() else w

    def step(self, step: int, model=None, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B,), windows (B, T+1)) of the step, recorded."""
        ids = self.schedule.step_ids(step)
        pool = None
        if self.selector is not None:
            pool = self.selector.pool(step, ids)
            ids = self.selector.choose(model, pool, rank, world)
        wins = self.data.windows(ids)
        ins = tok = rep = None
        if self.inserter is not None:
            ins, tok, rep = self.inserter.apply(step, ids, wins)
        weighted = [] if self.weights is None else [(r, self.weights[step, r])
                                                    for r in np.flatnonzero(self.weights[step] != 1)]
        self.record.add(ids, pool, ins, tok, rep, step, np.flatnonzero(self.masked(ids)), weighted)
        return ids, wins


# -----------------------------------------------------------------------------
# building a run's stream from its config (train.py's TrainConfig, or a checkpoint's
# config dict as a SimpleNamespace: the batch viewer and attribution rebuild it)

class BatchMetrics:
    """Batch metric columns for every batch id, read once from batch_metrics.csv."""

    def __init__(self, tables_dir, data: BatchData):
        self.tables_dir, self.data, self.cols = tables_dir, data, {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.cols:
            self.cols[name] = batchmetrics.load_metric_column(self.tables_dir, name, self.data)
        return self.cols[name]

    @property
    def meta(self) -> dict:
        """batch_metrics.json (the scorer's fingerprint, what it was fitted on)."""
        p = Path(self.tables_dir) / "batch_metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}


# -----------------------------------------------------------------------------
# the holdout (data.write_holdout): which training batches a run leaves out

def holdout_mode(cfg, spec: dict) -> str:
    """exclude | keep | only. --holdout=auto (the default) excludes the holdout exactly when
    the run reads the reference fitted on it (selection.reads_reference: rho, a ref_*
    metric to steer, sort or filter by), so other runs keep every training batch and their
    ids; a config from before the holdout existed (no such key) trained on all: keep."""
    mode = getattr(cfg, "holdout", "keep")
    if mode != "auto":
        return mode
    score = SCORES.get(cfg.select) if cfg.select != "none" else None
    return "exclude" if reads_reference(score, cfg.select_metric, spec_metrics(validate_spec(spec))) else "keep"


def run_train_ids(cfg, data: BatchData, spec: dict) -> tuple[np.ndarray, dict]:
    """(the ids the run's schedule draws from, its holdout record for the checkpoints)."""
    mode, held = holdout_mode(cfg, spec), data.holdout_ids
    if mode in ("exclude", "only") and not len(held):
        raise UserError(f"--holdout={getattr(cfg, 'holdout', 'keep')}: this run reads the reference (or trains on "
                        f"the holdout) but {data.dir} has no holdout: re-run python tinystories.py pretokenize "
                        f"(it holds out --holdout=0.1 of the training stories and fits the reference scorer on them), "
                        "or pass --holdout=keep to train on every batch")
    ids = {"exclude": np.setdiff1d(data.train_ids, held), "only": held}.get(mode, data.train_ids)
    rec = {"mode": mode, "n_batches": int(len(held)), "sha256": data.holdout_meta.get("sha256", ""),
           "file": str(data.dir / "holdout.npy") if len(held) else "",
           "in_schedule": int(np.isin(ids, held).sum())}
    return ids, rec


def schedule_spec(cfg) -> tuple[dict, str]:
    """(spec, where it came from): --schedule_spec, else the flat flags."""
    try:
        if cfg.schedule_spec:
            spec, name = load_spec(cfg.schedule_spec), f"schedule spec {cfg.schedule_spec}"
        else:
            if "metric" in getattr(STRATEGIES.get(cfg.schedule), "keys", ()) and not cfg.schedule_metric:
                raise SpecError(f"--schedule={cfg.schedule} needs --schedule_metric=<a batch metric>")
            spec, name = spec_from_flags(cfg.schedule, cfg.schedule_metric, cfg.schedule_order,
                                         cfg.schedule_lo, cfg.schedule_hi), "--schedule"
    except SpecError as e:
        raise UserError(str(e)) from None
    if cfg.schedule_exclude:
        spec = {**spec, "exclude": cfg.schedule_exclude}
    return spec, name


def build_schedule(cfg, data: BatchData, bm: BatchMetrics | None = None) -> Schedule:
    """The run's schedule over its training ids (run_train_ids); .holdout is their record."""
    bm = bm or BatchMetrics(cfg.tables_dir, data)
    spec, name = schedule_spec(cfg)
    try:
        ids, holdout = run_train_ids(cfg, data, spec)
        if isinstance(spec.get("phases"), list):  # name an unknown metric before reading values
            for m in spec_metrics({"phases": [p for p in spec["phases"] if isinstance(p, dict) and "strategy" in p
                                              and isinstance(p.get("metric", ""), str)]}):
                bm(m)
        sched = Schedule(spec, ids, cfg.batch_size * cfg.gradient_accumulation_steps, cfg.seed,
                         cfg.max_iters, lambda m: bm(m)[ids], name=name,
                         given={"exclude": "--schedule_exclude"} if cfg.schedule_exclude else None)
    except SpecError as e:
        raise UserError(str(e)) from None
    sched.holdout, sched.run_ids = holdout, ids  # run_ids: before the spec's include
    return sched


def build_stream(cfg, data: BatchData, device: str = "cpu", ctx=None) -> Stream:
    """The run's stream: its schedule, selector and tag inserter."""
    bm = BatchMetrics(cfg.tables_dir, data)
    sched = build_schedule(cfg, data, bm)
    selector = inserter = None
    tags_json = ""
    if cfg.select != "none":
        selector = Selector(cfg.select, cfg.select_pool, sched.spec, data, sched.B, cfg.seed, cfg.max_iters, bm,
                            cfg.batch_size, device, ctx or autocast_ctx(device, "float32"), cfg.select_ref,
                            cfg.select_metric, cfg.select_target, train_ids=sched.run_ids)
        if selector.irreducible is not None and sched.holdout["mode"] == "exclude":
            selector.irreducible.check_held_out(f"--select={cfg.select}")
    if cfg.tags:
        enc = Tokenizer.for_vocab(cfg.vocab_size, cfg.data_dir)
        tagset = tagmod.load_tags(cfg.tags, enc, cfg.max_seq_len, cfg.vocab_size)
        tagset.check_run(sched.B, cfg.max_iters, f"tag file {cfg.tags}")
        inserter, tags_json = Inserter(tagset, data, cfg.data_dir, cfg.seed), tagset.json
    mask = None
    if getattr(cfg, "train_mask", ""):
        try:
            mask = load_ids(cfg.train_mask, "--train_mask")
        except SpecError as e:
            raise UserError(str(e)) from None
    weights = load_weights(cfg.train_weights, sched.B, cfg.max_iters) if getattr(cfg, "train_weights", "") else None
    return Stream(sched, data, selector, inserter, tags_json, mask, weights)


def load_weights(path, B: int, steps: int) -> np.ndarray:
    """--train_weights: (>= steps, B) finite real loss weights from a .npy file, as float32
    (the dtype the step's token losses are multiplied in); one line naming the file otherwise."""
    fix = (f"save a float array of shape ({steps}, {B}) with numpy.save: row s, column r is the loss weight of "
           f"batch_ids.npy[s, r] (1 = as trained, 0 = dropped)")
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--train_weights={path}: no such file; {fix}") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"--train_weights={path} cannot be read as a .npy array ({type(e).__name__}): {fix}") from None
    ok = isinstance(a, np.ndarray) and a.dtype.kind in "fiub" and a.ndim == 2
    if not ok or a.shape[1] != B or a.shape[0] < steps:
        got = f"a {a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise UserError(f"--train_weights={path} holds {got}, not a real array of {steps} steps x {B} rows: {fix}")
    with np.errstate(over="ignore"):  # a weight beyond float32 becomes inf: refused below
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        s, r = np.argwhere(~np.isfinite(a))[0]
        raise UserError(f"--train_weights={path}: the weight of step {s}, row {r} is {a[s, r]} (float32): every "
                        f"weight must be a finite real number; {fix}")
    return a


def stream_fingerprint(stream: Stream, legacy: bool = False) -> str:
    """The schedule's fingerprint, extended by the tags, the selection settings and the
    reference the irreducible loss comes from; legacy: as a checkpoint written before the
    holdout existed has it (no reference), so such a run resumes."""
    h = hashlib.sha256(stream.schedule.fingerprint().encode())
    h.update(stream.record.tags.encode())
    if stream.selector:
        h.update(f"{stream.selector.method}:{stream.selector.K}".encode())
        if stream.selector.irreducible is not None and not legacy:  # the reference's content, not its timing
            rec = stream.selector.irreducible.record
            h.update(json.dumps({k: rec.get(k) for k in ("kind", "scorer", "sha256")}, sort_keys=True).encode())
    if len(stream.mask):  # a run without a mask keeps the fingerprint it always had
        h.update(b"train_mask:" + stream.mask.tobytes())
    if stream.weights is not None:  # nor one without weights; a resume may not change them
        h.update(f"train_weights:{stream.weights.shape}:".encode() + stream.weights.tobytes())
    return h.hexdigest()[:16]


def stream_provenance(stream: Stream) -> dict:
    """What the checkpoints record beside the schedule: its holdout (mode, size, sha256,
    how many holdout batches the schedule draws from) and the irreducible loss's reference."""
    sel = stream.selector
    return {"holdout": getattr(stream.schedule, "holdout", {}),
            "reference": sel.irreducible.record if sel is not None and sel.irreducible is not None else {}}


def save_holdout_ids(out_dir, stream: Stream):
    """<out_dir>/holdout_ids.npy: the data's holdout batch ids as the run found them (the
    checkpoints record its mode, size and sha256), so the run says which batches were
    holdout even if the data is marked again later."""
    held = stream.data.holdout_ids
    if len(held) and not RunPaths(out_dir).holdout_ids.exists():
        with atomic_path(RunPaths(out_dir).holdout_ids) as tmp, open(tmp, "wb") as f:
            np.save(f, held, allow_pickle=False)


# -----------------------------------------------------------------------------
# a run's record, read back (batch_viewer.py, report.py)

def record_fix(out_dir) -> str:
    """The command that rewrites a run's numpy record from its checkpoints."""
    return f"rebuild it from the checkpoints: python -c \"import train; train.write_ids_file('{out_dir}')\""


def _record_file(path: Path, fix: str):
    """The array of a .npy record, or the {name: array} of a .npz one; else one line."""
    if path.is_symlink() or not path.is_file():
        what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not a plain file"
        raise UserError(f"{path} is {what}, not the run's record: remove it and {fix}")
    try:
        obj = np.load(path, allow_pickle=False)
        if hasattr(obj, "files"):  # an .npz: read every member now, inside the try
            with obj:
                return {k: obj[k] for k in obj.files}
        return obj
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it is damaged; {fix}") from None


def _int_array(path: Path, a, shape: tuple, fix: str) -> np.ndarray:
    """a as int64 when it is an integer array of `shape` (None: any length), else one line."""
    ok = isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.integer) and a.ndim == len(shape) and \
        all(w is None or w == n for w, n in zip(shape, a.shape))
    if not ok:
        got = f"a {a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        want = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ("," * (len(shape) == 1)) + ")"
        raise UserError(f"{path} holds {got}, not the integer array {want} train.py writes: {fix}")
    return a.astype(np.int64)


def read_batch_ids(out_dir, cfg, n_batches: int) -> np.ndarray:
    """<out_dir>/batch_ids.npy, checked: integers, (steps, B) with B the run's batch size x
    gradient accumulation, a row for every step its checkpoints have trained, and every id
    a batch of the index (n_batches)."""
    p, fix = RunPaths(out_dir).batch_ids, record_fix(out_dir)
    if not p.exists() and not p.is_symlink():
        raise UserError(f"{p} not found: {out_dir} is not a train.py run (or has no checkpoint yet)")
    B = int(cfg.batch_size) * int(getattr(cfg, "gradient_accumulation_steps", 1))
    ids = _int_array(p, _record_file(p, fix), (None, B), fix)
    found = list_checkpoints(out_dir)
    if found and len(ids) != found[-1][0]:  # a kill between the last checkpoint and this record: resume mends it
        raise UserError(f"{p} records {len(ids)} steps but {found[-1][1]} has trained {found[-1][0]}: it "
                        f"{'is stale' if len(ids) < found[-1][0] else 'disagrees with the checkpoints'}; resume "
                        f"the run (python train.py --init_from=resume --out_dir={out_dir}) or {fix}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_batches):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"{p} holds batch id {bad}, outside the {n_batches} batches of {cfg.data_dir}: it is damaged "
                        f"({fix}), or the run's data folder is not the one it trained on")
    return ids


def read_insertions(out_dir, ids: np.ndarray, T: int, V: int) -> dict | None:
    """<out_dir>/insertions.npz (tags), checked against the steps and rows of ids (steps, B),
    the window length T + 1 and the vocabulary V; None when the run has none."""
    p, fix = RunPaths(out_dir).insertions, record_fix(out_dir)
    if not p.exists() and not p.is_symlink():
        return None
    z = _record_file(p, fix)
    if not isinstance(z, dict) or not {"insertions", "insert_tokens", "replaced_tokens"} <= set(z):
        raise UserError(f"{p} lacks the arrays insertions, insert_tokens and replaced_tokens: {fix}")
    if "n_steps" in z and z["n_steps"].shape == () and int(z["n_steps"]) != len(ids):  # written with other ids
        raise UserError(f"{p} records the insertions of {int(z['n_steps'])} steps but batch_ids.npy has {len(ids)}: "
                        f"it disagrees with the checkpoints; resume the run (python train.py --init_from=resume "
                        f"--out_dir={out_dir}) or {fix}")
    ins = _int_array(p, z["insertions"], (None, 6), fix)
    toks = {k: _int_array(p, z[k], (None,), fix) for k in ("insert_tokens", "replaced_tokens")}
    why = _insertion_problem(ins, toks["insert_tokens"], toks["replaced_tokens"], ids.shape, T, V)
    if why:
        raise UserError(f"{p} records {why}: it is damaged; {fix}")
    return {"insertions": ins, **toks}


def _insertion_problem(ins: np.ndarray, put: np.ndarray, replaced: np.ndarray, shape: tuple, T: int, V: int) -> str:
    """What is impossible in an insertions record of a run with ids of `shape` (steps, B)."""
    step, row, pos, tag, n, mode = ins.T
    if ((step < 0) | (step >= shape[0])).any():
        return f"a step outside the {shape[0]} the run has trained"
    if ((row < 0) | (row >= shape[1])).any():
        return f"a row outside the {shape[1]} of a step"
    if (~np.isin(mode, (REPLACE, INSERT))).any():
        return "a mode other than 0 (replace) or 1 (insert)"
    if ((pos < 0) | (n < 0) | (pos + n > T + 1) | (tag < 0)).any():
        return f"tokens outside the {T + 1}-token window (or a negative tag)"
    if not len(put) == len(replaced) == n.sum():
        return f"{int(n.sum())} tokens in its rows but {len(put)} inserted and {len(replaced)} replaced"
    if any(((t < 0) | (t >= V)).any() for t in (put, replaced)):
        return f"a token outside the vocabulary of {V}"
    return ""


def read_masked_rows(out_dir, ids: np.ndarray) -> np.ndarray:
    """<out_dir>/masked_rows.npy ([step, row] trained with loss weight 0, --train_mask),
    checked against ids (steps, B); (0, 2) when the run masked nothing."""
    p, fix = RunPaths(out_dir).masked_rows, record_fix(out_dir)
    if not p.exists() and not p.is_symlink():
        return np.zeros((0, 2), np.int64)
    m = _int_array(p, _record_file(p, fix), (None, 2), fix)
    if (m < 0).any() or (m[:, 0] >= len(ids)).any() or (m[:, 1] >= ids.shape[1]).any():
        raise UserError(f"{p} records a [step, row] outside the {len(ids)} x {ids.shape[1]} batches trained: "
                        f"it is damaged; {fix}")
    return m


def recorded_batches(out_dir, cfg, data: BatchData) -> tuple[np.ndarray, dict | None, np.ndarray]:
    """(ids (steps, B), insertions record or None, masked rows (n, 2)) from the run's
    numpy files, each checked by its reader above (one line naming the file otherwise)."""
    ids = read_batch_ids(out_dir, cfg, len(data.index))
    return ids, read_insertions(out_dir, ids, int(cfg.max_seq_len), int(cfg.vocab_size)), \
        read_masked_rows(out_dir, ids)


MAX_STEP = 2 ** 40  # RunBatches.step: steps past the run are shown from the schedule, up to here


class RunBatches:
    """A run's recorded batches, read once (config, batch index, ids, insertions,
    tokenizer): what any step trained on, as ids, windows and text."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.cfg = types.SimpleNamespace(**run_config(out_dir))
        self.data = BatchData(self.cfg.data_dir, self.cfg.vocab_size, self.cfg.max_seq_len)
        # masked: [step, row] trained with loss weight 0 (--train_mask)
        self.ids, self.ins, self.masked = recorded_batches(out_dir, self.cfg, self.data)
        self._enc = None

    def step(self, step: int):
        """(ids, windows as trained (B, T+1), insertion rows of the step, source line)."""
        if step < 0:
            raise UserError(f"--step={step}: steps count from 0")
        if step >= MAX_STEP:  # the schedule's positions (step x rows) are int64: 10^20 overflowed in numpy
            raise UserError(f"--step={step}: at most {MAX_STEP - 1} (the run trained steps 0..{len(self.ids) - 1}; "
                            "a later step shows the ids its schedule would give)")
        if step < len(self.ids):
            rec = self.ins or {"insertions": np.zeros((0, 6), np.int64), "insert_tokens": np.zeros(0, np.int64)}
            wins = trained_windows(self.data, self.ids[step], step, rec)
            rows = rec["insertions"][rec["insertions"][:, 0] == step]
            return self.ids[step], wins, rows, \
                f"trained at step {step} (recorded in {RunPaths(self.out_dir).batch_ids})"
        sid = build_schedule(self.cfg, self.data).step_ids(step)
        return sid, self.data.windows(sid), np.zeros((0, 6), np.int64), (
            f"NOT TRAINED: the run has trained steps 0..{len(self.ids) - 1}; these are the ids its schedule gives "
            f"step {step} (without selection or tags, which depend on the model at that step)")

    def rows(self, step: int, chars: int = 0) -> tuple[list[dict], str]:
        """One dict per batch of the step (row, batch_id, shard, offset, stories, text cut
        to `chars` (0: all), tags: its insertions in words, masked: trained with loss
        weight 0), and the source line."""
        ids, wins, ins, source = self.step(step)
        masked = set(self.masked[self.masked[:, 0] == step, 1].tolist()) if step < len(self.ids) else set()
        if self._enc is None:
            self._enc = Tokenizer.for_vocab(self.cfg.vocab_size, self.cfg.data_dir)
        out = []
        for r, (i, text) in enumerate(zip(ids, window_texts(list(wins), self._enc))):
            rec = self.data.index[int(i)]
            tags = [f"tag {t[3]} {'replaced' if t[5] == 0 else 'inserted'} at token {t[2]} ({t[4]} tokens)"
                    for t in ins[ins[:, 1] == r]]
            out.append({"row": r, "batch_id": int(i), "shard": int(rec["shard"]), "offset": int(rec["offset"]),
                        "stories": f"{rec['story_first']}-{rec['story_last']}", "tags": tags, "masked": r in masked,
                        "text": text[:chars] if chars else text})
        return out, source
