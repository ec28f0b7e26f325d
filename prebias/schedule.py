"""
The training order as data: a Schedule maps every optimizer step to the global batch
ids it trains on, as a pure function of (spec, seed, the training batch ids, the
metric values the spec names, the run length). Replaying it after a resume, or at any
world size, gives the same ids. Also the learning-rate schedule (get_lr).

A spec is a list of phases; each lasts `steps` optimizer steps or a `fraction` of the
run (a phase with neither lasts until the end; only the last may), and has one strategy:

  shuffle     every epoch a fresh permutation of the batches (llama2.c-like)
  sorted      ordered by `metric` (order asc = curriculum, desc = anti-curriculum),
              the same order every epoch
  filter      only batches with lo <= metric <= hi (null = unbounded), shuffled per epoch
  competence  a paced curriculum (Platanios et al. 2019; Hacohen & Weinshall 2019): at
              step t, B batches drawn uniformly (without replacement within the step) from
              the easiest c(t) fraction by `metric`; c(t) rises from c0 to 1 by `ramp`
              (a fraction of the phase) with pacing linear | root | step | exp
  mixture     batches drawn from metric bins (`quantiles` or explicit `bounds` edges) in
              proportions `weights` (or `weights_start` -> `weights_end`, interpolated
              over the phase); each step's B rows are apportioned by largest remainder
  interleave  two sub-orders (`orders`, each a strategy as above) alternated by step in
              `ratio` [a, b]: a steps of the first, then b of the second, repeating
  replay      an explicit order: `ids`, a .npy (steps, B) whose row s is step s (its
              content hash `ids_sha256` is recorded and fingerprinted)

Repeats: shuffle, filter and each mixture bin never repeat a batch within an epoch (of
their own set: a small bin starts its next epoch sooner); sorted repeats its order every
epoch; competence samples afresh every step, so a batch may come back before the others
have been seen (that is the method). Each phase starts its own stream at its first step.

Top-level keys beside "phases": "exclude" (a .npy of batch ids never to train on; the
rest keep their order: the excluded ids are dropped from each phase's stream and the
stream closes up, as a leave-out retraining needs) and "include" (a .npy: train only on
these ids, e.g. written by select_batches.py).

$ python -c "from prebias.schedule import *; import numpy as np; s = Schedule({'phases': [{'strategy': 'shuffle'}]}, np.arange(10), 4, seed=1, max_iters=5); print(s.step_ids(3))"
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from prebias.common import SEED, Registry, json_loads

PACINGS = ("linear", "root", "step", "exp")
STRATEGIES = Registry("schedule strategy")  # name -> Strategy subclass (register below)


class SpecError(ValueError):
    """A schedule spec that cannot be used; the message names the field."""


def flat_strategies():
    """The strategies the flat --schedule flag can name (the rest need a spec file)."""
    return STRATEGIES.choices(lambda cls: cls.flat)


# -----------------------------------------------------------------------------
# the spec: validated and normalised up front

def spec_from_flags(strategy="shuffle", metric="", order="asc", lo=-math.inf, hi=math.inf) -> dict:
    """The flat --schedule=... flags as a one-phase spec."""
    cls = STRATEGIES.get(strategy)
    if cls is None or not cls.flat:
        raise SpecError(f"--schedule={strategy} needs a spec file: use --schedule_spec=plan.json")
    return {"phases": [{"strategy": strategy, **cls.from_flags(metric, order, lo, hi)}]}


def load_spec(path) -> dict:
    """The spec file as it is (the Schedule normalises it), checked here, where it is
    read, so that every error names the file and the field and says where the fix goes."""
    try:
        spec = json_loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"schedule spec {path}: cannot read it ({type(e).__name__}: {e}); it must be a JSON "
                        "object {\"phases\": [...]} (config/schedules/ has examples)") from None
    try:
        validate_spec(spec, name=f"schedule spec {path}")
    except SpecError as e:
        raise SpecError(f"{e}; fix it in {path} (config/schedules/ has a working spec of each strategy)") from None
    return spec


def _num(v, where, lo=-math.inf, hi=math.inf, integer=False, open_lo=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if open_lo else v >= lo) and v <= hi and (not integer or float(v).is_integer())
    if not ok:
        rng = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise SpecError(f"{where}: {v!r} must be {'an integer' if integer else 'a number'} in {rng}")
    return int(v) if integer else float(v)


def _weights(w, n, where):
    if not isinstance(w, list) or len(w) != n:
        raise SpecError(f"{where}: needs {n} weights, one per bin")
    w = [_num(x, f"{where}[{i}]", 0) for i, x in enumerate(w)]
    if sum(w) <= 0:
        raise SpecError(f"{where}: weights sum to 0")
    return [x / sum(w) for x in w]


def _order(p: dict, where: str, metrics: set | None, nested=False) -> dict:
    """One strategy's fields, checked and with defaults filled in: the keys every
    strategy shares (metric, order) here, its own in its class's check()."""
    if not isinstance(p, dict):
        raise SpecError(f"{where}: must be an object")
    s = p.get("strategy")
    allowed = [n for n, c in STRATEGIES.items() if c.nestable or not nested]
    if s not in allowed:
        raise SpecError(f"{where}.strategy: {s!r} is not one of {', '.join(allowed)}")
    cls = STRATEGIES[s]
    extra = set(p) - set(cls.keys) - {"strategy"} - (set() if nested else {"steps", "fraction"})
    if extra:
        raise SpecError(f"{where}: unknown key {sorted(extra)[0]!r} for strategy {s} "
                        f"(valid: {', '.join(sorted(cls.keys)) or 'none'})")
    out = {"strategy": s}
    if "metric" in cls.keys:
        m = p.get("metric")
        if not isinstance(m, str) or not m:
            raise SpecError(f"{where}.metric: strategy {s} needs a batch metric name")
        if metrics is not None and m not in metrics:
            raise SpecError(f"{where}.metric: unknown batch metric {m!r}; valid: {', '.join(sorted(metrics))}")
        out["metric"] = m
    if "order" in cls.keys:
        out["order"] = p.get("order", "asc")
        if out["order"] not in ("asc", "desc"):
            raise SpecError(f"{where}.order: {out['order']!r} is not asc or desc")
    out.update(cls.check(p, where, metrics))
    return out


def validate_spec(spec, metrics: set | None = None, name="schedule spec") -> dict:
    """The spec with defaults filled in, or a SpecError naming the field. `metrics`: the
    batch metric names that exist (None: not checked)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("phases"), list) or not spec["phases"]:
        raise SpecError(f"{name}: needs a non-empty list 'phases'")
    extra = set(spec) - {"phases", "exclude", "include"}
    if extra:
        raise SpecError(f"{name}: unknown key {sorted(extra)[0]!r} (valid: phases, exclude, include)")
    out = {"phases": []}
    n = len(spec["phases"])
    for i, p in enumerate(spec["phases"]):
        where = f"{name}: phases[{i}]"
        q = _order(p, where, metrics)
        if "steps" in p and "fraction" in p:
            raise SpecError(f"{where}: give steps or fraction, not both")
        if "steps" in p:
            q["steps"] = _num(p["steps"], f"{where}.steps", 1, 1e12, integer=True)
        elif "fraction" in p:
            q["fraction"] = _num(p["fraction"], f"{where}.fraction", 0, 1, open_lo=True)
        elif i < n - 1:
            raise SpecError(f"{where}: only the last phase may omit steps/fraction")
        out["phases"].append(q)
    total = sum(q.get("fraction", 0) for q in out["phases"])
    if total > 1 + 1e-9:  # the phases past the run's end would never train, without a word
        last = max(i for i, q in enumerate(out["phases"]) if "fraction" in q)
        raise SpecError(f"{name}: phases[{last}].fraction: the phases' fractions sum to {total:g}, more than the "
                        "whole run (1): later phases would never run; make them sum to at most 1")
    for key in ("exclude", "include"):
        if spec.get(key):
            if not isinstance(spec[key], str):
                raise SpecError(f"{name}.{key}: must be the path of a .npy of batch ids")
            out[key] = spec[key]
    return out


def spec_metrics(spec: dict) -> list[str]:
    """The batch metrics a (validated) spec reads."""
    found = []
    for p in spec["phases"]:
        for o in p.get("orders", [p]):
            if "metric" in o and o["metric"] not in found:
                found.append(o["metric"])
    return found


def load_ids(path, where: str, ndim: int = 1) -> np.ndarray:
    """A .npy of batch ids: 1-D (a list) or 2-D (steps, batches per step: a replay)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: cannot read {path} ({type(e).__name__}); it must be a .npy of batch ids") from None
    if ids.ndim != ndim or not np.issubdtype(ids.dtype, np.integer):
        raise SpecError(f"{where}: {path} must hold a " + ("1-D integer array of batch ids" if ndim == 1 else
                                                            "2-D integer array (steps, batches per step)"))
    return ids.astype(np.int64)


def _not_training(listed: np.ndarray, train_ids: np.ndarray) -> str:
    """What the ids of a list that holds no training batch are, and the fix (one clause)."""
    top = int(train_ids.max())
    past, neg = listed[listed > top], listed[listed < 0]
    other = listed[(listed >= 0) & (listed <= top)]
    parts = [f"{len(a)} {what} (e.g. {int(a[0])})" for a, what in
             ((past, "past the last training batch"), (neg, "negative"),
              (other, "of validation or held-out batches, or left out by an include")) if len(a)]
    return (f"the training batches are {len(train_ids)} ids in {int(train_ids.min())}..{top}, and its ids are "
            f"{', '.join(parts)}; list training batch ids (a run's batch_ids.npy holds the ones it trained on)")


def _note_outside(listed: np.ndarray, train_ids: np.ndarray, where: str):
    """A warning line when some listed ids are not training batches (they are ignored)."""
    n_out = int((~np.isin(listed, train_ids)).sum())
    if n_out:
        print(f"warning: {where}: {n_out} of its {len(listed)} ids are not training batches (validation ids, or "
              "not batches of this data): ignored", file=sys.stderr)


# -----------------------------------------------------------------------------
# orders: each gives the n ids of its local step s, a pure function of s

def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class _Epochs:
    """Position p of an endless stream that runs through `ids` once per epoch, either in
    a fixed order or in a fresh seeded permutation each epoch."""

    def __init__(self, ids: np.ndarray, key: tuple, shuffle: bool):
        if len(ids) == 0:
            raise SpecError("a phase has no batches to train on (empty filter or bin)")
        self.ids, self.key, self.shuffle = ids, key, shuffle
        self._epoch, self._perm = -1, ids

    def at(self, pos: np.ndarray) -> np.ndarray:
        n, out = len(self.ids), np.empty(len(pos), dtype=np.int64)
        for e in np.unique(pos // n):
            sel = pos // n == e
            out[sel] = self._order(int(e))[pos[sel] % n]
        return out

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.ids
        if epoch != self._epoch:  # one permutation per epoch, seeded by (seed, phase..., epoch)
            self._epoch, self._perm = epoch, self.ids[_rng(*self.key, epoch).permutation(len(self.ids))]
        return self._perm


def _by_metric(ids, values, order):
    key = np.where(np.isnan(values), np.inf, values if order == "asc" else -values)  # NaNs last
    return ids[np.argsort(key, kind="stable")]


def pacing(kind: str, c0: float, x: np.ndarray, n_stages: int = 5) -> np.ndarray:
    """Competence c in [c0, 1] at progress x = t / ramp_steps (clipped to [0, 1])."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    if kind == "linear":
        c = c0 + (1 - c0) * x
    elif kind == "root":  # Platanios et al.'s root-2 competence
        c = np.sqrt(c0 ** 2 + (1 - c0 ** 2) * x)
    elif kind == "step":  # n_stages equal jumps
        c = c0 + (1 - c0) * np.floor(x * n_stages) / n_stages
    else:  # exp: c0 doubles each of ceil(log2(1/c0)) equal stages (Hacohen & Weinshall)
        stages = max(1, math.ceil(math.log2(1 / c0)))
        c = c0 * 2.0 ** np.floor(x * stages)
    return np.minimum(c, 1.0)


class Strategy:
    """One way to order the batches of a phase, registered by name in STRATEGIES.

    A subclass declares `keys` (its spec keys besides strategy/steps/fraction; "metric"
    and "order" are checked for every strategy that lists them), whether the flat
    --schedule flag can name it (`flat`, with from_flags), whether interleave may nest it
    (`nestable`) and whether its ids depend on the phase's length (`length_matters`,
    which the resume fingerprint needs). check() normalises its own keys; an instance
    gives the n ids of local step s, as a pure function of s, in ids()."""
    keys: tuple = ()
    flat = False
    nestable = True
    length_matters = False

    @classmethod
    def check(cls, p: dict, where: str, metrics: set | None) -> dict:
        return {}

    @classmethod
    def from_flags(cls, metric: str, order: str, lo: float, hi: float) -> dict:
        return {}

    @classmethod
    def depends_on_length(cls, p: dict) -> bool:
        return cls.length_matters

    def __init__(self, p: dict, ids: np.ndarray, metric_of, key: tuple, n: int, length: int):
        self.p, self.n, self.length, self.key = p, n, length, key  # n rows per step, phase length
        self.setup(ids, metric_of(p["metric"]) if "metric" in p else None, metric_of)

    def setup(self, ids: np.ndarray, vals: np.ndarray | None, metric_of):
        raise NotImplementedError

    def ids(self, s: int) -> np.ndarray:
        raise NotImplementedError


def build_order(p: dict, ids: np.ndarray, metric_of, key: tuple, n: int, length: int) -> Strategy:
    return STRATEGIES[p["strategy"]](p, ids, metric_of, key, n, length)


class _EpochStrategy(Strategy):
    """A strategy that runs through a fixed set of ids once per epoch (self.stream)."""

    def ids(self, s: int) -> np.ndarray:
        return self.stream.at(np.arange(s * self.n, (s + 1) * self.n, dtype=np.int64))


@STRATEGIES.register("shuffle")
class Shuffle(_EpochStrategy):
    """every epoch a fresh permutation of the batches (llama2.c-like)"""
    flat = True

    def setup(self, ids, vals, metric_of):
        self.stream = _Epochs(ids, self.key, shuffle=True)


@STRATEGIES.register("sorted")
class Sorted(_EpochStrategy):
    """ordered by `metric` (asc = curriculum, desc = anti-curriculum), the same order every epoch"""
    keys, flat = ("metric", "order"), True

    @classmethod
    def from_flags(cls, metric, order, lo, hi):
        return {"metric": metric, "order": order}

    def setup(self, ids, vals, metric_of):
        self.stream = _Epochs(_by_metric(ids, vals, self.p["order"]), self.key, shuffle=False)


@STRATEGIES.register("filter")
class Filter(_EpochStrategy):
    """only batches with lo <= metric <= hi (null = unbounded), shuffled per epoch"""
    keys, flat = ("metric", "lo", "hi"), True

    @classmethod
    def check(cls, p, where, metrics):
        lo, hi = p.get("lo"), p.get("hi")
        out = {"lo": None if lo is None else _num(lo, f"{where}.lo"),
               "hi": None if hi is None else _num(hi, f"{where}.hi")}
        if lo is None and hi is None:
            raise SpecError(f"{where}: filter needs lo or hi")
        if None not in (lo, hi) and out["lo"] > out["hi"]:
            raise SpecError(f"{where}: lo {lo} > hi {hi}")
        return out

    @classmethod
    def from_flags(cls, metric, order, lo, hi):
        return {"metric": metric, "lo": None if lo == -math.inf else lo, "hi": None if hi == math.inf else hi}

    def setup(self, ids, vals, metric_of):
        lo = -np.inf if self.p["lo"] is None else self.p["lo"]
        hi = np.inf if self.p["hi"] is None else self.p["hi"]
        self.stream = _Epochs(ids[(vals >= lo) & (vals <= hi)], self.key, shuffle=True)


@STRATEGIES.register("competence")
class Competence(Strategy):
    """a paced curriculum (Platanios et al. 2019; Hacohen & Weinshall 2019): B batches per
    step drawn uniformly from the easiest c(t) of them by `metric`"""
    keys, length_matters = ("metric", "order", "pacing", "c0", "ramp", "n_stages"), True

    @classmethod
    def check(cls, p, where, metrics):
        pace = p.get("pacing", "root")
        if pace not in PACINGS:
            raise SpecError(f"{where}.pacing: {pace!r} is not one of {', '.join(PACINGS)}")
        return {"pacing": pace, "c0": _num(p.get("c0", 0.1), f"{where}.c0", 0, 1, open_lo=True),
                "ramp": _num(p.get("ramp", 1.0), f"{where}.ramp", 0, 1, open_lo=True),
                "n_stages": _num(p.get("n_stages", 5), f"{where}.n_stages", 1, 10_000, integer=True)}

    def setup(self, ids, vals, metric_of):
        self.ranked = _by_metric(ids, vals, self.p["order"])

    def ids(self, s):
        p, n = self.p, self.n
        ramp_steps = max(1.0, p["ramp"] * self.length)
        c = float(pacing(p["pacing"], p["c0"], s / ramp_steps, p["n_stages"]))
        m = min(len(self.ranked), max(n, math.ceil(c * len(self.ranked) - 1e-9)))
        pick = _rng(*self.key, s).choice(m, n, replace=m < n)
        return self.ranked[pick]


@STRATEGIES.register("mixture")
class Mixture(Strategy):
    """rows apportioned to metric bins (`quantiles` or `bounds` edges) by `weights`, or
    `weights_start` -> `weights_end` across the phase (largest remainder per step)"""
    keys = ("metric", "quantiles", "bounds", "weights", "weights_start", "weights_end")
    length_matters = True

    @classmethod
    def check(cls, p, where, metrics):
        if ("quantiles" in p) == ("bounds" in p):
            raise SpecError(f"{where}: mixture needs exactly one of quantiles or bounds")
        key = "quantiles" if "quantiles" in p else "bounds"
        e = p[key]
        if not isinstance(e, list) or len(e) < 3:
            raise SpecError(f"{where}.{key}: needs at least 3 edges (2 bins)")
        e = [_num(x, f"{where}.{key}[{i}]", *((0, 1) if key == "quantiles" else ())) for i, x in enumerate(e)]
        if any(b <= a for a, b in zip(e, e[1:])):
            raise SpecError(f"{where}.{key}: edges must increase")
        out, nb = {key: e}, len(e) - 1
        if "weights" in p:
            if "weights_start" in p or "weights_end" in p:
                raise SpecError(f"{where}: give weights, or weights_start and weights_end, not both")
            out["weights_start"] = out["weights_end"] = _weights(p["weights"], nb, f"{where}.weights")
        elif "weights_start" in p and "weights_end" in p:
            out["weights_start"] = _weights(p["weights_start"], nb, f"{where}.weights_start")
            out["weights_end"] = _weights(p["weights_end"], nb, f"{where}.weights_end")
        else:
            raise SpecError(f"{where}: mixture needs weights (or weights_start and weights_end)")
        return out

    def setup(self, ids, vals, metric_of):
        p = self.p
        ok = ~np.isnan(vals)
        edges = (np.quantile(vals[ok], p["quantiles"]) if "quantiles" in p else np.asarray(p["bounds"], float))
        bins = np.searchsorted(edges, vals, side="right") - 1
        bins[vals == edges[-1]] = len(edges) - 2  # the top edge is inside the last bin
        nb = len(edges) - 1
        self.bins = []
        ws, we = np.asarray(p["weights_start"]), np.asarray(p["weights_end"])
        for b in range(nb):
            members = ids[ok & (bins == b)]
            if len(members) == 0 and max(ws[b], we[b]) > 0:
                raise SpecError(f"mixture bin {b} [{edges[b]:.4g}, {edges[b + 1]:.4g}] of metric "
                                f"{p['metric']} holds no batches")
            self.bins.append(_Epochs(members, self.key + (b,), shuffle=True) if len(members) else None)
        # rows per bin at every step of the phase, and where each bin's stream stands
        t = np.arange(max(self.length, 1))[:, None] / max(self.length - 1, 1)
        w = ws[None, :] + (we - ws)[None, :] * t  # (steps, bins)
        self.counts = apportion(w, self.n)
        self.starts = np.vstack([np.zeros((1, nb), np.int64), np.cumsum(self.counts, 0)])

    def ids(self, s):
        row = min(s, len(self.counts) - 1)  # steps past the phase's length keep the last weights
        cnt = self.counts[row]
        start = self.starts[row] + (s - row) * cnt
        parts = [self.bins[b].at(np.arange(start[b], start[b] + cnt[b], dtype=np.int64))
                 for b in range(len(cnt)) if cnt[b]]
        return np.concatenate(parts)


@STRATEGIES.register("interleave")
class Interleave(Strategy):
    """two sub-orders (`orders`, each a strategy above) alternated by step in `ratio` [a, b]"""
    keys, nestable = ("orders", "ratio"), False

    @classmethod
    def check(cls, p, where, metrics):
        orders = p.get("orders")
        if not isinstance(orders, list) or len(orders) != 2:
            raise SpecError(f"{where}.orders: interleave needs a list of 2 sub-orders")
        out = {"orders": [_order(o, f"{where}.orders[{i}]", metrics, nested=True) for i, o in enumerate(orders)]}
        r = p.get("ratio", [1, 1])
        if not isinstance(r, list) or len(r) != 2:
            raise SpecError(f"{where}.ratio: needs [a, b]")
        out["ratio"] = [_num(x, f"{where}.ratio[{i}]", 1, 1e6, integer=True) for i, x in enumerate(r)]
        return out

    @classmethod
    def depends_on_length(cls, p):
        return any(STRATEGIES[o["strategy"]].depends_on_length(o) for o in p["orders"])

    def setup(self, ids, vals, metric_of):
        a, b = self.p["ratio"]
        la = (self.length // (a + b)) * a + min(self.length % (a + b), a)
        self.subs = [build_order(o, ids, metric_of, self.key + (q,), self.n, ln)
                     for q, (o, ln) in enumerate(zip(self.p["orders"], (la, self.length - la)))]

    def ids(self, s):
        a, b = self.p["ratio"]
        cyc, k = divmod(s, a + b)
        return self.subs[0].ids(cyc * a + k) if k < a else self.subs[1].ids(cyc * b + k - a)


@STRATEGIES.register("replay")
class Replay(Strategy):
    """an explicit order: row s of `ids` (a .npy of shape (steps, B)) is the phase's step s
    (attribute.py's reorder retrains); `ids_sha256` pins its content (filled in when absent,
    so the record and the resume fingerprint hold what was trained, not only a path)"""
    keys, nestable = ("ids", "ids_sha256"), False

    @classmethod
    def check(cls, p, where, metrics):
        path = p.get("ids")
        if not isinstance(path, str) or not path:
            raise SpecError(f"{where}.ids: replay needs the path of a .npy of batch ids (steps, B)")
        arr = load_ids(path, f"{where}.ids", ndim=2)
        sha = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
        if p.get("ids_sha256", sha) != sha:
            raise SpecError(f"{where}.ids_sha256: {path} now holds other ids ({sha}, not {p['ids_sha256']}): "
                            "it changed since the spec was written")
        return {"ids": path, "ids_sha256": sha}

    def setup(self, ids, vals, metric_of):
        self.rows = load_ids(self.p["ids"], "replay ids", ndim=2)
        if self.rows.shape[1] != self.n:
            raise SpecError(f"replay: {self.p['ids']} has {self.rows.shape[1]} ids per step; the run trains {self.n}")
        if len(self.rows) < self.length:
            raise SpecError(f"replay: {self.p['ids']} has {len(self.rows)} steps; the phase lasts {self.length}")
        if not np.isin(self.rows, ids).all():
            raise SpecError(f"replay: {self.p['ids']} holds ids that are not training batches")

    def ids(self, s):
        if s >= len(self.rows):
            raise SpecError(f"replay: {self.p['ids']} has {len(self.rows)} steps; step {s} was asked")
        return self.rows[s].copy()


def apportion(w: np.ndarray, n: int) -> np.ndarray:
    """Integer rows per bin (each row of w sums to 1) summing to n: largest remainder,
    ties to the lower bin."""
    exact = w * n
    base = np.floor(exact + 1e-9).astype(np.int64)
    rem = exact - base
    short = n - base.sum(1)
    order = np.argsort(-rem, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.shape[1])[None, :].repeat(len(w), 0), axis=1)
    return base + (rank < short[:, None])


class _Excluding:
    """An order's stream with some ids dropped and the gaps closed up, so the rest keep
    their relative order (a leave-out retraining)."""

    def __init__(self, order: Strategy, mask: np.ndarray):
        self.order, self.mask, self.n = order, mask, order.n
        self.buf, self.next = np.zeros(0, np.int64), 0

    def ids(self, s: int) -> np.ndarray:
        need = (s + 1) * self.n
        while len(self.buf) < need:
            chunk = self.order.ids(self.next)
            self.next += 1
            if self.next > 1000 + 1000 * (s + 1):
                raise SpecError("the exclusion removes every batch the schedule would train on")
            self.buf = np.concatenate([self.buf, chunk[~self.mask[chunk]]])
        return self.buf[s * self.n: need]


# -----------------------------------------------------------------------------

class Schedule:
    """step -> the batches_per_step global ids of that optimizer step."""

    def __init__(self, spec: dict, train_ids: np.ndarray, batches_per_step: int, seed: int = SEED,
                 max_iters: int = 1, metric_of=None, name: str = "schedule spec", given: dict | None = None):
        """metric_of(name) -> one value per entry of train_ids (only called for the
        metrics the spec names); given: how include/exclude came, if not from the spec
        (e.g. {"exclude": "--schedule_exclude"}), for the messages. Raises SpecError for
        a spec that cannot be used."""
        self.spec = validate_spec(spec, name=name)
        where = {k: f"{(given or {}).get(k) or f'{name}: {k}'}={self.spec[k]}" for k in ("include", "exclude")
                 if k in self.spec}  # the flag or field, and the file
        self.seed, self.B, self.max_iters = int(seed), int(batches_per_step), int(max_iters)
        ids = np.asarray(train_ids, dtype=np.int64)
        values = {m: np.asarray(metric_of(m), dtype=np.float64) for m in spec_metrics(self.spec)}
        for m, v in values.items():
            if len(v) != len(ids):
                raise SpecError(f"{name}: metric {m} has {len(v)} values for {len(ids)} training batches")
        self.extra = {}  # include/exclude ids, part of the fingerprint
        if "include" in self.spec:
            inc = load_ids(self.spec["include"], where["include"])
            keep = np.isin(ids, inc)
            if not keep.any():
                raise SpecError(f"{where['include']}: none of its {len(inc)} ids is a training batch, so nothing would be "
                                f"trained on: {_not_training(inc, ids)}")
            _note_outside(inc, ids, where["include"])
            ids, values = ids[keep], {m: v[keep] for m, v in values.items()}
            self.extra["include"] = inc
        lookup = dict(values)
        self.ids = ids
        self.bounds = self._phase_bounds()
        self.orders = []
        mask = None
        if "exclude" in self.spec:
            exc = load_ids(self.spec["exclude"], where["exclude"])
            self.extra["exclude"] = exc
            inside = exc[np.isin(exc, ids)]  # only training ids count (an id of 10^12 allocates nothing)
            if not len(inside):
                raise SpecError(f"{where['exclude']}: none of its {len(exc)} ids is a training batch, so it would "
                                f"exclude nothing: {_not_training(exc, ids)}")
            if len(np.setdiff1d(ids, inside)) == 0:
                raise SpecError(f"{where['exclude']}: it removes every training batch (all {len(ids)}), so nothing is "
                                "left to train on: leave some out of it (select_batches.py --keep=<fraction> writes a spec "
                                "that keeps a part)")
            _note_outside(exc, ids, where["exclude"])
            mask = np.zeros(int(ids.max()) + 1, dtype=bool)
            mask[inside] = True
        for i, (p, (a, b)) in enumerate(zip(self.spec["phases"], self.bounds)):
            try:
                o = build_order(p, ids, lookup.__getitem__, (self.seed, i), self.B, b - a)
            except SpecError as e:
                raise SpecError(f"{name}: phases[{i}]: {e}") from None
            self.orders.append(_Excluding(o, mask) if mask is not None else o)
            if mask is not None:  # a phase left with nothing to train on is an error now, not at its first step
                try:
                    self.orders[-1].ids(0)
                except SpecError as e:
                    raise SpecError(f"{name}: phases[{i}]: {e}") from None
        self._values_sha = {m: hashlib.sha256(v.tobytes()).hexdigest()[:16] for m, v in values.items()}

    def _phase_bounds(self) -> list[tuple[int, int]]:
        """[start, end) steps of each phase; the last phase runs on past max_iters."""
        out, t = [], 0
        for i, p in enumerate(self.spec["phases"]):
            last = i == len(self.spec["phases"]) - 1
            if "steps" in p:
                ln = p["steps"]
            elif "fraction" in p:
                ln = max(1, round(p["fraction"] * self.max_iters))
            else:
                ln = max(1, self.max_iters - t)
            out.append((t, t + ln if not last else max(t + ln, self.max_iters)))
            t += ln
        return out

    @property
    def n(self) -> int:
        """The number of training batches the schedule draws from."""
        return len(self.ids)

    @property
    def desc(self) -> str:
        parts = []
        for p, (a, b) in zip(self.spec["phases"], self.bounds):
            args = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("strategy", "steps", "fraction", "orders"))
            sub = " | ".join(o["strategy"] for o in p.get("orders", []))
            parts.append(f"{p['strategy']}({args}{', ' if args and sub else ''}{sub}) steps {a}-{b}")
        return f"seed {self.seed}: " + "; ".join(parts) + (" [+exclude]" if "exclude" in self.extra else "")

    def phase_of(self, step: int) -> int:
        for i, (a, b) in enumerate(self.bounds):
            if step < b:
                return i
        return len(self.bounds) - 1

    def step_ids(self, step: int) -> np.ndarray:
        """The batches_per_step global ids of optimizer step `step` (0-based)."""
        i = self.phase_of(step)
        return self.orders[i].ids(step - self.bounds[i][0])

    def record(self) -> dict:
        """Everything the order depends on, as structured plain data (checkpointed). The
        last phase's end counts only where its order depends on its length (competence,
        mixture), so a resume that extends a shuffled run keeps its fingerprint."""
        bounds = [list(b) for b in self.bounds]
        last = self.spec["phases"][-1]
        if not STRATEGIES[last["strategy"]].depends_on_length(last):
            bounds[-1][1] = None
        return {"spec": self.spec, "seed": self.seed, "batches_per_step": self.B, "bounds": bounds,
                "n_train": len(self.ids), "ids_sha256": hashlib.sha256(self.ids.tobytes()).hexdigest()[:16],
                "metrics_sha256": self._values_sha,
                "lists_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest()[:16] for k, v in self.extra.items()}}

    def fingerprint(self) -> str:
        """The same fingerprint means the same ids at every step. Built from the
        structured record, never from a display string."""
        rec = self.record()
        rec["spec"] = {k: v for k, v in rec["spec"].items() if k not in ("exclude", "include")}  # paths: content counts
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def rank_micro_batches(step_rows: np.ndarray, rank: int, world_size: int, micro_steps: int) -> np.ndarray:
    """This rank's rows of a step (its ids (B,) or windows (B, T+1)), shaped (micro_steps,
    batch_size, ...): ranks take disjoint, contiguous slices, so the union over ranks is
    the step at any world size."""
    return step_rows.reshape(world_size, micro_steps, -1, *step_rows.shape[1:])[rank]


def get_lr(it: int, cfg) -> float:
    """The learning rate of step `it`, as llama2.c's: 1) linear warmup, 2) cosine decay
    to min_lr, 3) min_lr after max_iters. `cfg` has TrainConfig's fields."""
    min_lr = cfg.min_lr or cfg.learning_rate / 10
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)
