"""
Attention maps of every checkpoint of a run, and how each head changes over training.

$ python visualize_attn.py                                  # run folder out/
$ python visualize_attn.py --out_dir=out/shuffle_s2         # another run
$ python visualize_attn.py --probe="Tom saw a big dog. He" --probe_tokens=16
$ python visualize_attn.py --redo=True                      # redraw every checkpoint

Writes, for a run folder <out_dir>:
  visualize/attn/attn_<iter>.png   one per checkpoint: a layers x heads grid of the
                                   attention probabilities on the probe (row = query
                                   token, column = key token it attends to)
  visualize/attn_over_training.png per head vs training step: entropy, mean attention
                                   distance, share of attention to BOS and to the
                                   previous token; one line per head, a column per layer
  tables/attn_entropy.csv          the numbers of that figure, one row per
                                   (iter, layer, head):
      entropy          mean over query positions of -sum_j p_ij ln p_ij, in nats
                       (query 0 sees only itself and counts as 0); in [0, ln T]
      entropy_uniform  the same for uniform causal attention (query i spreads 1/(i+1)
                       over its i+1 keys): the largest value the entropy can take here
      distance         mean over queries of sum_j p_ij (i - j), in tokens
      bos_share        mean over queries 1..T-1 of p_i0 (attention to the BOS token)
      prev_share       mean over queries 1..T-1 of p_i,i-1 (previous-token heads)
      self_share       mean over queries 1..T-1 of p_ii

The probe is the opening of the first story of the validation shard (shard 0, never
trained on), or --probe text; it is tokenised with the run's tokenizer, BOS first, and
cut to probe_tokens tokens so that the token labels stay readable.

A checkpoint is skipped when its PNG exists, visualize/attn/settings.json says it was
drawn with the same settings from the same checkpoint file, and the CSV holds its rows.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from prebias.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoints, run_config
from prebias.common import (DoneRecord, UserError, file_signature, main_guard, parse_config, save_figure, step_axis,
                            write_csv_atomic)
from prebias.data import load_stories, raw_shards
from prebias.paths import RunPaths
from tokenizer import Tokenizer, piece_label


# -----------------------------------------------------------------------------
# config (every field can be set with --key=value)
@dataclass
class AttnConfig:
    out_dir: str = "out"  # the run folder (config.json, ckpt/)
    data_dir: str = ""  # '' = the run's data_dir (tokenizer, validation shard)
    probe: str = ""  # probe text; '' = the opening of the first validation story
    probe_tokens: int = 24  # BOS included; more than ~40 makes the labels unreadable
    redo: bool = False  # redraw checkpoints already drawn
    dpi: int = 110


CSV_COLUMNS = ["iter", "layer", "head", "entropy", "entropy_uniform", "distance", "bos_share",
               "prev_share", "self_share"]
VERSION = 1  # bump when the drawing changes, so that old PNGs are redrawn
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# steps

def probe_tokens(cfg: AttnConfig, enc, data_dir, max_seq_len: int) -> tuple[list[int], str]:
    """Token ids of the probe (BOS first, at most probe_tokens) and a short description."""
    if cfg.probe_tokens < 2:
        raise UserError(f"--probe_tokens={cfg.probe_tokens}: use at least 2 (BOS and one token)")
    if cfg.probe_tokens > max_seq_len:
        raise UserError(f"--probe_tokens={cfg.probe_tokens} exceeds the model's max_seq_len "
                        f"{max_seq_len}: use a smaller value")
    if cfg.probe:
        text, source = cfg.probe, "--probe text"
    else:
        shard = raw_shards(data_dir)[0]
        stories = load_stories(shard)
        if not stories:
            raise UserError(f"validation shard {shard} holds no stories: pass --probe=\"some text\"")
        text, source = stories[0], f"first story of validation shard {shard.name}"
    ids = enc.encode(text, bos=True)[:cfg.probe_tokens]
    if len(ids) < 2:
        raise UserError("--probe text is empty after tokenisation: pass some words")
    return ids, source


def head_stats(probs: np.ndarray) -> dict[str, np.ndarray]:
    """probs (L, nh, T, T) -> per (layer, head) arrays of the CSV's statistics."""
    T = probs.shape[-1]
    p = probs.astype(np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    ent_q = -plogp.sum(-1)  # (L, nh, T): entropy of each query row
    dist = (np.arange(T)[:, None] - np.arange(T)[None, :]).clip(min=0)  # (T, T) i - j
    q = np.arange(1, T)
    return {
        "entropy": ent_q.mean(-1),
        "entropy_uniform": np.full(probs.shape[:2], np.mean(np.log(np.arange(1, T + 1)))),
        "distance": (p * dist).sum(-1).mean(-1),
        "bos_share": p[..., 1:, 0].mean(-1),
        "prev_share": p[..., q, q - 1].mean(-1),
        "self_share": p[..., q, q].mean(-1),
    }


def stats_rows(it: int, probs: np.ndarray) -> pd.DataFrame:
    L, nh = probs.shape[:2]
    st = head_stats(probs)
    rows = {"iter": np.full(L * nh, it), "layer": np.repeat(np.arange(L), nh),
            "head": np.tile(np.arange(nh), L)}
    rows.update({k: v.reshape(-1) for k, v in st.items()})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def checkpoint_probs(path: Path, ids: list[int]) -> tuple[np.ndarray, float]:
    """Attention probabilities (L, nh, T, T) of a checkpoint on the probe, and its val loss."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, "cpu").float()
    probs = model.attention_probs(torch.tensor([ids], dtype=torch.long))  # (L, 1, nh, T, T)
    return probs[:, 0].numpy(), ckpt.get("val_loss", float("nan"))


def draw_maps(probs: np.ndarray, labels: list[str], it: int, val_loss: float, title: str,
              probe_desc: str, stats: pd.DataFrame, path: Path, dpi: int):
    from matplotlib.figure import Figure
    L, nh, T, _ = probs.shape
    # fixed layout in inches (constrained layout costs seconds per figure with T ticks
    # on every panel): token labels only on the left column and the bottom row
    cell = max(2.0, 0.11 * T)  # one map; ~0.11 in per token keeps the labels apart
    left, right, bottom, top, wgap, hgap = 1.05, 1.25, 1.05, 0.95, 0.2, 0.4
    W, H = left + nh * cell + (nh - 1) * wgap + right, bottom + L * cell + (L - 1) * hgap + top
    fig = Figure(figsize=(W, H))
    gs = fig.add_gridspec(L, nh, left=left / W, right=1 - right / W, bottom=bottom / H,
                          top=1 - top / H, wspace=wgap / cell, hspace=hgap / cell)
    ent = stats.set_index(["layer", "head"])["entropy"]
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    for l in range(L):
        for h in range(nh):
            ax = fig.add_subplot(gs[l, h])
            im = ax.imshow(np.ma.masked_where(future, probs[l, h]), cmap="viridis", vmin=0.0,
                           vmax=1.0, interpolation="nearest")
            ax.set_facecolor("#e8e8e8")  # masked (future) cells
            ax.set_title(f"layer {l} head {h}  H={ent[(l, h)]:.2f} nats", fontsize=8, pad=3)
            if h == 0:
                ax.set_yticks(range(T), labels, fontsize=6.5)
                ax.set_ylabel("query token (row)", fontsize=8)
            else:
                ax.set_yticks([])
            if l == L - 1:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6.5)
                ax.set_xlabel("key token attended to (column)", fontsize=8)
            else:
                ax.set_xticks([])
            ax.tick_params(length=1.5, pad=1)
    cax = fig.add_axes([1 - (right - 0.25) / W, bottom / H + 0.1 * L * cell / H, 0.15 / W,
                        0.8 * (H - bottom - top) / H])
    fig.colorbar(im, cax=cax, label="attention probability (each row sums to 1)")
    fig.suptitle(f"{title}: attention probabilities at step {it} (val loss {val_loss:.3f})\n"
                 f"probe: {probe_desc}\n"
                 f"grey = future positions (masked); H = mean entropy of the query rows; "
                 f"'▁' marks a word start", fontsize=9, y=1 - 0.1 / H, va="top")
    save_figure(fig, path, dpi)


def draw_over_training(df: pd.DataFrame, title: str, probe_desc: str, path: Path, dpi: int):
    from matplotlib.figure import Figure
    L, nh = df["layer"].max() + 1, df["head"].max() + 1
    iters = sorted(df["iter"].unique())
    metrics = [("entropy", "entropy (nats)"), ("distance", "mean attention distance (tokens)"),
               ("bos_share", "share of attention to BOS"),
               ("prev_share", "share of attention to previous token")]
    R = len(metrics)
    pw, ph, left, right, bottom, top, wgap, hgap = 3.4, 2.2, 0.85, 2.0, 0.6, 0.95, 0.2, 0.2
    W, H = left + L * pw + (L - 1) * wgap + right, bottom + R * ph + (R - 1) * hgap + top
    fig = Figure(figsize=(W, H))  # fixed layout, in inches (constrained layout is slow)
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=wgap / pw, hspace=hgap / ph)
    axs = fig.subplots(R, L, squeeze=False, sharex=True, sharey="row")
    colors = [f"C{h % 10}" for h in range(nh)]
    for r, (col, ylabel) in enumerate(metrics):
        for l in range(L):
            ax = axs[r, l]
            sub = df[df["layer"] == l]
            for h in range(nh):
                s = sub[sub["head"] == h].sort_values("iter")
                ax.plot(s["iter"], s[col], marker="o", ms=3, lw=1.2, color=colors[h],
                        label=f"head {h}")
            if col == "entropy":
                top = float(df["entropy_uniform"].iloc[0])
                ax.axhline(top, color="k", ls="--", lw=0.8, label="uniform causal attention")
                ax.set_ylim(0, top * 1.08)
            if col.endswith("share"):
                ax.set_ylim(0, max(0.3, float(df[col].max()) * 1.1))
            step_axis(ax, max(iters), label=r == R - 1)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"layer {l}", fontsize=10)
            if l == 0:
                ax.set_ylabel(ylabel, fontsize=9)
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1 - (right - 0.15) / W, 0.5),
               fontsize=8)
    fig.suptitle(f"{title}: attention heads over training ({len(iters)} checkpoints, "
                 f"steps {iters[0]}..{iters[-1]})\nprobe: {probe_desc}; mean over query positions\n"
                 f"x axis symlog "
                 f"(linear from 0 to 1, logarithmic above, so that step 0 is shown)", fontsize=10,
                 y=1 - 0.08 / H, va="top")
    save_figure(fig, path, dpi)


def main(argv=None):
    cfg = parse_config(AttnConfig(), sys.argv[1:] if argv is None else argv)
    if cfg.dpi < 1:
        raise UserError(f"--dpi={cfg.dpi}: the figures' resolution must be at least 1 (default 110)")
    out = Path(cfg.out_dir)
    ckpts = run_checkpoints(out)
    last = load_checkpoint(ckpts[-1][1])
    margs, run = last["model_args"], run_config(out)
    data_dir = cfg.data_dir or run.get("data_dir", "data")
    enc = Tokenizer.for_vocab(margs["vocab_size"], data_dir)
    ids, source = probe_tokens(cfg, enc, data_dir, margs["max_seq_len"])
    labels = [piece_label(enc.sp, i) for i in ids]
    title = f"run {cfg.out_dir}"
    probe_desc = f"{source}, {len(ids)} tokens"

    vis, table = RunPaths(out).visualize, RunPaths(out).tables / "attn_entropy.csv"
    settings = {"version": VERSION, "probe_ids": ids, "dpi": cfg.dpi}
    record = DoneRecord(vis / "attn" / "settings.json", settings, cfg.redo)
    old = pd.read_csv(table) if table.exists() and record.done else pd.DataFrame(columns=CSV_COLUMNS)

    frames, wrote = [], []
    for it, path in tqdm(ckpts, desc="attention maps", unit="ckpt"):
        png, sig = vis / "attn" / f"attn_{it}.png", file_signature(path)
        rows = old[old["iter"] == it]
        if record.is_done(it, sig, png) and len(rows):
            frames.append(rows)
            continue
        probs, val_loss = checkpoint_probs(path, ids)
        rows = stats_rows(it, probs)
        draw_maps(probs, labels, it, val_loss, title, probe_desc, rows, png, cfg.dpi)
        frames.append(rows)
        record.mark(it, sig)
        wrote.append(png)

    summary = vis / "attn_over_training.png"
    if wrote or not summary.exists() or not table.exists():
        df = pd.concat(frames, ignore_index=True)[CSV_COLUMNS]
        write_csv_atomic(df, table)
        draw_over_training(df, title, probe_desc, summary, cfg.dpi)
        wrote += [table, summary]
    record.save(keep=[it for it, _ in ckpts])
    print(f"probe ({source}, {len(ids)} tokens): {enc.decode(ids[1:])!r}")
    if wrote:
        n = len(wrote) - 2
        print(f"wrote {n} attention map(s) to {vis / 'attn'}/, {summary} and {table}")
    else:
        print(f"nothing to do: all {len(ckpts)} checkpoints already drawn in {vis / 'attn'}/ "
              "(--redo=True to redraw)")
    return wrote


if __name__ == "__main__":
    main_guard(main)
