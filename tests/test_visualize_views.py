"""visualize_attn.py and visualize_embd.py on the session's tiny run (checkpoints at
0, 1, 2, 4, 8, 16, 24; dim 32, 2 layers, 4 heads, 2 kv heads), copied to a temp folder
so that the shared run folder is not written to."""

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import visualize_attn
import visualize_embd
from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint
from prebias.common import UserError

ITERS = [0, 1, 2, 4, 8, 16, 24]
L, NH = 2, 4
OLD = 1_000_000_000  # an mtime (2001) no fresh write can have


@pytest.fixture(scope="module")
def views(tiny_run, tmp_path_factory):
    """A copy of the run with both views drawn once (default settings)."""
    out = tmp_path_factory.mktemp("views") / "out"
    out.mkdir()
    shutil.copytree(tiny_run.out_dir / "ckpt", out / "ckpt")
    shutil.copy(tiny_run.out_dir / "config.json", out / "config.json")
    attn = visualize_attn.main([f"--out_dir={out}"])
    embd = visualize_embd.main([f"--out_dir={out}"])
    return out, attn, embd


def per_ckpt_pngs(out, view):
    return [out / "visualize" / view / f"{view}_{it}.png" for it in ITERS]


def assert_png(path):
    import matplotlib.image as mpimg
    assert path.stat().st_size > 0
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0  # not a blank canvas


def probe_ids(out):
    return json.loads((out / "visualize" / "attn" / "settings.json").read_text())["settings"]["probe_ids"]


# -----------------------------------------------------------------------------
# the attention probabilities themselves

@pytest.mark.parametrize("it", [0, 24])
def test_attention_probs_are_causal_distributions(tiny_run, it):
    model = model_from_checkpoint(load_checkpoint(tiny_run.out_dir / "ckpt" / f"ckpt_{it}.pt"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, tiny_run.vocab_size, (2, 40), generator=g)
    tokens[:, 0] = 1  # BOS
    probs = model.attention_probs(tokens)
    T = tokens.shape[1]
    assert probs.shape == (L, 2, NH, T, T)
    assert torch.allclose(probs.sum(-1), torch.ones(L, 2, NH, T), atol=1e-5)
    above = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert (probs[..., above] == 0).all()
    assert (probs >= 0).all()
    # the probabilities describe the model's own forward pass (no KV cache): the logits of
    # the explicit-softmax path equal those of the fused attention path
    with torch.no_grad():
        logits_fused, _ = model(tokens)
        logits_probs, _, probs2 = model(tokens, return_probs=True)
    assert torch.allclose(logits_fused, logits_probs, atol=1e-5)
    assert torch.equal(probs, probs2)
    # causal: a prefix gets exactly the top-left block of the full maps
    assert torch.allclose(model.attention_probs(tokens[:, :17]), probs[..., :17, :17], atol=1e-6)


def test_head_stats_known_values():
    T = 5
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    to_bos = np.zeros((T, T))
    to_bos[:, 0] = 1
    prev = np.eye(T, k=-1)
    prev[0, 0] = 1
    st = visualize_attn.head_stats(np.stack([uniform, to_bos, prev])[None])  # (1, 3, T, T)
    assert np.allclose(st["entropy"][0], [np.mean(np.log(np.arange(1, T + 1))), 0, 0])
    assert np.allclose(st["entropy_uniform"], np.mean(np.log(np.arange(1, T + 1))))
    assert np.allclose(st["bos_share"][0], [np.mean(1 / np.arange(2, T + 1)), 1, 0.25])
    assert np.allclose(st["prev_share"][0], [np.mean(1 / np.arange(2, T + 1)), 0.25, 1])
    assert np.allclose(st["distance"][0], [np.mean(np.arange(T) / 2), np.mean(np.arange(T)), 0.8])


# -----------------------------------------------------------------------------
# visualize_attn.py

def test_attn_writes_maps_summary_and_table(views):
    out, wrote, _ = views
    for p in per_ckpt_pngs(out, "attn") + [out / "visualize" / "attn_over_training.png"]:
        assert_png(p)
    assert len(wrote) == len(ITERS) + 2
    df = pd.read_csv(out / "tables" / "attn_entropy.csv")
    assert list(df.columns) == visualize_attn.CSV_COLUMNS
    assert df.groupby("iter").size().to_dict() == {it: L * NH for it in ITERS}
    assert (df.groupby("iter")[["layer", "head"]].apply(lambda g: len(set(map(tuple, g.values))))
            == L * NH).all()
    T = len(probe_ids(out))
    assert T == 24 and probe_ids(out)[0] == 1  # default: 24 tokens, BOS first
    assert (df["entropy"] >= 0).all() and (df["entropy"] <= math.log(T)).all()
    assert (df["entropy"] <= df["entropy_uniform"] + 1e-9).all()
    for c in ("bos_share", "prev_share", "self_share"):
        assert df[c].between(0, 1).all()


def test_attn_table_matches_the_checkpoint(views):
    out, _, _ = views
    ids = probe_ids(out)
    model = model_from_checkpoint(load_checkpoint(out / "ckpt" / "ckpt_24.pt"))
    p = model.attention_probs(torch.tensor([ids]))[:, 0].double()  # (L, nh, T, T)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean(-1)  # (L, nh)
    df = pd.read_csv(out / "tables" / "attn_entropy.csv")
    df = df[df["iter"] == 24].sort_values(["layer", "head"])
    assert np.allclose(df["entropy"].to_numpy(), ent.reshape(-1).numpy(), atol=1e-5)


def test_attn_probe_option_and_errors(views, tmp_path):
    out, _, _ = views
    with pytest.raises(UserError, match="probe_tokens"):
        visualize_attn.main([f"--out_dir={out}", "--probe_tokens=1000"])
    with pytest.raises(UserError, match="unknown config key"):
        visualize_attn.main([f"--out_dir={out}", "--probes=x"])
    with pytest.raises(UserError, match="no checkpoints"):
        visualize_attn.main([f"--out_dir={tmp_path / 'empty'}"])


# -----------------------------------------------------------------------------
# visualize_embd.py

def test_embd_writes_plots_and_table(views):
    out, _, wrote = views
    pngs = per_ckpt_pngs(out, "embd")
    summaries = [out / "visualize" / "embd_pca.png", out / "visualize" / "embd_trajectories.png"]
    for p in pngs + summaries:
        assert_png(p)
    assert set(wrote) == set(pngs + summaries + [out / "tables" / "embd_pca.csv"])
    df = visualize_embd.read_table(out / "tables" / "embd_pca.csv")
    assert list(df.columns) == visualize_embd.CSV_COLUMNS
    words = [w for w in visualize_embd.EmbdConfig().words.split(",")]
    per_iter = df.groupby("iter").size().to_dict()
    assert per_iter == {it: 512 + len(words) for it in ITERS}  # mean of pieces: none skipped
    assert sorted(df.loc[df["kind"] == "word", "label"].unique()) == sorted(words)


def test_embd_one_basis_for_all_checkpoints(views):
    """An independent PCA of the final checkpoint's text-piece rows reproduces the CSV's
    coordinates of every checkpoint (up to the sign of each component)."""
    from sklearn.decomposition import PCA

    from tokenizer import Tokenizer, tokenizer_model_path
    out, _, _ = views
    cfg = json.loads((out / "config.json").read_text())
    sp = Tokenizer(tokenizer_model_path(512, cfg["data_dir"])).sp
    piece = np.array([not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)) for i in range(512)])
    emb = {it: load_checkpoint(p)["model"]["tok_embeddings.weight"].double().numpy()
           for it, p in list_checkpoints(out)}
    pca = PCA(n_components=2).fit(emb[24][piece])
    df = visualize_embd.read_table(out / "tables" / "embd_pca.csv")
    for it in ITERS:
        rows = df[(df["iter"] == it) & (df["kind"] != "word")].sort_values("token_id")
        xy = (emb[it] - pca.mean_) @ pca.components_.T
        got = rows[["pc1", "pc2"]].to_numpy()
        sign = np.sign((xy * got).sum(0))
        assert np.allclose(got, xy * sign, atol=1e-8)
        words = df[(df["iter"] == it) & (df["kind"] == "word")]
        assert len(words) and np.isfinite(words[["pc1", "pc2"]].to_numpy()).all()
    # a word's point is the mean of its pieces' points (PCA is affine)
    enc = Tokenizer(tokenizer_model_path(512, cfg["data_dir"]))
    ids = enc.encode("happy", bos=False)
    toks = df[(df["iter"] == 24) & df["token_id"].isin(ids)].set_index("token_id").loc[ids]
    word = df[(df["iter"] == 24) & (df["label"] == "happy") & (df["kind"] == "word")]
    assert np.allclose(word[["pc1", "pc2"]].to_numpy()[0], toks[["pc1", "pc2"]].mean().to_numpy())


def test_embd_skip_words_and_errors(views, tmp_path):
    out, _, _ = views
    with pytest.raises(UserError, match="multi_piece"):
        visualize_embd.main([f"--out_dir={out}", "--multi_piece=max"])
    with pytest.raises(UserError, match="no checkpoints"):
        visualize_embd.main([f"--out_dir={tmp_path}"])
    enc = _enc(out)
    asked = ["he", "happy", "zzqx"]
    kept, notes = visualize_embd.word_pieces(enc, "he, happy,he,,zzqx", "skip")
    for w in asked:  # each word once: kept when it is one piece, else a note names it
        one = len(enc.encode(w, bos=False)) == 1
        assert [x for x, _ in kept].count(w) == int(one)
        assert any(repr(w) in n for n in notes) == (not one)
    kept, notes = visualize_embd.word_pieces(enc, "he, happy,he,,zzqx", "mean")
    assert [w for w, _ in kept] == asked and notes == []


def _enc(out):
    from tokenizer import Tokenizer, tokenizer_model_path
    cfg = json.loads((out / "config.json").read_text())
    return Tokenizer(tokenizer_model_path(512, cfg["data_dir"]))


# -----------------------------------------------------------------------------
# re-runs: no work for what is done, --redo=True redoes it. On a second copy of the run
# with three of its checkpoints, to keep the redraws few.

SMALL = [0, 8, 24]


@pytest.fixture(scope="module")
def small_run(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("views_small") / "out"
    (out / "ckpt").mkdir(parents=True)
    for it in SMALL:
        shutil.copy(tiny_run.out_dir / "ckpt" / f"ckpt_{it}.pt", out / "ckpt")
    shutil.copy(tiny_run.out_dir / "config.json", out / "config.json")
    return out


def _age(paths):
    for p in paths:
        os.utime(p, ns=(OLD * 10**9, OLD * 10**9))


def _untouched(paths):
    return [p.stat().st_mtime_ns == OLD * 10**9 for p in paths]


@pytest.mark.parametrize("script,view,summaries,table", [
    (visualize_attn, "attn", ["attn_over_training.png"], "attn_entropy.csv"),
    (visualize_embd, "embd", ["embd_pca.png", "embd_trajectories.png"], "embd_pca.csv"),
])
def test_rerun_skips_done_and_redo_redoes(small_run, script, view, summaries, table):
    out = small_run
    pngs = [out / "visualize" / view / f"{view}_{it}.png" for it in SMALL]
    others = [out / "visualize" / s for s in summaries] + [out / "tables" / table]
    assert set(pngs + others) <= set(script.main([f"--out_dir={out}"]))
    _age(pngs + others)
    assert script.main([f"--out_dir={out}"]) == []
    assert all(_untouched(pngs + others))
    # a lost plot is redrawn alone
    pngs[1].unlink()
    wrote = script.main([f"--out_dir={out}"])
    assert pngs[1] in wrote and pngs[1].exists()
    assert _untouched(pngs) == [True, False, True]
    _age(pngs + others)
    wrote = script.main([f"--out_dir={out}", "--redo=True"])
    assert set(pngs + others) <= set(wrote)
    assert not any(_untouched(pngs + others))
    for p in pngs:
        assert_png(p)


def test_changed_probe_redraws_every_map(small_run):
    out = small_run
    visualize_attn.main([f"--out_dir={out}"])
    pngs = [out / "visualize" / "attn" / f"attn_{it}.png" for it in SMALL]
    _age(pngs)
    visualize_attn.main([f"--out_dir={out}", "--probe=Tom saw a dog. He", "--probe_tokens=8"])
    assert not any(_untouched(pngs))
    assert len(probe_ids(out)) == 8
    df = pd.read_csv(out / "tables" / "attn_entropy.csv")
    assert len(df) == len(SMALL) * L * NH and (df["entropy"] <= math.log(8) + 1e-9).all()


# -----------------------------------------------------------------------------
# flags out of range

def test_figure_resolution_must_be_positive(tiny_run):
    with pytest.raises(UserError, match=r"--dpi=0: .* at least 1"):
        visualize_embd.main([f"--out_dir={tiny_run.out_dir}", "--dpi=0"])
