"""
Which training batches pushed a behaviour? Attribution over the run's own record (every
checkpoint's interval lists exactly which batch was trained at which step), by a
registered estimator (prebias/attribution.py: grad_dot, tracin, tracin_adam, trak, ekfac, magic),
graded by retraining in place: a removed batch's rows weigh 0 at its step and every other
batch stays where it was (train.py --train_mask), so a retrain differs from the run by
the removal alone.

$ python attribute.py --out_dir=out --probe=val
$ python attribute.py --out_dir=out --probe=val --estimator=tracin_adam      # needs --keep_optimizer=True runs
$ python attribute.py --out_dir=out --probe='text:Once upon a time, there was a little dog'
$ python attribute.py --out_dir=out/canary --probe=tag:secret
$ python attribute.py --out_dir=out --probe=metric:sentiment      # needs eval.py's tables
$ python attribute.py --out_dir=out --probe=val --validate=topk --k=50 --n_random=5
$ python attribute.py --out_dir=out --probe=val --n_val=64 --validate=lds --subsets=50 --alpha=0.5 --jobs=2
$ python attribute.py --out_dir=out --probe=val --n_val=16 --validate=lds --subsets=100 --drop=0.01 --jobs=2
$ python attribute.py --out_dir=out --probe=val --validate=order --moves=30
$ python attribute.py --out_dir=out --probe=val --estimator=magic     # exact metagradients (prebias/magic.py)
$ python attribute.py --out_dir=out --probe=val --validate=order --estimators=tracin,magic
$ python attribute.py --out_dir=out --probe=val --n_val=16 --validate=smoothness --directions=4 --eps=0.001,0.01,0.1,1
$ python attribute.py --out_dir=out --probe=val --n_val=16 --validate=smoothness --steps=100:200   # late steps only

Probes: val (each of the first n_val validation batches is one probe; the influence table
is their mean, i.e. the mean validation loss), text:<text>, tag:<id> (a canary's secret
given its prefix), metric:<name> (a differentiable proxy: the loss of the last
checkpoint's eval generations in the top quarter by that metric).
Outputs: <out_dir>/tables/influence_<probe>[_<estimator>].csv (batch_id, influence,
n_trained, n_tagged, batch metrics), influence_<probe>_corr.csv (Spearman correlation with
each batch metric), <out_dir>/visualize/influence_<probe>.png, and the top and bottom
batches' text on stdout.
Validation (retrains under <out_dir>/attribution/retrains/, cached: a rerun, or another
estimator, reuses every finished retrain):
  topk   without the k most helpful batches vs without k random batches trained at the same
         steps (timing-matched, n_random draws): the ratio of the probe changes, with the
         interval of the ratio (top / the random mean's t interval)
  lds    the linear datamodeling score (Park et al. 2023) of every estimator in --estimators on
         the same M subsets: each batch kept with probability alpha (table lds_<probe>.csv), or
         with --drop=0.01 each subset drops 1% of the trained (step, row) occurrences in place
         (train.py --train_weights; table lds_<probe>_drop0.01.csv); an estimator that scores
         batches, not steps, has its batch score spread evenly over the batch's occurrences
  smoothness  along --directions random directions d in weight space (every trained (step,
         row) +-1), retrained at w = 1 +- eps d for each --eps: the probe's change against the
         linear prediction eps <g, d> (g from --metagradient, else the central difference at the
         smallest eps), and the eps up to which first order holds (prebias/smoothness.py):
         tables/smoothness_<probe>.csv, visualize/smoothness_<probe>.png; --steps=a:b moves
         only the weights of steps a..b-1 (tables/smoothness_<probe>_steps<a>-<b>.csv)
  order  random moves (move_rows batches of the first move_frac of the run swapped with as many
         of the last), retrained with that order (the replay strategy): the correlation of the
         predicted change of the probe (prebias.attribution.move_effect; with magic in
         --estimators also prebias.magic.move_effect_magic, exact to first order) with the measured one
"""

import hashlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from prebias import attribution as A
from prebias import batchmetrics, magic
from prebias import smoothness as SM
from prebias import tags as tagmod
from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint
from prebias.common import (UserError, atomic_path, config_to_argv, main_guard, parse_config, save_figure,
                            write_csv_atomic, write_json_atomic)
from prebias.data import BOS_ID, sha256_file, window_texts
from prebias.launchers import Job, LaunchOptions, launch, raise_failures
from prebias.paths import RunPaths
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
@dataclass
class AttributeConfig:
    out_dir: str = "out"
    probe: str = "val"  # val | text:<text> | tag:<id> | metric:<name>
    estimator: str = "tracin"  # the influence table's estimator (prebias/attribution.py ESTIMATORS)
    d: int = 2048  # projection dimension (0: exact gradients)
    proj: str = "rademacher"  # rademacher | gaussian
    seed: int = 0  # the projection's seed, and the subsets', random controls' and moves' seed
    n_val: int = 8  # val probe: validation batches (each one probe)
    chunk: int = 0  # batches whose gradients are projected together (0: as many as fit in ~0.5 GiB)
    top: int = 5  # batches shown at each end
    damping: float = 0.01  # trak: lambda = damping * mean eigenvalue of Phi^T Phi
    ekfac_damping: float = 0.0  # ekfac: Kronfluence's damping_factor (0: its heuristic, 0.1 x mean eigenvalue)
    validate: str = ""  # '' | topk | lds | order (True = topk)
    k: int = 50  # topk: batches left out
    n_random: int = 5  # topk: timing-matched random draws
    subsets: int = 50  # lds: retrains on random subsets
    alpha: float = 0.5  # lds: each batch kept with this probability (batch-level subsets, drop=0)
    drop: float = 0.0  # lds: > 0: each subset drops this share of the trained (step, row) occurrences in place
    #                    (train.py --train_weights, weight 0), e.g. 0.01; 0: the batch-level subsets of alpha
    estimators: str = "grad_dot,tracin,tracin_adam,trak,ekfac"  # lds: scored side by side (those available)
    n_boot: int = 1000  # bootstrap resamples of every interval
    moves: int = 30  # order: random moves, one retrain each
    move_rows: int = 8  # order: batches moved each way per move
    move_frac: float = 0.1  # order: the first and the last this fraction of the steps trade batches
    directions: int = 4  # smoothness: random directions d in weight space (Rademacher on the trained occurrences)
    eps: str = "0.001,0.01,0.1,1"  # smoothness: step sizes, each retrained at w = 1 + eps d and 1 - eps d
    tol: float = 0.1  # smoothness: first order holds while the linear prediction's relative error is at most this
    steps: str = ""  # smoothness: "a:b" moves the weights of steps a..b-1 only (the rest stay 1): where in the run
    #                  smoothness fails; '' = every step
    metagradient: str = ""  # smoothness: d probe / d w, .npy (steps, B) or (P, steps, B), or an .npz with `dw`
    #                         (prebias/magic.py's table); '' = the central difference at the smallest eps
    launcher: str = "local"  # how retrains run (prebias/launchers.py)
    jobs: int = 1  # retrains at once
# -----------------------------------------------------------------------------

PROBE = re.compile(r"^(val|text:.+|tag:.+|metric:.+)$", re.S)
VALIDATIONS = ("", "topk", "lds", "order", "smoothness")


def check(cfg: AttributeConfig):
    if cfg.validate in ("True", "true", "1"):
        cfg.validate = "topk"
    if cfg.validate in ("False", "false", "0"):
        cfg.validate = ""
    if cfg.validate not in VALIDATIONS:
        raise UserError(f"--validate={cfg.validate}: choose topk, lds, order or smoothness (or leave it empty)")
    if not PROBE.match(cfg.probe):
        raise UserError(f"--probe={cfg.probe!r}: use val, text:<text>, tag:<id> or metric:<name>")
    if cfg.d < 0 or cfg.proj not in ("rademacher", "gaussian"):
        raise UserError(f"--d={cfg.d} --proj={cfg.proj}: d >= 0 (0 = exact), proj rademacher or gaussian")
    if not 0 < cfg.alpha < 1:
        raise UserError(f"--alpha={cfg.alpha}: the probability of keeping a batch, in (0, 1)")
    if not 0 <= cfg.drop < 1:
        raise UserError(f"--drop={cfg.drop}: the share of trained (step, row) occurrences each subset drops, in "
                        "[0, 1) (e.g. 0.01; 0: batch-level subsets, --alpha)")
    # every count, checked before anything is computed or written (a slice such as
    # val_ids[:-3] or a k of -1 would otherwise run, and say so only after a retrain)
    for k, lo in (("n_val", 1), ("k", 1), ("n_random", 1), ("subsets", 2), ("n_boot", 1), ("moves", 1),
                  ("move_rows", 1), ("jobs", 1), ("top", 0), ("chunk", 0), ("directions", 1)):
        if getattr(cfg, k) < lo:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be at least {lo}")
    if cfg.steps and not (re.fullmatch(r"\d+:\d+", cfg.steps) and step_window(cfg)[0] < step_window(cfg)[1]):
        raise UserError(f"--steps={cfg.steps}: give a:b, the steps a..b-1 whose weights smoothness moves (a < b), "
                        "or leave it empty for every step")
    if not 0 < cfg.move_frac <= 0.5:
        raise UserError(f"--move_frac={cfg.move_frac}: the share of the steps at each end, in (0, 0.5] (the first "
                        "and the last this share trade batches; above 0.5 they overlap)")
    for k in ("damping", "ekfac_damping"):
        if getattr(cfg, k) < 0:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be >= 0")
    try:
        SM.parse_eps(cfg.eps)
    except ValueError:
        raise UserError(f"--eps={cfg.eps}: positive step sizes separated by commas, e.g. 0.001,0.01,0.1,1") from None
    if not cfg.tol > 0:
        raise UserError(f"--tol={cfg.tol}: the largest relative error of a first-order prediction, > 0 (e.g. 0.1)")
    A.ESTIMATORS.lookup(cfg.estimator, "--estimator")
    for e in estimator_list(cfg):
        A.ESTIMATORS.lookup(e, "--estimators")


def estimator_list(cfg) -> list[str]:
    return list(A.ESTIMATORS) if cfg.estimators == "all" else [e for e in cfg.estimators.split(",") if e]


# -----------------------------------------------------------------------------
# probes: each an Item (tokens, optional loss weight) whose loss is attributed

def probe_items(cfg: AttributeConfig, traj: A.Trajectory) -> tuple[list[A.Item], str]:
    kind, _, arg = cfg.probe.partition(":")
    run, data = traj.run, traj.data
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    if kind == "val":
        wins = data.windows(data.val_ids[:cfg.n_val])
        return [A.Item(w) for w in wins], f"mean loss of the first {len(wins)} validation batches"
    if kind == "text":
        toks = [BOS_ID, *enc.encode(arg, bos=False)][:run.max_seq_len + 1]
        if len(toks) < 2:
            raise UserError(f"--probe={cfg.probe}: the text has no tokens")
        return [A.Item(np.asarray(toks))], f"loss of the text {arg!r}"
    if kind == "tag":
        if not traj.rec["tags"]:
            raise UserError(f"--probe={cfg.probe}: {cfg.out_dir} was trained without tags")
        tag = tagmod.tags_from_json(traj.rec["tags"], enc, run.max_seq_len, run.vocab_size).by_id(arg)
        if tag.kind != "canary" or not len(tag.secret_tokens):
            raise UserError(f"--probe={cfg.probe}: tag {arg!r} is not a canary with a secret")
        toks = np.asarray([BOS_ID, *tag.tokens.tolist()])
        weight = np.zeros(len(toks) - 1, np.float32)
        weight[-len(tag.secret_tokens):] = 1  # only the secret, given BOS + prefix
        return [A.Item(toks, weight)], f"loss of tag {arg}'s secret given its prefix"
    return metric_probe(cfg, run, enc, arg)


def metric_probe(cfg, run, enc, arg) -> tuple[list[A.Item], str]:
    """The top quarter of the last checkpoint's greedy generations by that metric."""
    table = RunPaths(cfg.out_dir).tables / "eval_outputs.csv"
    if not table.exists():
        raise UserError(f"--probe={cfg.probe} needs {table}: run python eval.py --out_dir={cfg.out_dir} first")
    out = pd.read_csv(table, keep_default_na=False, na_values=[""])
    if arg not in out.columns:
        raise UserError(f"--probe={cfg.probe}: {arg!r} is not a column of {table}")
    last = out[(out["iter"] == out["iter"].max()) & (out["decoding"] == "greedy")].dropna(subset=[arg])
    top = last.sort_values(arg, ascending=False).head(max(1, len(last) // 4))
    items = [A.Item(np.asarray([BOS_ID, *enc.encode(str(p) + str(g), bos=False)][:run.max_seq_len + 1]))
             for p, g in zip(top["prompt"], top["generated"])]
    return items, (f"proxy: mean loss of the {len(top)} generations of step {int(last['iter'].max())} "
                   f"with the highest {arg}")


def item_losses(model, items: list[A.Item]) -> np.ndarray:
    """(P,) each probe's (weighted) mean token loss."""
    out = []
    with torch.no_grad():
        for it in items:
            t = torch.from_numpy(np.asarray(it.tokens, np.int64))[None]
            ce = torch.nn.functional.cross_entropy(model(t[:, :-1])[0].float().transpose(1, 2), t[:, 1:],
                                                   reduction="none")[0]
            w = torch.ones_like(ce) if it.weight is None else torch.from_numpy(np.asarray(it.weight, np.float32))
            out.append(float((ce * w).sum() / w.sum()))
    return np.asarray(out)


# -----------------------------------------------------------------------------
# influence of every trained batch on the probe

def context(cfg: AttributeConfig) -> tuple[A.Context, str]:
    traj = A.Trajectory(cfg.out_dir)
    items, how = probe_items(cfg, traj)
    cache = RunPaths(cfg.out_dir).attribution
    store = A.GradStore(cache / "cache", cfg.d, cfg.proj, cfg.seed, cfg.chunk)
    return A.Context(traj, items, store, cfg.damping, cfg.ekfac_damping, cache), how


def influence_table(ctx: A.Context, S: np.ndarray) -> pd.DataFrame:
    """One row per trained batch: influence (the mean over probes), n_trained (kept rows),
    n_tagged (of those, how many carried a tag)."""
    traj = ctx.traj
    ins = traj.rec["insertions"]
    tagged_rows = {(int(a), int(b)) for a, b in ins[:, :2]} if len(ins) else set()
    count, tagged = np.zeros(len(traj.batches), int), np.zeros(len(traj.batches), int)
    for iv in traj.intervals:
        for j, s in enumerate(iv.steps):
            for r in np.flatnonzero(iv.keep[j]):
                i = traj.row_of[int(iv.ids[j, r])]
                count[i] += 1
                tagged[i] += (int(s), int(r)) in tagged_rows
    df = pd.DataFrame({"batch_id": traj.batches, "influence": S.mean(1), "n_trained": count, "n_tagged": tagged})
    return df.sort_values("influence", ascending=False, kind="stable").reset_index(drop=True)


def influence(cfg: AttributeConfig) -> tuple[pd.DataFrame, str]:
    check(cfg)
    ctx, how = context(cfg)
    S, _ = A.run_estimator(cfg.estimator, ctx)
    return influence_table(ctx, S), how


def probe_name(probe: str) -> str:
    """The probe in file names: its characters a file name keeps, and a short hash of the
    probe wherever that drops or changes anything but the kind's colon (tag:<id> and
    metric:<name> stay readable), so that two probes never share a table."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", probe)[:60].strip("_")
    if name == probe.replace(":", "_", 1) and not probe.startswith("text:"):
        return name
    return f"{name}_{hashlib.sha256(probe.encode()).hexdigest()[:8]}"


def table_name(cfg) -> str:
    return probe_name(cfg.probe) + ("" if cfg.estimator == "tracin" else f"_{cfg.estimator}")


def report(cfg: AttributeConfig, df: pd.DataFrame, how: str, traj: A.Trajectory | None = None):
    traj = traj or A.Trajectory(cfg.out_dir)
    run, data = traj.run, traj.data
    tables = RunPaths(cfg.out_dir).tables
    name = table_name(cfg)
    corr = pd.DataFrame(columns=["metric", "spearman", "n"])
    if (Path(run.tables_dir) / "batch_metrics.csv").exists():
        bm, _ = batchmetrics.load_batch_metrics(run.tables_dir, data)
        cols = [c for c in bm.columns if c not in batchmetrics.ID_COLUMNS and pd.api.types.is_numeric_dtype(bm[c])]
        df = df.merge(bm[["batch_id", *cols]], on="batch_id", how="left")
        rows = []
        for c in cols:
            ok = df[[c, "influence"]].dropna()
            if len(ok) > 2 and ok[c].nunique() > 1:
                rows.append({"metric": c, "spearman": ok["influence"].rank().corr(ok[c].rank()), "n": len(ok)})
        corr = pd.DataFrame(rows).sort_values("spearman", key=abs, ascending=False) if rows else corr
    write_csv_atomic(df, tables / f"influence_{name}.csv")
    write_csv_atomic(corr, tables / f"influence_{name}_corr.csv")
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    print(f"probe: {how}; {len(df)} batches, {cfg.estimator}, d={cfg.d or 'exact'} ({cfg.proj})")
    for label, part in (("most helpful", df.head(cfg.top)), ("most harmful", df.tail(cfg.top)[::-1])):
        print(f"-- {label}:")
        for bid, inf, nt, text in zip(part["batch_id"], part["influence"], part["n_tagged"],
                                      window_texts(list(data.windows(part["batch_id"].to_numpy())), enc)):
            mark = f" [trained with a tag {nt}x]" if nt else ""
            print(f"  batch_id:{bid} influence:{inf:+.3e}{mark} | {text.replace(chr(10), ' | ')[:140]}")
    if len(corr):
        print("-- Spearman correlation of influence with batch metrics: " +
              ", ".join(f"{r.metric} {r.spearman:+.2f}" for r in corr.head(6).itertuples()))
    plot(df, corr, how, RunPaths(cfg.out_dir).visualize / f"influence_{name}.png")
    for p in (tables / f"influence_{name}.csv", tables / f"influence_{name}_corr.csv",
              RunPaths(cfg.out_dir).visualize / f"influence_{name}.png"):
        print(f"wrote {p}")
    return df, corr


def plot(df, corr, how, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(df["influence"], bins=50, color="tab:blue")
    a.axvline(0, color="0.4", lw=0.8)
    a.set_xlabel("influence on the probe (> 0: training on it lowered the probe loss)")
    a.set_ylabel("batches")
    a.set_title(f"probe: {how}"[:90], fontsize=9)
    top = corr.head(10)[::-1]
    b.barh(top["metric"], top["spearman"], color=["tab:green" if v > 0 else "tab:red" for v in top["spearman"]])
    b.axvline(0, color="0.4", lw=0.8)
    b.set_xlabel("Spearman correlation of influence with the batch metric")
    b.set_title("which properties of the data pushed the probe", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# retraining in place (cached: a finished retrain is never run again)

RETRAIN_SKIP = {"out_dir", "init_from", "show_batches", "model_bin", "wandb_log", "schedule_exclude", "schedule_spec",
                "train_mask", "train_weights", "select", "select_pool", "keep_optimizer", "eval_interval", "log_spaced",
                "export_ckpt_bins"}


def save_npy(path: Path, arr: np.ndarray, dtype=np.int64):
    """Write once; a different array already there is a stale cache: one clear line."""
    arr = np.asarray(arr, dtype)
    if path.exists():
        if np.array_equal(np.load(path), arr):
            return
        raise UserError(f"{path} holds another array than these settings give: delete {path.parent} to redo")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def init_from(traj: A.Trajectory) -> str:
    """The checkpoint the run started from (train.py --init_from=<ckpt>: its record in the
    run's checkpoints), checked unchanged by its sha256; '' for a run from scratch."""
    init = load_checkpoint(traj.ckpts[0][1]).get("init") or {}
    if init.get("kind") != "checkpoint":
        return ""
    src = Path(init["from"])
    if not src.is_file() or sha256_file(src) != init.get("sha256"):
        raise UserError(f"{traj.out_dir} continued from {src}, which is gone or changed since (its sha256 differs): "
                        "restore it to retrain the run")
    return str(src)


def retrain_finished(out: Path, steps: int) -> bool:
    """Its last checkpoint is the final step and its record says as many steps: train.py
    writes batch_ids.npy last, after the final checkpoint, so a retrain killed in between
    has a stale record and is resumed (a resume of a finished run rewrites the record)."""
    found = list_checkpoints(out)
    if not found or found[-1][0] != steps:
        return False
    try:
        return np.load(RunPaths(out).batch_ids, mmap_mode="r").shape[0] == steps
    except (OSError, ValueError):
        return False


def retrain_job(traj: A.Trajectory, out: Path, mask=None, order=None, weights=None) -> Job | None:
    """The train.py job of one retrain: the recorded order replayed (so online selection is
    not re-run and every batch keeps its step), or `order`, with `mask` weighted 0 and
    `weights` (steps, B) the loss weight of each (step, row) (train.py --train_weights).
    None when it has finished."""
    run = vars(traj.run)
    if retrain_finished(out, run["max_iters"]):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    order_path = out.parent / f"{out.name}_order.npy"
    save_npy(order_path, traj.rec["batch_ids"][:run["max_iters"]] if order is None else order)
    spec = out.parent / f"{out.name}_order.json"
    write_json_atomic(spec, {"phases": [{"strategy": "replay", "ids": str(order_path.resolve())}]})
    args = config_to_argv({k: v for k, v in run.items() if k not in RETRAIN_SKIP})
    args += [f"--out_dir={out}", "--model_bin=none", f"--schedule_spec={spec}", "--select=none", "--select_pool=1",
             f"--eval_interval={run['max_iters']}", "--log_spaced=False"]
    if mask is not None:
        save_npy(out.parent / f"{out.name}_mask.npy", mask)
        args.append(f"--train_mask={out.parent / f'{out.name}_mask.npy'}")
    if weights is not None:
        save_npy(out.parent / f"{out.name}_weights.npy", weights, np.float64)
        args.append(f"--train_weights={out.parent / f'{out.name}_weights.npy'}")
    if list_checkpoints(out):
        args.append("--init_from=resume")
    elif init_from(traj):  # a continued run is retrained from the weights it continued from, not from scratch
        args.append(f"--init_from={init_from(traj)}")
    return Job(out.name, out, [("train", [sys.executable, str(Path(__file__).with_name("train.py")), *args])],
               log="retrain.log")


def retrain_all(cfg: AttributeConfig, traj: A.Trajectory, group: str, specs: list) -> list[Path]:
    """Run every retrain of specs [(name, mask ids | None, order | None[, weights (steps, B)])]
    not yet finished, cfg.jobs at a time; their folders, in order."""
    if traj.ckpts[-1][0] != traj.run.max_iters:
        raise UserError(f"{cfg.out_dir} has trained {traj.ckpts[-1][0]} of {traj.run.max_iters} steps: finish it "
                        "first (python train.py --init_from=resume)")
    root = RunPaths(cfg.out_dir).attribution / "retrains" / group
    outs = [root / spec[0] for spec in specs]
    jobs = [j for spec, out in zip(specs, outs) if (j := retrain_job(traj, out, *spec[1:]))]
    if jobs:
        bar = tqdm(total=len(jobs), desc=f"retrains {group} ({len(specs) - len(jobs)} cached)", unit="run")

        def say(msg):
            if " done in " in msg:
                bar.update(1)
        raise_failures(launch(jobs, cfg.launcher, LaunchOptions(jobs=cfg.jobs), say), "retrains")
        bar.close()
    return outs


def retrain_seconds(out: Path) -> float:
    """Seconds from a retrain's first checkpoint to its last (its training time)."""
    found = list_checkpoints(out)
    return found[-1][1].stat().st_mtime - found[0][1].stat().st_mtime


def measure(out: Path, items: list[A.Item]) -> np.ndarray:
    """(P,) the probes' losses at a run's last checkpoint, cached beside it."""
    h = hashlib.sha1("".join(it.key() for it in items).encode()).hexdigest()[:16]
    last = list_checkpoints(out)[-1][1]
    path = RunPaths(out).attribution / f"probe_losses_{last.stem}_{h}.npy"
    if path.exists() and path.stat().st_mtime >= last.stat().st_mtime:
        return np.load(path)
    vals = item_losses(model_from_checkpoint(load_checkpoint(last)), items)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, vals, allow_pickle=False)
    return vals


def t_interval(x) -> tuple[float, float, float]:
    from scipy import stats
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    h = float(x.std(ddof=1)) * float(stats.t.ppf(0.975, len(x) - 1)) / math.sqrt(len(x))
    return m, m - h, m + h


def base_loss(cfg: AttributeConfig, traj: A.Trajectory, items: list[A.Item]) -> float:
    """The mean probe loss of the in-place retrain with nothing removed: every effect is
    measured against it, not against the run, so a run trained with other numerics (thread
    count, a resume on another machine, GPU kernels) does not shift every effect alike."""
    out = retrain_all(cfg, traj, "base", [("empty", None, None)])[0]
    base, run = float(measure(out, items).mean()), float(measure(traj.out_dir, items).mean())
    print(f"probe loss {base:.4f} retrained in place with nothing removed; {run:.4f} as the run trained "
          f"({'bitwise the same' if base == run else f'{base - run:+.5f}: the numerics differ'})")
    return base


# -----------------------------------------------------------------------------
# validation 1: top-k vs timing-matched random-k, removed in place

def matched_random(traj: A.Trajectory, top: np.ndarray, rng) -> np.ndarray:
    """For each top batch, a random other batch trained at its (first) step: the same
    steps, so the same learning rates and the same point of the run."""
    rec, topset, chosen = traj.rec["batch_ids"], set(top.tolist()), []
    first = {}
    for s, row in enumerate(rec):
        for b in row:
            first.setdefault(int(b), s)
    for b in top:
        pool = [int(x) for x in rec[first[int(b)]] if int(x) not in topset and int(x) not in chosen
                and int(x) in traj.row_of]
        if not pool:
            raise UserError(f"step {first[int(b)]} has no batch outside the top {len(top)} to match batch {b} with: "
                            "use a smaller --k")
        chosen.append(pool[int(rng.integers(len(pool)))])
    return np.asarray(chosen, np.int64)


def validate_topk(cfg: AttributeConfig, ctx: A.Context, df: pd.DataFrame) -> dict:
    traj, items = ctx.traj, ctx.probes
    k = min(cfg.k, len(df) // 2)
    top = df["batch_id"].to_numpy()[:k]
    rng = np.random.default_rng([cfg.seed, 0x746F706B])
    rand = [matched_random(traj, top, rng) for _ in range(cfg.n_random)]  # 'use a smaller --k' before any retrain
    base = base_loss(cfg, traj, items)
    group = f"topk_{table_name(cfg)}_k{k}_s{cfg.seed}"
    outs = retrain_all(cfg, traj, group, [("top", top, None)] + [(f"random{r}", ids, None) for r, ids in
                                                                  enumerate(rand)])
    effects = [float(measure(o, items).mean()) - base for o in outs]
    top_eff, r_eff = effects[0], effects[1:]
    m, lo, hi = t_interval(r_eff)
    ratio = top_eff / m if m else math.nan
    r_lo, r_hi = sorted((top_eff / lo, top_eff / hi)) if lo > 0 or hi < 0 else (math.nan, math.nan)
    res = {"k": k, "probe_loss": base, "top_effect": top_eff, "random_mean": m, "random_lo": lo, "random_hi": hi,
           "ratio": ratio, "ratio_lo": r_lo, "ratio_hi": r_hi, "n_random": len(r_eff),
           "difference": top_eff - m, "difference_lo": top_eff - hi, "difference_hi": top_eff - lo,
           "random_effects": " ".join(f"{r:.6f}" for r in r_eff),
           "retrain_s": float(np.mean([retrain_seconds(o) for o in outs]))}
    print(f"validation (in place): probe loss {base:.4f}; without the {k} most helpful batches {top_eff:+.4f}, "
          f"without {k} timing-matched random ones {m:+.4f} [{lo:+.4f}, {hi:+.4f}] ({len(r_eff)} draws): ratio "
          f"{ratio:.2f} [{r_lo:.2f}, {r_hi:.2f}]" + ("" if r_lo > 1 else " (the interval does not exclude 1)")
          + f"; difference {top_eff - m:+.4f} [{top_eff - hi:+.4f}, {top_eff - lo:+.4f}]")
    write_csv_atomic(pd.DataFrame([res]), RunPaths(cfg.out_dir).tables / f"influence_{table_name(cfg)}_validation.csv")
    return res


# -----------------------------------------------------------------------------
# validation 2: the linear datamodeling score, every estimator on the same subsets

def lds_subsets(batches: np.ndarray, M: int, alpha: float, seed: int) -> np.ndarray:
    """(M, n) bool: subset m keeps each batch with probability alpha (its own seeded draw,
    so the first M subsets of a larger M are the same)."""
    return np.stack([np.random.default_rng([seed, 0x6C6473, m]).random(len(batches)) < alpha for m in range(M)])


def drop_subsets(n: int, M: int, drop: float, seed: int) -> np.ndarray:
    """(M, n) bool: subset m keeps all but k = max(1, round(drop * n)) of n occurrences, the
    dropped ones drawn without replacement (its own seeded draw, as lds_subsets)."""
    k = max(1, int(round(drop * n)))
    kept = np.ones((M, n), bool)
    for m in range(M):
        kept[m, np.random.default_rng([seed, 0x6C647364, m]).choice(n, k, replace=False)] = False
    return kept


def occurrence_weights(traj: A.Trajectory, kept: np.ndarray) -> np.ndarray:
    """(steps, B) train.py --train_weights: 1, and 0 at the occurrences kept (n_occurrences,) drops."""
    w = np.ones(traj.rec["batch_ids"][:traj.run.max_iters].shape)
    s, r = traj.occurrences[~kept].T
    w[s, r] = 0
    return w


def lds_design(cfg: AttributeConfig, traj: A.Trajectory) -> tuple[str, np.ndarray, list, str, str]:
    """(retrain group, kept (M, n) bool, retrain specs, per, in words): batch-level subsets
    (each trained batch kept with probability alpha, the rest removed in place by
    --train_mask) or, with --drop, occurrence-level ones (a share of the trained (step, row)
    occurrences weighted 0 by --train_weights, every other row as trained)."""
    if cfg.drop:
        kept = drop_subsets(len(traj.occurrences), cfg.subsets, cfg.drop, cfg.seed)
        specs = [(f"sub{m:03d}", None, None, occurrence_weights(traj, k)) for m, k in enumerate(kept)]
        how = f"each dropping {(~kept[0]).sum()} of the {kept.shape[1]} trained occurrences (step, row), {cfg.drop:g}"
        return f"lds_d{cfg.drop:g}_s{cfg.seed}", kept, specs, "occurrence", how
    kept = lds_subsets(traj.batches, cfg.subsets, cfg.alpha, cfg.seed)
    specs = [(f"sub{m:03d}", traj.batches[~kept[m]], None) for m in range(len(kept))]
    return f"lds_a{cfg.alpha:g}_s{cfg.seed}", kept, specs, "batch", f"each batch kept with probability {cfg.alpha}"


def lds_scores(cfg: AttributeConfig, ctx: A.Context, kept, measured, per: str) -> pd.DataFrame:
    """One row per available estimator of --estimators: its LDS on these subsets, with the
    interval, the paired interval of its difference to grad_dot, and its cost. The datamodel
    of an occurrence-level subset sums the kept occurrences' scores (the same ranking as
    minus the dropped ones')."""
    traj = ctx.traj
    boot_idx = np.random.default_rng([cfg.seed, 0x626F6F74]).integers(0, len(kept), (cfg.n_boot, len(kept)))
    rows, boots = [], {}
    for name in estimator_list(cfg):
        if not A.available(name):
            print(f"lds: {name} skipped ({A.ESTIMATORS[name].optional} is not installed)")
            continue
        if A.ESTIMATORS[name].needs_optimizer and not traj.preconditioner_available():
            print(f"lds: {name} skipped (the run kept no optimizer moments: train with --keep_optimizer=True)")
            continue
        S, cost = A.run_estimator(name, ctx, per)
        r = A.lds(S, kept, measured, boot_idx=boot_idx)
        boots[name] = r["boot"]
        rows.append({"estimator": name, "lds": r["lds"], "lo": r["lo"], "hi": r["hi"], "seconds": cost["seconds"],
                     "gradients": cost["gradients"]})
    df = pd.DataFrame(rows)
    if "grad_dot" in boots:  # paired: the same resampled subsets for every estimator (percentile interval)
        d = {n: np.nanpercentile(b - boots["grad_dot"], [2.5, 97.5]) for n, b in boots.items()}
        df["vs_grad_dot_lo"], df["vs_grad_dot_hi"] = [d[n][0] for n in df.estimator], [d[n][1] for n in df.estimator]
    return df


def lds_table_name(cfg: AttributeConfig) -> str:
    return f"lds_{probe_name(cfg.probe)}" + (f"_drop{cfg.drop:g}" if cfg.drop else "")


def validate_lds(cfg: AttributeConfig, ctx: A.Context) -> pd.DataFrame:
    traj, items = ctx.traj, ctx.probes
    group, kept, specs, per, how = lds_design(cfg, traj)
    outs = retrain_all(cfg, traj, group, specs)
    measured = np.stack([measure(o, items) for o in outs])
    df = lds_scores(cfg, ctx, kept, measured, per)
    secs = [retrain_seconds(o) for o in outs]  # median below: a retrain cut and resumed spans its pause
    print(f"LDS over {len(kept)} retrains in place ({how}), {len(items)} probes, {traj.run.max_iters} steps; retrain "
          f"{np.median(secs):.1f} s each (median of the training time, first to last checkpoint)")
    print(f"{'estimator':<12} {'LDS [95% CI]':<24} {'vs grad_dot [95% CI]':<22} {'cost':>8} {'gradients':>10}")
    for r in df.itertuples():
        vs = f"[{r.vs_grad_dot_lo:+.3f}, {r.vs_grad_dot_hi:+.3f}]" if "vs_grad_dot_lo" in df else ""
        print(f"{r.estimator:<12} {r.lds:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]{'':<4} {vs:<22} {r.seconds:>7.0f}s "
              f"{r.gradients:>10}")
    df["retrain_s"] = float(np.median(secs))
    df["subsets"], df["probes"], df["level"] = len(kept), len(items), per
    df["alpha"], df["drop"] = (math.nan, cfg.drop) if cfg.drop else (cfg.alpha, math.nan)
    write_csv_atomic(df, RunPaths(cfg.out_dir).tables / f"{lds_table_name(cfg)}.csv")
    return df


# -----------------------------------------------------------------------------
# validation 4: metasmoothness, the probe along random directions in weight space

def metagradient_slopes(path: str, dirs: np.ndarray) -> np.ndarray | None:
    """(R,) <g, d> of each direction d (R, steps, B), g = d mean probe / d w from --metagradient
    (.npy (steps, B) or (P, steps, B): the mean over P probes; or an .npz holding `dw`, the
    table prebias/magic.py saves); None without one."""
    if not path:
        return None
    try:
        obj = np.load(path, allow_pickle=False)
        g = obj["dw"] if hasattr(obj, "files") else obj
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"--metagradient={path} cannot be read ({type(e).__name__}): give a .npy of d probe / d w, "
                        "(steps, B) or (P, steps, B), or the .npz prebias/magic.py saves (with dw)") from None
    g = np.asarray(g, np.float64)
    g = g.mean(0) if g.ndim == 3 else g
    if g.shape != dirs.shape[1:] or not np.isfinite(g).all():
        raise UserError(f"--metagradient={path} holds {'non-finite values' if g.shape == dirs.shape[1:] else g.shape}"
                        f", not finite d probe / d w of shape {dirs.shape[1:]} (steps, B): it is another run's")
    return np.einsum("rsb,sb->r", dirs, g)


def step_window(cfg: AttributeConfig) -> tuple[int, int] | None:
    """--steps=a:b as (a, b), or None for every step."""
    return tuple(int(x) for x in cfg.steps.split(":")) if cfg.steps else None


def validate_smoothness(cfg: AttributeConfig, ctx: A.Context) -> pd.DataFrame:
    """Retrain at w = 1 +- eps d along --directions random directions d for every --eps and
    compare the probe's change with eps <g, d> (prebias/smoothness.py). With --steps=a:b the
    directions move only the occurrences of steps a..b-1 (their own retrains and table)."""
    traj, items = ctx.traj, ctx.probes
    eps = SM.parse_eps(cfg.eps)
    occ, window = np.asarray(traj.occurrences).reshape(-1, 2), step_window(cfg)
    if window:
        occ = occ[(occ[:, 0] >= window[0]) & (occ[:, 0] < window[1])]
        if not len(occ):
            raise UserError(f"--steps={cfg.steps}: no trained occurrence in steps {window[0]}..{window[1] - 1} of "
                            f"{traj.run.max_iters}")
    dirs = SM.directions(occ, traj.rec["batch_ids"][:traj.run.max_iters].shape, cfg.directions, cfg.seed)
    slope = metagradient_slopes(cfg.metagradient, dirs)
    base = base_loss(cfg, traj, items)
    specs = [(f"d{k}_{'p' if sg > 0 else 'm'}{e:g}", None, None, 1 + sg * e * dirs[k])
             for k in range(len(dirs)) for e in eps for sg in (1, -1)]
    tag = f"_steps{window[0]}-{window[1]}" if window else ""  # a window's retrains are its own
    outs = retrain_all(cfg, traj, f"smooth_s{cfg.seed}{tag}", specs)
    vals = np.array([float(measure(o, items).mean()) - base for o in outs]).reshape(len(dirs), len(eps), 2)
    table = SM.smoothness_table(eps, vals[..., 0], vals[..., 1], slope, cfg.tol)
    size = SM.first_order_size(table)
    table["first_order_size"] = table["direction"].map(size)
    table["retrain_s"] = float(np.median([retrain_seconds(o) for o in outs]))
    name = probe_name(cfg.probe) + tag
    write_csv_atomic(table, RunPaths(cfg.out_dir).tables / f"smoothness_{name}.csv")
    how = (f"{len(dirs)} random directions over {len(occ)} occurrences" +
           (f" (steps {window[0]}..{window[1] - 1} of {traj.run.max_iters})" if window else
            f", {traj.run.max_iters} steps") + f"; prediction from the {table['source'].iloc[0]}")
    SM.plot(table, cfg.tol, f"smoothness of the mean probe loss: {how}", RunPaths(cfg.out_dir).visualize /
            f"smoothness_{name}.png")
    print(f"smoothness: probe loss {base:.4f}; {how}")
    print(f"{'eps':>8} {'|change| median':>16} {'rel err median [max]':>24} {'curvature median':>17}")
    for e, part in table.groupby("eps"):
        print(f"{e:>8g} {part['measured_plus'].abs().median():>16.3e} {part['rel_err'].median():>12.3f} "
              f"[{part['rel_err'].max():.3f}] {part['curvature'].median():>17.3f}")
    print(f"first order (relative error <= {cfg.tol:g}) holds up to eps = {size.min():g} in every direction "
          f"(median over directions {size.median():g}); eps = 0.1 moves the weights as much as a 1% drop")
    for p in (RunPaths(cfg.out_dir).tables / f"smoothness_{name}.csv",
              RunPaths(cfg.out_dir).visualize / f"smoothness_{name}.png"):
        print(f"wrote {p}")
    return table


# -----------------------------------------------------------------------------
# validation 3: order-aware attribution, against retraining with the moved order

def random_moves(traj: A.Trajectory, n_moves: int, rows: int, frac: float, seed: int) -> list[np.ndarray]:
    """Each move: `rows` random kept (step, row) slots of the first frac of the steps swap
    their batches with as many of the last frac; the orders (steps, B)."""
    order = traj.rec["batch_ids"][:traj.run.max_iters]
    n = len(order)
    w = max(1, int(round(frac * n)))
    early = [(s, r) for s in range(w) for r in range(order.shape[1])]
    late = [(s, r) for s in range(n - w, n) for r in range(order.shape[1])]
    if len(early) < rows:
        raise UserError(f"--move_rows={rows}: the first {w} steps hold only {len(early)} batches")
    out = []
    for m in range(n_moves):
        rng = np.random.default_rng([seed, 0x6D6F7665, m])
        a = [early[i] for i in rng.choice(len(early), rows, replace=False)]
        b = [late[i] for i in rng.choice(len(late), rows, replace=False)]
        o = order.copy()
        for (s1, r1), (s2, r2) in zip(a, b):
            o[s1, r1], o[s2, r2] = order[s2, r2], order[s1, r1]
        out.append(o)
    return out


def moves_of(base: np.ndarray, new: np.ndarray) -> list[tuple[int, int, int]]:
    """[(batch id, old step, new step)] of every slot whose batch changed."""
    first = {}
    for s, row in enumerate(base):
        for b in row:
            first.setdefault(int(b), s)
    return [(int(new[s, r]), first[int(new[s, r])], int(s)) for s, r in zip(*np.nonzero(base != new))]


def corr_row(name: str, pred: np.ndarray, measured: np.ndarray, cfg, t0: float) -> dict:
    """One predictor's line of the order table: Pearson and Spearman of predicted against
    measured changes with their bootstrap intervals, and the seconds since t0."""
    p, s = A.bootstrap_corr(pred, measured, cfg.n_boot, cfg.seed), \
        A.bootstrap_corr(pred, measured, cfg.n_boot, cfg.seed, "spearman")
    return {"estimator": name, "pearson": p["r"], "pearson_lo": p["lo"], "pearson_hi": p["hi"],
            "spearman": s["r"], "spearman_lo": s["lo"], "spearman_hi": s["hi"], "seconds": time.perf_counter() - t0}


def validate_order(cfg: AttributeConfig, ctx: A.Context) -> pd.DataFrame:
    traj, items = ctx.traj, ctx.probes
    if len(traj.rec["insertions"]) or len(traj.rec["masked_rows"]) or len(traj.rec["weighted_rows"]):
        raise UserError("--validate=order moves untagged, unmasked batches: use a run without tags, a mask or weights")
    orders = random_moves(traj, cfg.moves, cfg.move_rows, cfg.move_frac, cfg.seed)
    group = f"order_r{cfg.move_rows}_f{cfg.move_frac:g}_s{cfg.seed}"
    outs = retrain_all(cfg, traj, group, [(f"move{m:03d}", None, o) for m, o in enumerate(orders)])
    base = base_loss(cfg, traj, items)
    measured = np.array([float(measure(o, items).mean()) - base for o in outs])
    kinds = {"tracin": "plain", "tracin_adam": "adam"}
    if not traj.preconditioner_available():
        kinds.pop("tracin_adam")
    table = pd.DataFrame({"move": range(len(orders)), "measured": measured})
    rows = []
    for name, kind in kinds.items():
        t0 = time.perf_counter()
        pred = np.array([A.move_effect(ctx, moves_of(traj.rec["batch_ids"], o), kind).mean()
                         for o in tqdm(orders, desc=f"order predictions ({name})", unit="move")])
        table[f"predicted_{name}"] = pred
        rows.append(corr_row(name, pred, measured, cfg, t0))
    t0 = time.perf_counter()
    # propagated as SGD: the linearised AdamW run (frozen moments, even damped by their median)
    # overflows within ~100 steps on the bench runs (Adam trains at its edge of stability)
    pred = A.move_effect_unrolled(ctx, [moves_of(traj.rec["batch_ids"], o) for o in orders], adam=False)
    table["predicted_unrolled"] = pred
    rows.append(corr_row("unrolled", pred, measured, cfg, t0))
    if "magic" in estimator_list(cfg):  # exact to first order, one reverse pass (prebias/magic.py)
        t0 = time.perf_counter()
        pred = magic.move_effect_magic(ctx, [moves_of(traj.rec["batch_ids"], o) for o in orders])
        table["predicted_magic"] = pred
        rows.append(corr_row("magic", pred, measured, cfg, t0))
    res = pd.DataFrame(rows)
    print(f"order: {len(orders)} moves of {cfg.move_rows} batches each way between the first and last "
          f"{cfg.move_frac:g} of {traj.run.max_iters} steps; measured change of the probe loss "
          f"{measured.mean():+.5f} on average (sd {measured.std():.5f})")
    for r in res.itertuples():
        print(f"  {r.estimator:<12} Pearson {r.pearson:+.3f} [{r.pearson_lo:+.3f}, {r.pearson_hi:+.3f}]  "
              f"Spearman {r.spearman:+.3f} [{r.spearman_lo:+.3f}, {r.spearman_hi:+.3f}]  ({r.seconds:.0f} s)")
    write_csv_atomic(table, RunPaths(cfg.out_dir).tables / f"order_{probe_name(cfg.probe)}_moves.csv")
    write_csv_atomic(res, RunPaths(cfg.out_dir).tables / f"order_{probe_name(cfg.probe)}.csv")
    return res


def main(argv=None):
    cfg = parse_config(AttributeConfig(), sys.argv[1:] if argv is None else argv)
    check(cfg)
    if cfg.validate in ("lds", "order", "smoothness"):
        if cfg.probe.startswith("metric:"):
            raise UserError(f"--validate={cfg.validate} measures a probe loss: use val, text:<...> or tag:<id>")
        ctx, _ = context(cfg)
        return {"lds": validate_lds, "order": validate_order, "smoothness": validate_smoothness}[cfg.validate](cfg, ctx)
    ctx, how = context(cfg)
    S, _ = A.run_estimator(cfg.estimator, ctx)
    df, _ = report(cfg, influence_table(ctx, S), how, ctx.traj)
    if cfg.validate == "topk":
        if cfg.probe.startswith("metric:"):
            raise UserError("--validate measures a probe loss: use val, text:<...> or tag:<id>")
        validate_topk(cfg, ctx, df)
    return df


if __name__ == "__main__":
    main_guard(main)
