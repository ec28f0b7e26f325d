"""
The training order as data: a Schedule maps every optimizer step to the global batch
ids it trains on, as a pure function of (strategy, seed, the training batch ids and,
for metric-based orders, their metric values). Replaying it after a resume, or at
another world size, gives the same ids.

Strategies:
  shuffle  every epoch a fresh permutation of the training batches (llama2.c-like)
  sorted   batches ordered by a metric (asc = curriculum, desc = anti-curriculum),
           the same order every epoch
  filter   only batches whose metric lies in [lo, hi], shuffled per epoch

Online selection or tag injection change which ids a step trains on; whatever the
strategy, train.py records the ids actually used in each checkpoint.

$ python -c "from schedule import Schedule; import numpy as np; print(Schedule(np.arange(10), 4).step_ids(3))"
"""

import hashlib
import math

import numpy as np

STRATEGIES = ("shuffle", "sorted", "filter")


class Schedule:
    def __init__(self, train_ids: np.ndarray, batches_per_step: int, strategy: str = "shuffle",
                 seed: int = 1337, metric: np.ndarray | None = None, metric_name: str = "",
                 order: str = "asc", lo: float = -np.inf, hi: float = np.inf):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown schedule strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        ids = np.asarray(train_ids, dtype=np.int64)
        self.strategy, self.seed, self.B = strategy, seed, batches_per_step
        self.desc = f"{strategy}(seed={seed}"
        if strategy != "shuffle":
            if metric is None or len(metric) != len(ids):
                raise ValueError(f"strategy {strategy} needs one metric value per training batch")
            metric = np.asarray(metric, dtype=np.float64)
            self.desc += f", metric={metric_name}"
        if strategy == "sorted":
            key = np.where(np.isnan(metric), np.inf, metric if order == "asc" else -metric)  # NaNs last
            ids = ids[np.argsort(key, kind="stable")]
            self.desc += f", order={order}"
        elif strategy == "filter":
            ids = ids[(metric >= lo) & (metric <= hi)]
            self.desc += f", lo={lo}, hi={hi}"
        self.desc += ")"
        if len(ids) == 0:
            raise ValueError(f"schedule {self.desc} has no training batches")
        self.ids = ids
        self._epoch, self._perm = -1, None

    @property
    def n(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Identifies the order: the same fingerprint means the same ids at every step."""
        h = hashlib.sha256(self.desc.encode())
        h.update(np.int64(self.B).tobytes())
        h.update(self.ids.tobytes())
        return h.hexdigest()[:16]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.strategy == "sorted":
            return self.ids
        if epoch != self._epoch:  # one permutation per epoch, seeded by (seed, epoch)
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.ids[rng.permutation(self.n)]
        return self._perm

    def step_ids(self, step: int) -> np.ndarray:
        """The batches_per_step global ids of optimizer step `step` (0-based)."""
        pos = np.arange(step * self.B, (step + 1) * self.B, dtype=np.int64)
        out = np.empty(self.B, dtype=np.int64)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            out[sel] = self._epoch_order(int(e))[pos[sel] % self.n]
        return out


def rank_micro_batches(step_ids: np.ndarray, rank: int, world_size: int, micro_steps: int) -> np.ndarray:
    """This rank's ids of a step, shaped (micro_steps, batch_size): ranks take disjoint,
    contiguous slices, so the union over ranks is the step's ids at any world size."""
    return step_ids.reshape(world_size, micro_steps, -1)[rank]


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
