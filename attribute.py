"""
Which training batches pushed a behaviour? TracIn-CP (Pruthi et al. 2020) over the run's
own record: every checkpoint's interval lists exactly which batches were trained at which
step, so the influence of batch z on a probe z' is

    I(z, z') = sum over intervals k, over the steps s of k that trained z (repeats count):
               lr_s * < P grad loss(z'; theta_k), P grad loss(z; theta_k) >

with theta_k the checkpoint that starts interval k (the parameters its first step used),
lr_s the learning rate of step s (schedule.get_lr) and P a seeded random projection to d
dimensions (Gaussian or Rademacher entries of variance 1/d, generated block by block, as
TRAK and LoGra project), so <Pa, Pb> estimates <a, b>. Positive influence: a gradient step
on z lowered the probe's loss (a proponent); negative: it raised it (an opponent). The
optimizer was AdamW, not SGD: like every TracIn on Adam runs, this ignores the moment
estimates. Per-batch gradients are of the batch window as trained (tags applied) and are
cached per checkpoint; --d=0 uses the exact gradients (small models only).

$ python attribute.py --out_dir=out --probe=val
$ python attribute.py --out_dir=out --probe='text:Once upon a time, there was a little dog'
$ python attribute.py --out_dir=out/canary --probe=tag:secret
$ python attribute.py --out_dir=out --probe=metric:sentiment      # needs eval.py's tables
$ python attribute.py --out_dir=out --probe=val --validate=True --k=50

Probes: val (mean loss of the first n_val validation batches), text:<text>, tag:<id> (a
canary's secret given its prefix), metric:<name> (a differentiable proxy: the loss of the
last checkpoint's eval generations in the top quarter by that metric).
Outputs: <out_dir>/tables/influence_<probe>.csv (batch_id, influence, n_trained, n_tagged:
how many of its trained rows carried a tag, batch metrics), influence_<probe>_corr.csv (Spearman correlation with each batch metric),
<out_dir>/visualize/influence_<probe>.png, and the top and bottom batches' text on stdout.
--validate retrains from the same seed without the k most helpful batches, and without k
random ones (n_random draws), and reports the change of the probe loss at the end: the
ratio of the top-k effect to the mean random-k effect, with a 95% interval.
"""

import hashlib
import math
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prebias import batchmetrics
from prebias import tags as tagmod
from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint, run_config, stream_records
from prebias.common import (DoneRecord, UserError, atomic_path, config_to_argv, file_signature, main_guard,
                            parse_config, save_figure, write_csv_atomic)
from prebias.data import BOS_ID, BatchData, window_texts
from prebias.schedule import get_lr
from prebias.stream import trained_windows
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
@dataclass
class AttributeConfig:
    out_dir: str = "out"
    probe: str = "val"  # val | text:<text> | tag:<id> | metric:<name>
    d: int = 2048  # projection dimension (0: exact gradients)
    proj: str = "rademacher"  # rademacher | gaussian
    seed: int = 0  # the projection's seed
    n_val: int = 8  # val probe: validation batches
    chunk: int = 0  # batches whose gradients are projected together (0: as many as fit in ~1 GiB)
    top: int = 5  # batches shown at each end
    validate: bool = False
    k: int = 50  # validate: batches left out
    n_random: int = 3  # validate: random draws
# -----------------------------------------------------------------------------

PROBE = re.compile(r"^(val|text:.+|tag:.+|metric:.+)$", re.S)


class Projector:
    """x (m, n_params) -> (m, d), P generated per parameter block from a seeded
    generator (never the whole d x n_params matrix at once)."""

    def __init__(self, sizes: list[int], d: int, kind: str, seed: int):
        self.sizes, self.d, self.kind, self.seed = sizes, d, kind, seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.d == 0:
            return x
        out = torch.zeros(x.shape[0], self.d, dtype=torch.float64)
        at = 0
        for b, n in enumerate(self.sizes):
            step = max(256, (1 << 22) // self.d)  # a block of P holds at most 4M entries (32 MB)
            for c0 in range(0, n, step):
                c1 = min(n, c0 + step)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + b * 7919 + c0)
                if self.kind == "gaussian":
                    P = torch.randn(c1 - c0, self.d, generator=g, dtype=torch.float64)
                else:
                    P = torch.randint(0, 2, (c1 - c0, self.d), generator=g).to(torch.float64) * 2 - 1
                out += x[:, at + c0:at + c1].double() @ P
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
    w = torch.from_numpy(windows)
    return torch.stack([flat_grad(model, w[i:i + 1, :-1], w[i:i + 1, 1:]) for i in range(len(w))])


# -----------------------------------------------------------------------------
# probes

def probe_grad(model, cfg: AttributeConfig, run, data: BatchData, enc, rec: dict) -> tuple[torch.Tensor, str]:
    kind, _, arg = cfg.probe.partition(":")
    model.train(False)
    if kind == "val":
        w = torch.from_numpy(data.windows(data.val_ids[:cfg.n_val]))
        return flat_grad(model, w[:, :-1], w[:, 1:]), f"mean loss of the first {cfg.n_val} validation batches"
    if kind == "text":
        toks = [BOS_ID, *enc.encode(arg, bos=False)][:run.max_seq_len + 1]
        if len(toks) < 2:
            raise UserError(f"--probe={cfg.probe}: the text has no tokens")
        t = torch.tensor([toks])
        return flat_grad(model, t[:, :-1], t[:, 1:]), f"loss of the text {arg!r}"
    if kind == "tag":
        if not rec["tags"]:
            raise UserError(f"--probe={cfg.probe}: {cfg.out_dir} was trained without tags")
        tag = tagmod.tags_from_json(rec["tags"], enc, run.max_seq_len, run.vocab_size).by_id(arg)
        if tag.kind != "canary" or not len(tag.secret_tokens):
            raise UserError(f"--probe={cfg.probe}: tag {arg!r} is not a canary with a secret")
        toks = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
        weight = torch.zeros(1, toks.shape[1] - 1)
        weight[0, -len(tag.secret_tokens):] = 1  # only the secret, given BOS + prefix
        return flat_grad(model, toks[:, :-1], toks[:, 1:], weight), f"loss of tag {arg}'s secret given its prefix"
    # metric: the top quarter of the last checkpoint's greedy generations by that metric
    table = Path(cfg.out_dir) / "tables" / "eval_outputs.csv"
    if not table.exists():
        raise UserError(f"--probe={cfg.probe} needs {table}: run python eval.py --out_dir={cfg.out_dir} first")
    out = pd.read_csv(table, keep_default_na=False, na_values=[""])
    if arg not in out.columns:
        raise UserError(f"--probe={cfg.probe}: {arg!r} is not a column of {table}")
    last = out[(out["iter"] == out["iter"].max()) & (out["decoding"] == "greedy")].dropna(subset=[arg])
    top = last.sort_values(arg, ascending=False).head(max(1, len(last) // 4))
    g = None
    for prompt, gen in zip(top["prompt"], top["generated"]):
        toks = [BOS_ID, *enc.encode(str(prompt) + str(gen), bos=False)][:run.max_seq_len + 1]
        t = torch.tensor([toks])
        gi = flat_grad(model, t[:, :-1], t[:, 1:])
        g = gi if g is None else g + gi
    return g / len(top), (f"proxy: mean loss of the {len(top)} generations of step {int(last['iter'].max())} "
                           f"with the highest {arg}")


# -----------------------------------------------------------------------------

def intervals(out_dir):
    """[(start checkpoint path, start iter, steps (n,), ids (n, B))] for every checkpoint
    whose interval trained something."""
    found = list_checkpoints(out_dir)
    res = []
    for (it0, p0), (it1, p1) in zip(found, found[1:]):
        ids = load_checkpoint(p1)["batch_ids"].numpy()
        if len(ids):
            res.append((p0, it0, np.arange(it0, it1), ids))
    return res


def versions(steps, ids, data, rec) -> tuple[list, list, list]:
    """The distinct trained windows of an interval (the same id may come with and without
    a tag): (keys (id, hash), windows, the key of every (step, row))."""
    keys, wins, seen, per_row = [], [], {}, []
    for s, row in zip(steps, ids):
        for bid, win in zip(row, trained_windows(data, row, int(s), rec)):
            h = (int(bid), hashlib.sha1(win.tobytes()).hexdigest())
            if h not in seen:
                seen[h] = len(keys)
                keys.append(h)
                wins.append(win)
            per_row.append(seen[h])
    return keys, wins, per_row


def projected_interval(cfg, model, p0, wins, proj, cache_dir) -> np.ndarray:
    """The projected gradients (u, d) of an interval's distinct windows, cached."""
    settings = {"d": cfg.d, "proj": cfg.proj, "seed": cfg.seed, "version": 2}  # bump when P changes
    done = DoneRecord(cache_dir / "done.json", settings)
    path = cache_dir / f"{Path(p0).stem}.npz"
    stack = np.stack(wins)
    if done.is_done(Path(p0).stem, file_signature(p0), path):
        with np.load(path) as z:
            if np.array_equal(z["windows"], stack):
                return z["grads"]
    # the projection's random blocks are generated once per chunk: large chunks amortise them
    n_params = sum(p.numel() for p in model.parameters())
    chunk = cfg.chunk or int(min(1024, max(16, (1 << 28) // n_params)))
    grads = np.concatenate([proj(batch_grads(model, stack[c:c + chunk])).numpy()
                            for c in range(0, len(stack), chunk)])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, grads=grads, windows=stack)
    done.mark(Path(p0).stem, file_signature(p0), save=True)
    return grads


def influence(cfg: AttributeConfig) -> tuple[pd.DataFrame, str]:
    if not PROBE.match(cfg.probe):
        raise UserError(f"--probe={cfg.probe!r}: use val, text:<text>, tag:<id> or metric:<name>")
    if cfg.d < 0 or cfg.proj not in ("rademacher", "gaussian"):
        raise UserError(f"--d={cfg.d} --proj={cfg.proj}: d >= 0 (0 = exact), proj rademacher or gaussian")
    run = types.SimpleNamespace(**run_config(cfg.out_dir))
    data = BatchData(run.data_dir, run.vocab_size, run.max_seq_len)
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    rec = stream_records(cfg.out_dir)
    cache = Path(cfg.out_dir) / "attribution" / "cache"
    total, count, tagged, how = {}, {}, {}, ""
    ins = rec["insertions"]
    tagged_rows = {(int(a), int(b)) for a, b in ins[:, :2]} if len(ins) else set()
    for p0, it0, steps, ids in intervals(cfg.out_dir):
        model = model_from_checkpoint(load_checkpoint(p0))
        sizes = [p.numel() for p in model.parameters()]
        proj = Projector(sizes, cfg.d, cfg.proj, cfg.seed)
        keys, wins, per_row = versions(steps, ids, data, rec)
        G = projected_interval(cfg, model, p0, wins, proj, cache)
        g, how = probe_grad(model, cfg, run, data, enc, rec)
        dots = G @ proj(g[None]).numpy()[0]  # (u,): one per distinct window
        at = 0
        for s, row in zip(steps, ids):  # every (step, row) as recorded: repeats count
            lr = get_lr(int(s), run)
            for r, bid in enumerate(row):
                total[int(bid)] = total.get(int(bid), 0.0) + lr * float(dots[per_row[at]])
                count[int(bid)] = count.get(int(bid), 0) + 1
                tagged[int(bid)] = tagged.get(int(bid), 0) + ((int(s), r) in tagged_rows)
                at += 1
    if not total:
        raise UserError(f"{cfg.out_dir} has no trained interval (only a step-0 checkpoint?)")
    df = pd.DataFrame({"batch_id": list(total), "influence": list(total.values()),
                       "n_trained": [count[b] for b in total], "n_tagged": [tagged[b] for b in total]}
                      ).sort_values("influence", ascending=False)
    return df.reset_index(drop=True), how


def probe_name(probe: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", probe)[:60].strip("_")


def report(cfg: AttributeConfig, df: pd.DataFrame, how: str):
    run = types.SimpleNamespace(**run_config(cfg.out_dir))
    data = BatchData(run.data_dir, run.vocab_size, run.max_seq_len)
    tables = Path(cfg.out_dir) / "tables"
    name = probe_name(cfg.probe)
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
    print(f"probe: {how}; {len(df)} batches, d={cfg.d or 'exact'} ({cfg.proj})")
    for label, part in (("most helpful", df.head(cfg.top)), ("most harmful", df.tail(cfg.top)[::-1])):
        print(f"-- {label}:")
        for bid, inf, nt, text in zip(part["batch_id"], part["influence"], part["n_tagged"],
                                      window_texts(list(data.windows(part["batch_id"].to_numpy())), enc)):
            mark = f" [trained with a tag {nt}x]" if nt else ""
            print(f"  batch_id:{bid} influence:{inf:+.3e}{mark} | {text.replace(chr(10), ' | ')[:140]}")
    if len(corr):
        print("-- Spearman correlation of influence with batch metrics: " +
              ", ".join(f"{r.metric} {r.spearman:+.2f}" for r in corr.head(6).itertuples()))
    plot(df, corr, how, Path(cfg.out_dir) / "visualize" / f"influence_{name}.png")
    for p in (tables / f"influence_{name}.csv", tables / f"influence_{name}_corr.csv",
              Path(cfg.out_dir) / "visualize" / f"influence_{name}.png"):
        print(f"wrote {p}")
    return df, corr


def plot(df, corr, how, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(df["influence"], bins=50, color="tab:blue")
    a.axvline(0, color="0.4", lw=0.8)
    a.set_xlabel("TracIn influence on the probe (> 0: training on it lowered the probe loss)")
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
# validation by retraining

def probe_loss(out_dir, cfg: AttributeConfig) -> float:
    """The probe's loss at a run's last checkpoint."""
    run = types.SimpleNamespace(**run_config(out_dir))
    data = BatchData(run.data_dir, run.vocab_size, run.max_seq_len)
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    model = model_from_checkpoint(load_checkpoint(list_checkpoints(out_dir)[-1][1]))
    rec = stream_records(cfg.out_dir)
    kind, _, arg = cfg.probe.partition(":")
    with torch.no_grad():
        if kind == "val":
            w = torch.from_numpy(data.windows(data.val_ids[:cfg.n_val]))
            return float(model(w[:, :-1], w[:, 1:])[1])
        if kind == "tag":
            tag = tagmod.tags_from_json(rec["tags"], enc, run.max_seq_len, run.vocab_size).by_id(arg)
            t = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
            ce = torch.nn.functional.cross_entropy(model(t[:, :-1])[0].transpose(1, 2), t[:, 1:], reduction="none")
            return float(ce[0, -len(tag.secret_tokens):].mean())
        toks = torch.tensor([[BOS_ID, *enc.encode(arg, bos=False)]])
        return float(model(toks[:, :-1], toks[:, 1:])[1])


def retrain(cfg: AttributeConfig, name: str, leave_out: np.ndarray) -> float:
    run = run_config(cfg.out_dir)
    out = Path(cfg.out_dir) / "attribution" / "validate" / probe_name(cfg.probe) / name
    ids_path = out.with_suffix(".npy")
    if not list_checkpoints(out) or list_checkpoints(out)[-1][0] != run["max_iters"]:
        ids_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(ids_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(leave_out, np.int64), allow_pickle=False)
        skip = {"out_dir", "init_from", "show_batches", "model_bin", "wandb_log", "schedule_exclude"}
        args = config_to_argv({k: v for k, v in run.items() if k not in skip})
        resume = ["--init_from=resume"] if list_checkpoints(out) else []
        res = subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *args, f"--out_dir={out}",
                              "--model_bin=none", f"--schedule_exclude={ids_path}", *resume],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"retraining {name} failed: {res.stderr.strip().splitlines()[-1] if res.stderr else ''}")
    return probe_loss(out, cfg)


def validate(cfg: AttributeConfig, df: pd.DataFrame) -> dict:
    if cfg.probe.startswith("metric:"):
        raise UserError("--validate measures a probe loss: use val, text:<...> or tag:<id>")
    base = probe_loss(cfg.out_dir, cfg)
    k = min(cfg.k, len(df) // 2)
    top = retrain(cfg, "top", df["batch_id"].to_numpy()[:k]) - base
    rng = np.random.default_rng([cfg.seed, 0x76616C])
    rand = [retrain(cfg, f"random{r}", rng.choice(df["batch_id"].to_numpy(), k, replace=False)) - base
            for r in range(cfg.n_random)]
    m = float(np.mean(rand))
    h = (float(np.std(rand, ddof=1)) * _t975(len(rand) - 1) / math.sqrt(len(rand))) if len(rand) > 1 else math.nan
    res = {"k": k, "probe_loss": base, "top_effect": top, "random_effects": rand, "random_mean": m,
           "random_lo": m - h, "random_hi": m + h, "ratio": top / m if m else math.nan}
    print(f"validation: probe loss {base:.4f}; without the {k} most helpful batches {top:+.4f}, without {k} random "
          f"ones {m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] over {len(rand)} draws: ratio {res['ratio']:.2f}"
          + ("" if top > max(rand) else " (no better than random: the top-k effect is within the random ones)"))
    write_csv_atomic(pd.DataFrame([{**res, "random_effects": " ".join(f"{r:.6f}" for r in rand)}]),
                     Path(cfg.out_dir) / "tables" / f"influence_{probe_name(cfg.probe)}_validation.csv")
    return res


def _t975(dof: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, dof))


def main(argv=None):
    cfg = parse_config(AttributeConfig(), sys.argv[1:] if argv is None else argv)
    df, how = influence(cfg)
    df, _ = report(cfg, df, how)
    if cfg.validate:
        validate(cfg, df)
    return df


if __name__ == "__main__":
    main_guard(main)
