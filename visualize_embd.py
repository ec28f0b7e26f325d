"""
Token embeddings of every checkpoint of a run, by PCA in one basis shared by all
checkpoints, so that their movement over training can be seen.

$ python visualize_embd.py                                  # run folder out/
$ python visualize_embd.py --out_dir=out/shuffle_s2         # another run
$ python visualize_embd.py --words=he,she,king,queen --multi_piece=skip
$ python visualize_embd.py --redo=True                      # redraw every checkpoint

Writes, for a run folder <out_dir>:
  visualize/embd/embd_<iter>.png   one per checkpoint: every token's row of
                                   tok_embeddings.weight projected on PC1/PC2, the
                                   highlighted words labelled
  visualize/embd_pca.png           small multiples, one panel per checkpoint (at most
                                   max_panels, spread over the run), same axis limits
  visualize/embd_trajectories.png  the path of each highlighted word across checkpoints
  tables/embd_pca.csv              iter, kind, token_id, label, pc1, pc2: one row per
                                   token (kind piece | byte | special) and per
                                   highlighted word (kind word, token_id -1) per checkpoint

The basis: sklearn PCA (2 components) fitted on the FINAL checkpoint's embedding rows of
the text pieces (--fit_on=pieces; --fit_on=all adds the byte-fallback and special
tokens), then every row of every checkpoint is projected with it:
x -> (x - mean) @ W, mean and W of that fit. Byte and special tokens are left out of the
fit by default because most never occur as input: their common drift (the softmax pushes
them down through the tied output weights) would otherwise take PC1 on its own.
Why the final one and not all checkpoints stacked: its axes are the structure the run
ends up with, so each panel reads as "how far along towards the final arrangement";
stacked fitting mixes in the isotropic noise of the random init and would tilt the axes
towards whichever phase has more checkpoints (the log-spaced early ones). The price: an
early checkpoint's own main directions may lie off these two axes. The axes change when
the run gets a new final checkpoint, so then every checkpoint is redrawn.

Highlighted words are encoded as inside running text (sentencepiece adds the word-start
'▁'). A word that becomes several pieces is shown at the mean of its pieces' rows
(--multi_piece=mean, marked '(k pieces)' in the legend) or left out with a note
(--multi_piece=skip). The embeddings are tied to the output layer (llama2.c), so even
tokens never seen as input (most byte-fallback tokens) move, pushed by the softmax.

A checkpoint is skipped when its PNG exists and visualize/embd/settings.json says it was
drawn with the same settings from the same checkpoint files.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from prebias.checkpoint import load_checkpoint, run_checkpoints, run_config
from prebias.common import (DoneRecord, UserError, file_signature, main_guard, parse_config, save_figure,
                            write_csv_atomic)
from prebias.paths import RunPaths
from tokenizer import Tokenizer, piece_label


# -----------------------------------------------------------------------------
# config (every field can be set with --key=value)
@dataclass
class EmbdConfig:
    out_dir: str = "out"  # the run folder (config.json, ckpt/)
    data_dir: str = ""  # '' = the run's data_dir (for the tokenizer)
    # contrasting pairs frequent in TinyStories; drawn in paired colours
    words: str = "he,she,boy,girl,mom,dad,happy,sad,dog,cat,big,little,good,bad"
    multi_piece: str = "mean"  # a word of several pieces: 'mean' of their rows, or 'skip'
    fit_on: str = "pieces"  # PCA fitted on the final rows of: 'pieces' (text pieces) or 'all'
    max_panels: int = 16  # small multiples: at most this many checkpoints
    redo: bool = False  # redraw checkpoints already drawn
    dpi: int = 110


CHOICES = {"multi_piece": ("mean", "skip"), "fit_on": ("pieces", "all")}
CSV_COLUMNS = ["iter", "kind", "token_id", "label", "pc1", "pc2"]
VERSION = 1  # bump when the drawing changes, so that old PNGs are redrawn
# -----------------------------------------------------------------------------


def word_pieces(enc, words: str, multi_piece: str) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """[(word, piece ids)] of the highlighted words, and notes on those left out."""
    out, notes = [], []
    for w in dict.fromkeys(x.strip() for x in words.split(",")):  # de-duplicated, in order
        if not w:
            continue
        ids = enc.encode(w, bos=False)
        if not ids:
            notes.append(f"{w!r} has no tokens")
        elif len(ids) > 1 and multi_piece == "skip":
            pieces = " ".join(enc.sp.id_to_piece(i) for i in ids)
            notes.append(f"{w!r} skipped: {len(ids)} pieces ({pieces})")
        else:
            out.append((w, ids))
    return out, notes


def token_kinds(sp, V: int) -> np.ndarray:
    return np.array(["special" if sp.is_control(i) or sp.is_unknown(i) else
                     "byte" if sp.is_byte(i) else "piece" for i in range(V)])


def embeddings(path: Path) -> np.ndarray:
    """tok_embeddings.weight (V, dim) of a checkpoint, as float64."""
    return load_checkpoint(path)["model"]["tok_embeddings.weight"].double().numpy()


def read_table(path) -> pd.DataFrame:
    """embd_pca.csv as written (labels such as 'NA' or 'null' stay text)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"label": str, "kind": str})


def fit_basis(final: np.ndarray, kinds: np.ndarray, fit_on: str = "pieces"):
    """PCA with 2 components fitted on the final checkpoint's embeddings (V, dim): the
    rows of text pieces, or all rows."""
    from sklearn.decomposition import PCA
    rows = final if fit_on == "all" else final[kinds == "piece"]
    return PCA(n_components=2, svd_solver="full").fit(rows)


def project(pca, it: int, emb: np.ndarray, kinds, labels, words) -> pd.DataFrame:
    """Rows of the CSV for one checkpoint: every token, then every highlighted word
    (the mean of its pieces' rows, projected)."""
    V = emb.shape[0]
    wvec = np.stack([emb[ids].mean(0) for _, ids in words]) if words else np.zeros((0, emb.shape[1]))
    xy = pca.transform(np.concatenate([emb, wvec]))
    return pd.DataFrame({"iter": it, "kind": list(kinds) + ["word"] * len(words),
                         "token_id": list(range(V)) + [-1] * len(words),
                         "label": list(labels) + [w for w, _ in words],
                         "pc1": xy[:, 0], "pc2": xy[:, 1]}, columns=CSV_COLUMNS)


def word_colors(n: int) -> list:
    """Consecutive words (the default list is made of pairs) get the dark and light
    shade of one hue."""
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def limits(df: pd.DataFrame, margin=0.05) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits around all points of df (shared: all checkpoints), with a margin."""
    out = []
    for c in ("pc1", "pc2"):
        lo, hi = float(df[c].min()), float(df[c].max())
        pad = margin * (hi - lo or 1.0)
        out.append((lo - pad, hi + pad))
    return out[0], out[1]


def axis_labels(ax, evr, fontsize=9):
    ax.set_xlabel(f"PC1 (embedding units; {100 * evr[0]:.1f}% of the fitted variance)",
                  fontsize=fontsize)
    ax.set_ylabel(f"PC2 (embedding units; {100 * evr[1]:.1f}%)", fontsize=fontsize)


def word_label(w: str, ids: list[int]) -> str:
    return w + (f" ({len(ids)} pieces)" if len(ids) > 1 else "")


def legend_handles(rows: pd.DataFrame, words, colors) -> list:
    """Proxy artists for the legend (the words are drawn in one scatter call)."""
    from matplotlib.lines import Line2D
    n_other = int((rows["kind"].isin(["byte", "special"])).sum())
    n_piece = int((rows["kind"] == "piece").sum())
    dot = dict(marker="o", ls="", markeredgewidth=0)
    out = [Line2D([], [], color="#bbbbbb", ms=4, label=f"byte / special tokens ({n_other})", **dot),
           Line2D([], [], color="#4a7bb7", alpha=0.6, ms=4, label=f"text pieces ({n_piece})", **dot)]
    out += [Line2D([], [], marker="o", ls="", color=c, mec="k", mew=0.5, ms=6,
                   label=word_label(w, ids)) for (w, ids), c in zip(words, colors)]
    return out


def scatter_checkpoint(ax, rows: pd.DataFrame, colors, lims, annotate: bool, s=6):
    tok = rows[rows["kind"] != "word"]
    other = tok[tok["kind"] != "piece"]
    piece = tok[tok["kind"] == "piece"]
    ax.scatter(other["pc1"], other["pc2"], s=s, c="#bbbbbb", lw=0)
    ax.scatter(piece["pc1"], piece["pc2"], s=s, c="#4a7bb7", alpha=0.5, lw=0)
    wr = rows[rows["kind"] == "word"]  # in the order of the word list
    ax.scatter(wr["pc1"], wr["pc2"], s=4 * s + 10, c=colors[:len(wr)], edgecolors="k",
               linewidths=0.5, zorder=3)
    if annotate:
        for w, x, y in zip(wr["label"], wr["pc1"], wr["pc2"]):
            ax.annotate(w, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8, zorder=4)
    ax.set_xlim(*lims[0])
    ax.set_ylim(*lims[1])
    ax.axhline(0, color="k", lw=0.3)
    ax.axvline(0, color="k", lw=0.3)


def single_panel_figure(W=9.6, H=6.4, legend_w=2.3):
    """A figure with one plot and room on the right for the legend (fixed layout in
    inches: constrained layout costs about a second per figure)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(W, H))
    fig.subplots_adjust(left=0.85 / W, right=1 - legend_w / W, bottom=0.65 / H, top=1 - 0.75 / H)
    return fig, fig.add_subplot(), (1 - (legend_w - 0.1) / W, 0.5)


def draw_checkpoint(df_it, it, final_it, fit_desc, words, colors, lims, evr, title, path, dpi):
    fig, ax, anchor = single_panel_figure()
    scatter_checkpoint(ax, df_it, colors, lims, annotate=True, s=8)
    axis_labels(ax, evr)
    fig.legend(handles=legend_handles(df_it, words, colors), loc="center left",
               bbox_to_anchor=anchor, fontsize=7)
    fig.suptitle(f"{title}: token embeddings at step {it}\nprojected on PC1/PC2 of step {final_it}'s "
                 f"{fit_desc}; the same basis and limits for every checkpoint", fontsize=10)
    save_figure(fig, path, dpi)


def panel_iters(iters: list[int], max_panels: int) -> list[int]:
    """At most max_panels checkpoints, evenly spread over the list (which is log-spaced
    early), always the first and the last."""
    if len(iters) <= max_panels:
        return list(iters)
    pick = np.unique(np.linspace(0, len(iters) - 1, max(2, max_panels)).round().astype(int))
    return [iters[i] for i in pick]


def draw_small_multiples(df, iters, max_panels, words, colors, lims, evr, title, path, dpi):
    from matplotlib.figure import Figure
    shown = panel_iters(iters, max_panels)
    ncol = min(len(shown), math.ceil(math.sqrt(1.3 * len(shown))))
    nrow = -(-len(shown) // ncol)
    cell, left, right, bottom, top, wgap, hgap = 2.6, 0.7, 2.4, 0.6, 0.8, 0.15, 0.35
    W, H = left + ncol * cell + (ncol - 1) * wgap + right, bottom + nrow * cell + (nrow - 1) * hgap + top
    fig = Figure(figsize=(W, H))
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=wgap / cell, hspace=hgap / cell)
    axs = fig.subplots(nrow, ncol, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, it in zip(axs, shown):
        scatter_checkpoint(ax, df[df["iter"] == it], colors, lims, annotate=False, s=4)
        ax.set_title(f"step {it}", fontsize=9, pad=2)
        ax.tick_params(labelsize=7)
    for ax in axs[len(shown):]:
        ax.set_visible(False)
    for ax in axs[max(0, len(shown) - ncol):len(shown)]:  # the lowest panel of each column
        ax.tick_params(labelbottom=True)
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f}%)", fontsize=8)
    for ax in axs[::ncol]:
        ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f}%)", fontsize=8)
    fig.legend(handles=legend_handles(df[df["iter"] == shown[0]], words, colors),
               loc="center left", bbox_to_anchor=(1 - (right - 0.1) / W, 0.5), fontsize=7)
    note = "" if len(shown) == len(iters) else f" ({len(shown)} of {len(iters)} checkpoints shown)"
    fig.suptitle(f"{title}: token embeddings over training{note}\none PCA basis for all panels "
                 f"(fitted on step {iters[-1]}), same axis limits (embedding units)", fontsize=10,
                 y=1 - 0.08 / H, va="top")
    save_figure(fig, path, dpi)


def draw_trajectories(df, iters, words, colors, lims, evr, title, path, dpi):
    fig, ax, anchor = single_panel_figure()
    bg = df[(df["iter"] == iters[-1]) & (df["kind"] == "piece")]
    ax.scatter(bg["pc1"], bg["pc2"], s=5, c="#cccccc", lw=0,
               label=f"all text pieces at step {iters[-1]}")
    wr = df[df["kind"] == "word"]
    for (w, ids), color in zip(words, colors):
        path_w = wr[wr["label"] == w].sort_values("iter")
        x, y = path_w["pc1"].to_numpy(), path_w["pc2"].to_numpy()
        ax.plot(x, y, "-", color=color, lw=1.3, zorder=2, label=word_label(w, ids))
        ax.scatter(x[1:-1], y[1:-1], s=10, color=color, zorder=3, lw=0)
        ax.scatter(x[:1], y[:1], s=30, facecolor="white", edgecolor=color, lw=1.2, zorder=3)
        ax.scatter(x[-1:], y[-1:], s=45, color=color, edgecolor="k", lw=0.6, zorder=4)
        ax.annotate(w, (x[-1], y[-1]), xytext=(4, 4), textcoords="offset points", fontsize=9,
                    zorder=5)
    # zoomed on the paths (the background pieces outside the frame are cut off)
    zoom = limits(wr, margin=0.12) if len(wr) else lims
    ax.set_xlim(max(zoom[0][0], lims[0][0]), min(zoom[0][1], lims[0][1]))
    ax.set_ylim(max(zoom[1][0], lims[1][0]), min(zoom[1][1], lims[1][1]))
    axis_labels(ax, evr)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=anchor,
               fontsize=8, markerscale=1.5)
    fig.suptitle(f"{title}: paths of highlighted words over training (steps "
                 f"{iters[0]}..{iters[-1]}, {len(iters)} checkpoints)\nopen circle = step {iters[0]}, "
                 f"labelled dot = step {iters[-1]}; one PCA basis fitted on step {iters[-1]}; zoomed on the paths",
                 fontsize=10)
    save_figure(fig, path, dpi)


def coordinates(ckpts, final, pca, kinds, labels, words, old, todo) -> pd.DataFrame:
    """The CSV rows of every checkpoint: from the old table for checkpoints already drawn
    (their coordinates are unchanged: same basis), else projected afresh."""
    V, frames = final.shape[0], []
    for it, p in ckpts:
        rows = old[old["iter"] == it] if old is not None and it not in todo else []
        if len(rows) != V + len(words):
            emb = final if it == ckpts[-1][0] else embeddings(p)
            rows = project(pca, it, emb, kinds, labels, words)
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def draw_all(cfg, df, pca, words, pngs, todo, summaries, record, sigs) -> list[Path]:
    """The plots of the checkpoints in todo, then the two summary figures."""
    iters = sorted(df["iter"].unique().tolist())
    title, evr = f"run {cfg.out_dir}", pca.explained_variance_ratio_
    fit_desc = "text-piece embeddings" if cfg.fit_on == "pieces" else "embeddings (all tokens)"
    lims, colors = limits(df), word_colors(len(words))
    wrote = []
    for it in tqdm(todo, desc="embedding plots", unit="ckpt"):
        draw_checkpoint(df[df["iter"] == it], it, iters[-1], fit_desc, words, colors, lims, evr,
                        title, pngs[it], cfg.dpi)
        record.mark(it, sigs[it])
        wrote.append(pngs[it])
    draw_small_multiples(df, iters, cfg.max_panels, words, colors, lims, evr, title, summaries[0],
                         cfg.dpi)
    draw_trajectories(df, iters, words, colors, lims, evr, title, summaries[1], cfg.dpi)
    return wrote


def main(argv=None):
    cfg = parse_config(EmbdConfig(), sys.argv[1:] if argv is None else argv, CHOICES)
    if cfg.dpi < 1:
        raise UserError(f"--dpi={cfg.dpi}: the figures' resolution must be at least 1 (default 110)")
    if cfg.max_panels < 1:
        raise UserError(f"--max_panels={cfg.max_panels}: use 1 or more")
    out = Path(cfg.out_dir)
    ckpts = run_checkpoints(out)
    iters = [it for it, _ in ckpts]
    final_it, final_path = ckpts[-1]
    final_ckpt = load_checkpoint(final_path)
    data_dir = cfg.data_dir or run_config(out).get("data_dir", "data")
    final = final_ckpt["model"]["tok_embeddings.weight"].double().numpy()
    del final_ckpt
    V = final.shape[0]
    enc = Tokenizer.for_vocab(V, data_dir)
    words, notes = word_pieces(enc, cfg.words, cfg.multi_piece)
    kinds, labels = token_kinds(enc.sp, V), [piece_label(enc.sp, i) for i in range(V)]

    vis, table = RunPaths(out).visualize, RunPaths(out).tables / "embd_pca.csv"
    summaries = [vis / "embd_pca.png", vis / "embd_trajectories.png"]
    sigs = {it: file_signature(p) for it, p in ckpts}
    # the basis and the shared limits depend on every checkpoint: any change redraws all
    settings = {"version": VERSION, "words": [[w, ids] for w, ids in words], "dpi": cfg.dpi,
                "fit_on": cfg.fit_on, "max_panels": cfg.max_panels,
                "checkpoints": [[it, sigs[it]] for it in iters]}
    record = DoneRecord(vis / "embd" / "settings.json", settings, cfg.redo)
    pngs = {it: vis / "embd" / f"embd_{it}.png" for it in iters}
    todo = [it for it in iters if not record.is_done(it, sigs[it], pngs[it])]
    for n in notes:
        print(f"note: {n}")
    if not todo and table.exists() and all(p.exists() for p in summaries):
        print(f"nothing to do: all {len(iters)} checkpoints already drawn in {vis / 'embd'}/ "
              "(--redo=True to redraw)")
        return []

    pca = fit_basis(final, kinds, cfg.fit_on)
    old = read_table(table) if table.exists() and record.done else None
    df = coordinates(ckpts, final, pca, kinds, labels, words, old, todo)
    wrote = draw_all(cfg, df, pca, words, pngs, todo, summaries, record, sigs)
    write_csv_atomic(df, table)
    record.save(keep=iters)
    evr = pca.explained_variance_ratio_
    print(f"PCA fitted on step {final_it}: PC1 {100 * evr[0]:.1f}%, PC2 {100 * evr[1]:.1f}% of variance")
    print(f"wrote {len(wrote)} embedding plot(s) to {vis / 'embd'}/, {summaries[0]}, {summaries[1]} "
          f"and {table}")
    return wrote + [table] + summaries


if __name__ == "__main__":
    main_guard(main)
