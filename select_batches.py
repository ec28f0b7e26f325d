"""
Offline batch selection (data pruning): rank every training batch by a score, keep a
fraction, and write a schedule spec that trains only on the kept batches, with the
ranking table beside it.

$ python select_batches.py --by=ref_nll --keep=0.8 --easiest       # reference-scorer loss (fitted on the holdout)
$ python select_batches.py --by=el2n --keep=0.5 --out_dir=out/short  # EL2N from an early checkpoint
$ python select_batches.py --by=rho --keep=0.8 --out_dir=out/short   # RHO-LOSS offline
$ python select_batches.py --by=fk_grade --keep=0.3 --easiest        # any batch metric
$ python select_batches.py --by=magic --keep=0.8 --out_dir=out/proxy  # metagradient of val loss (offline only)
$ python train.py --schedule_spec=out/tables/select/ref_nll_hardest_0.5_spec.json --out_dir=out/pruned

--by is a registered selection score (prebias/selection.py, the same functions online
selection uses: uniform, loss, rho, el2n, metric) or any numeric column of
batch_metrics.csv (ref_nll: the batch's loss under the reference scorer). Scores that
read a model take it from an early checkpoint of a short run (--out_dir, --ckpt_iter;
default: the first checkpoint at or after 10% of that run's max_iters); rho's
irreducible loss is ref_nll or --select_ref's model; metric steers toward
--select_target of --select_metric; uniform keeps a seeded random subset. magic reads
the whole recorded run --out_dir (a short proxy run, --dropout=0, float32): one exact
reverse pass of its validation loss (the first --n_val validation windows) gives the
adjoint lambda_t of each step's gradient, and a batch scores minus its first-order effect
on that loss when added at step t, <lambda_t, g_z(theta_t)> / B, averaged over
--magic_steps steps spread over the run (highest = most helpful: keep with --hardest,
the default). --pool=N ranks a seeded random N of the batches only (a score that costs
per batch pays only for those).
--hardest keeps the highest scores (EL2N's and Sorscher et al.'s choice for large data),
--easiest the lowest. NaN scores are never kept.

A ranking that reads the reference (ref_nll, ref_ppl, rho, a ref_* --select_metric) leaves
out the holdout it was fitted on (--holdout=auto; exclude | keep): its batches are neither
ranked nor kept, so a run on the spec never trains on them.

Outputs (in <tables_dir>/select/, named <by>_<hardest|easiest>_<keep>):
  _ids.npy       the kept batch ids (sorted), read by the spec's "include"
  _spec.json     a schedule spec: shuffle over the kept batches
  _ranking.csv   batch_id, score, rank (1 = first kept), kept, and the noisy column
                 when the data has one (tinystories.py sample --noise)
  _select.json   how: the score, the holdout left out, and the cost of scoring (FLOPs of
                 a scoring model's forward passes, seconds; magic: the proxy run's FLOPs
                 and seconds, its reverse pass's, its JVPs'), total_flops all of it, for
                 compute-matched comparisons
--tag appends _<tag> to the names (several rankings of one score side by side).
"""

import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prebias import attribution, batchmetrics
from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint, run_config
from prebias.common import (SEED, UserError, atomic_path, auto_device, main_guard, parse_config, write_csv_atomic,
                            write_json_atomic)
from prebias.data import DATA_DIR, MAX_SEQ_LEN, TABLES_DIR, VOCAB_SIZE, BatchData
from prebias.compute import forward_flops_per_window
from prebias.selection import REF_COLUMNS, SCORES, Irreducible, ScoreContext, check_fit, reads_reference


# -----------------------------------------------------------------------------
@dataclass
class SelectConfig:
    by: str = "ref_nll"  # a selection score (uniform | loss | rho | el2n | metric) or a batch metric
    keep: float = 0.5  # fraction of the training batches kept
    which: str = "hardest"  # hardest | easiest (also --hardest / --easiest)
    out_dir: str = ""  # scores that read a model: the (short) run whose early checkpoint scores the batches
    ckpt_iter: int = -1  # that checkpoint's step (-1: the first at >= 10% of the run)
    select_ref: str = ""  # rho: a model.bin/.pt for the irreducible loss ('' = batch metrics' ref_nll)
    select_metric: str = ""  # metric: the batch metric to steer by...
    select_target: float = 0.0  # ...toward this value
    seed: int = SEED  # uniform: the seed of the random subset (and of --pool's)
    pool: int = 0  # rank a seeded random subset of this many batches (0: every one)
    magic_steps: int = 4  # magic: steps of the proxy run (spread over it) whose effects are averaged
    n_val: int = 32  # magic: validation windows whose mean loss is the target
    tag: str = ""  # appended to the output names
    holdout: str = "auto"  # auto: leave the holdout out exactly when the ranking reads the reference; exclude | keep
    data_dir: str = str(DATA_DIR)  # ignored when out_dir is given (the run's own data)
    tables_dir: str = str(TABLES_DIR)
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = MAX_SEQ_LEN
    batch_size: int = 32  # windows per forward pass
    device: str = "auto"
# -----------------------------------------------------------------------------


def early_checkpoint(out_dir, ckpt_iter: int, by: str):
    found = list_checkpoints(out_dir) if out_dir else []
    if not found:
        raise UserError(f"--by={by} needs a run's checkpoints: none in {out_dir or '(no --out_dir)'}/ckpt "
                        "(train a short run first and give it as --out_dir)")
    if ckpt_iter >= 0:
        for it, p in found:
            if it == ckpt_iter:
                return it, p
        raise UserError(f"--ckpt_iter={ckpt_iter}: {out_dir} has checkpoints at {', '.join(str(i) for i, _ in found)}")
    target = 0.1 * run_config(out_dir)["max_iters"]
    return next(((it, p) for it, p in found if it >= max(target, 1)), found[-1])


def score_batches(cfg: SelectConfig, data: BatchData, column, ids: np.ndarray, meta: dict) -> tuple[np.ndarray, str, dict]:
    """A registered score of the batches `ids`, (scores, how, cost). The offline pool is
    every one of them in a seeded order (uniform keeps its first ones: a random subset)."""
    score, model, how = SCORES[cfg.by], None, f"score {cfg.by}"
    device = auto_device(cfg.device)
    cost = {"flops": 0.0, "ref_fit_flops": 0.0}
    run = None
    if score.needs_run:
        early_checkpoint(cfg.out_dir, -1, cfg.by)  # no run: one line
        run, how = attribution.Trajectory(cfg.out_dir), f"{cfg.by}: the reverse pass of {cfg.out_dir}"
    if score.needs_model:
        it, path = early_checkpoint(cfg.out_dir, cfg.ckpt_iter, cfg.by)
        model, how = model_from_checkpoint(load_checkpoint(path), device), f"{cfg.by} at {path} (step {it})"
        cost["flops"] = forward_flops_per_window(model) * len(ids)
    if score.needs_metric:
        column(cfg.select_metric)  # an unknown metric: one line now
    irr = Irreducible(data, column, cfg.select_ref, device, meta) if score.needs_ref else None
    if irr is not None and cfg.holdout != "keep":
        irr.check_held_out(f"--by={cfg.by}")
    ctx = ScoreContext(device=device, batch_size=cfg.batch_size, batch_metric=column, metric=cfg.select_metric,
                       target=cfg.select_target, irreducible=irr, run=run,
                       magic_steps=cfg.magic_steps, n_val=cfg.n_val)
    perm = np.random.default_rng(cfg.seed).permutation(len(ids))
    out = np.empty(len(ids))
    out[perm] = score(model, data, ids[perm], ctx)
    if irr is not None:
        cost["flops"] += (forward_flops_per_window(irr.model) * irr.scored) if irr.model is not None else 0.0
        cost["ref_fit_flops"], cost["reference"] = irr.fit_flops, irr.record
    if ctx.cost:  # magic: the proxy run (its training), its reverse pass and the JVPs
        cost.update(ctx.cost)
        cost["flops"] += ctx.cost["reverse_flops"] + ctx.cost["score_flops"]
    return out, how, cost


def scores(cfg: SelectConfig, data: BatchData, bm: pd.DataFrame, ids: np.ndarray, meta: dict):
    """(score of every batch in ids, how it was computed, its cost)."""
    numeric = [c for c in bm.columns if c not in batchmetrics.ID_COLUMNS]

    def column(name):
        if name not in numeric:
            raise UserError(f"unknown batch metric {name!r}; valid: {', '.join(numeric)}")
        return bm[name].to_numpy(np.float64)
    if cfg.by in SCORES:
        return score_batches(cfg, data, column, ids, meta)
    if cfg.by not in numeric:
        raise UserError(f"--by={cfg.by}: choose a selection score ({', '.join(SCORES)}) or a batch metric: "
                        f"{', '.join(numeric)}")
    return column(cfg.by)[ids], f"batch_metrics.csv column {cfg.by}", {"flops": 0.0, "ref_fit_flops": 0.0}


def ranked_ids(cfg: SelectConfig, data: BatchData, meta: dict) -> tuple[np.ndarray, str]:
    """(the training batches to rank, the holdout mode): less the holdout where the ranking
    reads the reference fitted on it (--holdout=auto) or --holdout=exclude; --pool=N: a
    seeded random N of them."""
    ids, mode = holdout_ids(cfg, data, meta)
    if 0 < cfg.pool < len(ids):
        ids = np.sort(np.random.default_rng(cfg.seed).choice(ids, cfg.pool, replace=False))
    return ids, mode


def holdout_ids(cfg: SelectConfig, data: BatchData, meta: dict) -> tuple[np.ndarray, str]:
    mode = cfg.holdout
    if mode == "auto":
        reads = cfg.by in REF_COLUMNS or (cfg.by in SCORES and reads_reference(SCORES[cfg.by], cfg.select_metric))
        mode = "exclude" if reads else "keep"
    if mode != "exclude":
        return data.train_ids, mode
    if not len(data.holdout_ids):
        raise UserError(f"--by={cfg.by} reads the reference, but {data.dir} has no holdout: re-run python "
                        "tinystories.py pretokenize (it holds out --holdout=0.1 of the training stories), or pass "
                        "--holdout=keep")
    if cfg.by in REF_COLUMNS and meta.get("scorer_fit", {}).get("on") != "model":
        check_fit(meta.get("scorer_fit", {}), data, f"--by={cfg.by}")
    return np.setdiff1d(data.train_ids, data.holdout_ids), mode


def select(cfg: SelectConfig) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.by) or cfg.by.startswith("."):  # it names the output files
        raise UserError(f"--by={cfg.by!r}: a score or column name of letters, digits, '_', '-' and '.' (it names "
                        "the output files in <tables_dir>/select/)")
    if cfg.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.tag):
        raise UserError(f"--tag={cfg.tag!r}: letters, digits, '_', '-' and '.' (it names the output files)")
    if not 0 < cfg.keep <= 1:
        raise UserError(f"--keep={cfg.keep}: a fraction in (0, 1]")
    if cfg.which not in ("hardest", "easiest"):
        raise UserError(f"--which={cfg.which}: hardest or easiest")
    if cfg.holdout not in ("auto", "exclude", "keep"):
        raise UserError(f"--holdout={cfg.holdout}: auto, exclude or keep")
    if cfg.out_dir:  # the run's own data
        run = types.SimpleNamespace(**run_config(cfg.out_dir))
        cfg.data_dir, cfg.tables_dir = run.data_dir, run.tables_dir
        cfg.vocab_size, cfg.max_seq_len = run.vocab_size, run.max_seq_len
    data = BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len)
    bm, meta = batchmetrics.load_batch_metrics(cfg.tables_dir, data)
    t0 = time.perf_counter()
    ids, mode = ranked_ids(cfg, data, meta)
    s, how, cost = scores(cfg, data, bm, ids, meta)
    cost["seconds"] = round(time.perf_counter() - t0, 3)
    cost["total_flops"] = cost["flops"] + cost["ref_fit_flops"] + cost.get("proxy_flops", 0.0)
    key = np.where(np.isnan(s), np.inf, -s if cfg.which == "hardest" else s)
    order = np.argsort(key, kind="stable")
    n_nan, want = int(np.isnan(s).sum()), int(round(cfg.keep * len(ids)))
    n_keep = min(want, len(ids) - n_nan)  # a batch without a score is never kept
    if n_keep < 1:
        raise UserError(f"--keep={cfg.keep} keeps no batch of {len(ids)}" + (
            f": {n_nan} of them have no {cfg.by} value (NaN in batch_metrics.csv), the rest round to 0; rank by "
            "another metric" if n_nan else f" (it rounds to 0): keep at least 1/{len(ids)}"))
    if n_nan:
        print(f"warning: {n_nan} of {len(ids)} batches have no {cfg.by} value (NaN in batch_metrics.csv: e.g. "
              f"gender_ratio where a batch names nobody) and are never kept" +
              (f"; kept {n_keep}, not the {want} that --keep={cfg.keep} asks for" if n_keep < want else ""))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    kept = rank <= n_keep
    name = f"{cfg.by}_{cfg.which}_{cfg.keep:g}" + (f"_{cfg.tag}" if cfg.tag else "")
    out = Path(cfg.tables_dir) / "select"
    table = pd.DataFrame({"batch_id": ids, "score": s, "rank": rank, "kept": kept})
    if "noisy" in bm.columns:
        table["noisy"] = bm["noisy"].to_numpy()[ids]
    ids_path = out / f"{name}_ids.npy"
    with atomic_path(ids_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.sort(ids[kept]), allow_pickle=False)
    write_csv_atomic(table.sort_values("rank"), out / f"{name}_ranking.csv")
    spec = {"phases": [{"strategy": "shuffle"}], "include": str(ids_path)}
    write_json_atomic(out / f"{name}_spec.json", spec)
    write_json_atomic(out / f"{name}_select.json", {
        "by": cfg.by, "which": cfg.which, "keep": cfg.keep, "n_kept": n_keep, "n_ranked": len(ids), "pool": cfg.pool,
        "how": how,
        "holdout": {"mode": mode, "n_batches": len(data.holdout_ids), "sha256": data.holdout_meta.get("sha256", "")},
        "cost": cost})
    left = f", the holdout's {len(data.holdout_ids)} left out (the reference was fitted on them)" \
        if mode == "exclude" else ""
    msg = f"kept {n_keep} of {len(ids)} training batches ({cfg.which} by {how}{left})"
    if "noisy" in table:
        msg += (f"; noisy share kept {table.loc[kept, 'noisy'].mean():.3f} vs all "
                f"{table['noisy'].mean():.3f}")
    print(msg)
    print(f"wrote {ids_path}, {out / f'{name}_spec.json'} and {out / f'{name}_ranking.csv'}")
    print(f"train on them: python train.py --schedule_spec={out / f'{name}_spec.json'}")
    return out / f"{name}_spec.json"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [f"--which={a[2:]}" if a in ("--hardest", "--easiest") else a for a in argv]
    return select(parse_config(SelectConfig(), argv))


if __name__ == "__main__":
    main_guard(main)
