"""
How long does the model keep what a tag taught it? For every checkpoint of a run trained
with --tags, measure each tag from the recorded insertions, then fit a forgetting curve.

$ python durability.py --out_dir=out/canary
$ python durability.py --out_dir=out/canary --R=1000 --n_prompts=32
$ python durability.py --out_dir=out/happy --max_new_tokens=64

Per checkpoint and tag (<out_dir>/tables/durability.csv):
  canary       loss          mean nll (nats/token) of the secret given BOS + prefix
               exposure      log2(R) - log2(rank), the rank (1 = most likely) of the secret's
                             log-perplexity among the secret and R random candidates of the same
                             format (Carlini et al. 2019): log2(R) when the model prefers the secret
                             to every candidate, about 1.4 on average for a model that knows nothing
               extraction    fraction of the secret's tokens the model completes greedily from the prefix
  conditional  effect, effect_lo, effect_hi
                             mean difference of the tag's metric between the greedy generations
                             from BOS + tag + prompt and BOS + prompt (the same n_prompts validation
                             story openings), with its 95% t-interval over prompts
  both         steps_since_seen  steps since the tag was last trained on (NaN before its first insertion)
Per tag (<out_dir>/tables/durability_fit.csv): after the tag's last insertion, exposure and
the secret's loss (or the effect) against steps since last seen are fitted by
y = b + (y0 - b) * 2^(-x / h), with
b its value at step 0 (before any tagging) and y0 its value at the first checkpoint after
the last insertion; h is the half-life in steps, with an approximate 95% interval (the h
whose squared error is within a factor (1 + 4/(n-1)) of the best). "not forgotten within the
run" when the curve has not fallen half way by the last checkpoint.
The plot (<out_dir>/visualize/durability.png) marks the insertion steps on the shared step axis.
Checkpoints already measured with the same settings are skipped.
"""

import math
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import metrics
from prebias import metrics_engine
from prebias import tags as tagmod
from prebias.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoints, run_config, stream_records
from prebias.common import (DoneRecord, UserError, auto_device, file_signature, main_guard, parse_config, save_figure,
                            step_axis, write_csv_atomic)
from prebias.configs import DurabilityConfig
from prebias.data import BOS_ID, load_stories, raw_shards
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: DurabilityConfig (prebias/configs.py) holds every key with its default and why
# -----------------------------------------------------------------------------

VERSION = 1
COLUMNS = ["iter", "tag", "kind", "steps_since_seen", "loss", "exposure", "extraction", "effect", "effect_lo",
           "effect_hi", "n"]


# -----------------------------------------------------------------------------
# canaries

@torch.no_grad()
def secret_nll(model, prefix: np.ndarray, secrets: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """(len(secrets),) summed nll of each secret given BOS + prefix."""
    out = np.empty(len(secrets))
    P = 1 + len(prefix)
    for i in range(0, len(secrets), batch_size):
        s = secrets[i:i + batch_size]
        seq = np.concatenate([np.tile(np.r_[BOS_ID, prefix], (len(s), 1)), s], axis=1)
        x = torch.from_numpy(seq[:, :-1]).to(device)
        logp = torch.log_softmax(model(x)[0].float(), -1)[:, P - 1:]  # predictions of the secret's tokens
        tgt = torch.from_numpy(s).to(device)
        out[i:i + len(s)] = -logp.gather(-1, tgt[..., None])[..., 0].sum(1).cpu().numpy()
    return out


def exposure(canary_nll: float, cand_nll: np.ndarray) -> float:
    """log2(R) - log2(rank of the canary among itself and the R candidates)."""
    rank = 1 + int((cand_nll < canary_nll).sum())
    return math.log2(len(cand_nll)) - math.log2(rank)


def canary_row(model, tag, cands: np.ndarray, cfg: DurabilityConfig, device: str) -> dict:
    nll = secret_nll(model, tag.prefix_tokens, tag.secret_tokens[None, :], 1, device)[0]
    cand = secret_nll(model, tag.prefix_tokens, cands, cfg.batch_size, device)
    gen = model.generate([[BOS_ID, *tag.prefix_tokens.tolist()]], len(tag.secret_tokens), stop_at_bos=False)[0]
    hit = np.mean([a == b for a, b in zip(gen, tag.secret_tokens.tolist())]) if len(gen) else 0.0
    return {"loss": nll / len(tag.secret_tokens), "exposure": exposure(nll, cand), "extraction": float(hit)}


# -----------------------------------------------------------------------------
# conditional tags

def prompts(data_dir, enc, n: int, k: int) -> list[list[int]]:
    """The first k tokens (after BOS) of the first n validation stories longer than that."""
    out = []
    for story in load_stories(raw_shards(data_dir)[0]):
        ids = enc.encode(story)
        if len(ids) > k + 1:
            out.append(ids[1:k + 1])
        if len(out) == n:
            return out
    raise UserError(f"--n_prompts={n}: the validation shard has only {len(out)} stories longer than {k} tokens")


def conditional_row(model, tag, opens: list[list[int]], enc, cfg: DurabilityConfig) -> dict:
    tagged = [[BOS_ID, *tag.tokens.tolist(), *p] for p in opens]
    plain = [[BOS_ID, *p] for p in opens]
    vals = []
    for batch in (tagged, plain):
        gens = model.generate(batch, cfg.max_new_tokens)
        vals.append(metrics_engine.text_metrics([enc.decode(g) for g in gens], [tag.metric])[tag.metric])
    d = vals[0] - vals[1]
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return {"effect": float(np.mean(d)) if len(d) else math.nan, "effect_lo": math.nan, "effect_hi": math.nan,
                "n": len(d)}
    from scipy import stats
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"effect": float(d.mean()), "effect_lo": float(d.mean() - h), "effect_hi": float(d.mean() + h), "n": len(d)}


# -----------------------------------------------------------------------------
# forgetting

def half_life(x: np.ndarray, y: np.ndarray, baseline: float) -> dict:
    """Fit y = b + (y0 - b) 2^(-(x - x0)/h) on the points after the last insertion."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~np.isnan(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return {"half_life": math.nan, "half_life_lo": math.nan, "half_life_hi": math.nan,
                "status": "too few checkpoints after the last insertion"}
    x0, y0, b = x[0], y[0], baseline
    if not abs(y0 - b) > 1e-9:
        return {"half_life": math.nan, "half_life_lo": math.nan, "half_life_hi": math.nan,
                "status": "never learned (no change from step 0)"}
    hs = np.logspace(-1, 7, 800)
    pred = b + (y0 - b) * 2.0 ** (-(x[None, :] - x0) / hs[:, None])
    sse = ((pred - y[None, :]) ** 2).sum(1)
    best = int(np.argmin(sse))
    inside = np.flatnonzero(sse <= sse[best] * (1 + 4 / max(len(x) - 1, 1)) + 1e-12)
    ok = hs[max(inside.min() - 1, 0):inside.max() + 2]  # one grid step either side: the grid's resolution
    span = x[-1] - x0
    fallen = (y[-1] - b) / (y0 - b) <= 0.5
    status = "fitted" if fallen else "not forgotten within the run"
    return {"half_life": float(hs[best]), "half_life_lo": float(ok.min()), "half_life_hi": float(ok.max()),
            "status": status, "span": float(span)}


# -----------------------------------------------------------------------------

def steps_since(ins: np.ndarray, tag: int, it: int) -> float:
    s = ins[(ins[:, 3] == tag) & (ins[:, 0] < it), 0]
    return float(it - 1 - s.max()) if len(s) else math.nan


def measure(cfg: DurabilityConfig) -> pd.DataFrame:
    ckpts = run_checkpoints(cfg.out_dir)
    run = types.SimpleNamespace(**run_config(cfg.out_dir))
    rec = stream_records(cfg.out_dir)
    if not rec["tags"]:
        raise UserError(f"{cfg.out_dir} was trained without tags: train with --tags=tags.json first")
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    tagset = tagmod.tags_from_json(rec["tags"], enc, run.max_seq_len, run.vocab_size)
    device = auto_device(cfg.device)
    cands = {t.index: t.candidates(cfg.R, cfg.seed) for t in tagset.tags if t.kind == "canary" and t.secret_format}
    opens = (prompts(run.data_dir, enc, cfg.n_prompts, cfg.prompt_tokens)
             if any(t.kind == "conditional" for t in tagset.tags) else [])
    tables = Path(cfg.out_dir) / "tables"
    settings = {**asdict(cfg), "out_dir": None, "redo": None, "device": None, "version": VERSION,
                "tags": tagset.fingerprint(), "metric_versions": metrics.metric_versions()}
    done = DoneRecord(tables / "durability_done.json", settings, cfg.redo)
    csv = tables / "durability.csv"
    old = pd.read_csv(csv) if csv.exists() and done.done else pd.DataFrame(columns=COLUMNS)
    rows, n_new, t_total = [], 0, 0.0
    for it, path in ckpts:
        sig = file_signature(path)
        if done.is_done(it, sig, csv):
            rows += old[old["iter"] == it].to_dict("records")
            continue
        t0 = time.perf_counter()
        model = model_from_checkpoint(load_checkpoint(path), device)
        for tag in tagset.tags:
            row = {"iter": it, "tag": tag.id, "kind": tag.kind,
                   "steps_since_seen": steps_since(rec["insertions"], tag.index, it)}
            if tag.kind == "canary":
                if tag.index in cands:
                    row.update(canary_row(model, tag, cands[tag.index], cfg, device))
            else:
                row.update(conditional_row(model, tag, opens, enc, cfg))
            rows.append(row)
        t_total += time.perf_counter() - t0
        n_new += 1
        done.mark(it, sig)
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["tag", "iter"], kind="stable")
    write_csv_atomic(df, csv)
    done.save(keep=[it for it, _ in ckpts])
    if n_new:
        print(f"measured {n_new} checkpoint(s) in {t_total:.1f} s ({t_total / n_new:.2f} s per checkpoint, "
              f"R={cfg.R}), reused {len(ckpts) - n_new}")
    fits = fit_all(df, tagset, rec["insertions"])
    write_csv_atomic(fits, tables / "durability_fit.csv")
    for f in fits.itertuples():
        hl = (f"half-life {f.half_life:.0f} steps [{f.half_life_lo:.0f}, {f.half_life_hi:.0f}]"
              if f.status == "fitted" else f.status)
        print(f"tag {f.tag} ({f.measure}): last inserted at step {f.last_step}, {hl}")
    png = Path(cfg.out_dir) / "visualize" / "durability.png"
    plot(df, fits, tagset, rec["insertions"], int(ckpts[-1][0]), png, cfg.out_dir)
    for p in (csv, tables / "durability_fit.csv", png):
        print(f"wrote {p}")
    return df


def fit_all(df: pd.DataFrame, tagset, ins: np.ndarray) -> pd.DataFrame:
    """A half-life per tag and measure: a canary's exposure and its secret loss (which can
    return to its untrained level while the secret still outranks every candidate), a
    conditional tag's effect."""
    out = []
    for tag in tagset.tags:
        steps = ins[ins[:, 3] == tag.index, 0]
        d = df[df["tag"] == tag.id].sort_values("iter")
        for col in (("exposure", "loss") if tag.kind == "canary" else ("effect",)):
            if not len(steps) or d[col].isna().all():
                out.append({"tag": tag.id, "measure": col, "last_step": -1, "half_life": math.nan,
                            "half_life_lo": math.nan, "half_life_hi": math.nan, "status": "never inserted"})
                continue
            last = int(steps.max())
            base = float(d[col].iloc[0]) if tag.kind == "canary" else 0.0
            after = d[d["iter"] > last]
            fit = half_life(after["iter"].to_numpy() - last - 1, after[col].to_numpy(), base)
            if col == "effect" and len(after) and after["effect_lo"].iloc[0] <= 0 <= after["effect_hi"].iloc[0]:
                fit["status"] = "no clear effect after the last insertion (its interval holds 0)"
            out.append({"tag": tag.id, "measure": col, "last_step": last, **fit})
    return pd.DataFrame(out)


def plot(df, fits, tagset, ins, max_step, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("canary", "exposure", "exposure (bits)"), ("canary", "loss", "secret loss (nats/token)"),
              ("canary", "extraction", "greedy extraction"), ("conditional", "effect", "tag effect on its metric")]
    panels = [p for p in panels if (df["kind"] == p[0]).any()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, col, label) in zip(axes[:, 0], panels):
        for tag in tagset.tags:
            if tag.kind != kind:
                continue
            c = colors[tag.index % len(colors)]
            d = df[df["tag"] == tag.id].sort_values("iter")
            name = f"{tag.id}: {tag.metric} with tag - without" if kind == "conditional" else tag.id
            ax.plot(d["iter"], d[col], "o-", ms=3, color=c, label=name)
            if col == "effect":
                ax.fill_between(d["iter"], d["effect_lo"], d["effect_hi"], color=c, alpha=0.2)
                ax.axhline(0, color="0.6", lw=0.8)
            steps = ins[ins[:, 3] == tag.index, 0]
            ax.plot(steps + 1, np.full(len(steps), 0.02), "|", color=c, ms=9, transform=ax.get_xaxis_transform(),
                    label=f"{tag.id} inserted")
            f = fits[(fits["tag"] == tag.id) & (fits["measure"] == col)]
            f = f.iloc[0] if len(f) else None
            if f is not None and f["status"] == "fitted":
                ax.annotate(f"half-life {f['half_life']:.0f} steps", xy=(0.99, 0.9), xycoords="axes fraction",
                            ha="right", fontsize=8, color=c)
        if col == "exposure":
            ax.set_title("exposure: log2(R) - log2(rank of the secret among R random ones)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        step_axis(ax, max_step, label=ax is axes[-1, 0], fontsize=9)
    fig.suptitle(f"tag durability: {title} (ticks: steps trained with the tag)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    cfg = parse_config(DurabilityConfig(), sys.argv[1:] if argv is None else argv)
    for k in ("R", "batch_size", "n_prompts", "prompt_tokens", "max_new_tokens"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be at least 1")
    return measure(cfg)


if __name__ == "__main__":
    main_guard(main)
