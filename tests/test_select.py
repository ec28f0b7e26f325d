"""select_batches.py: offline selection keeps exactly the top/bottom batches by a score,
writes a spec that train.py trains on (only the kept ids), and EL2N matches its
definition."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import select_batches
import train
from conftest import SEQ, VOCAB, TinyRun
from prebias import batchmetrics, checkpoint
from prebias.common import UserError
from prebias.data import BatchData
from prebias.attribution import Trajectory
from prebias.selection import SCORES, ScoreContext, proxy_effects


def test_keeps_the_hardest_by_ref_nll_and_train_uses_only_them(tiny_run, tmp_path):
    tables = tmp_path / "tables"
    import shutil
    shutil.copytree(tiny_run.tables_dir, tables)
    spec_path = select_batches.main([f"--data_dir={tiny_run.data_dir}", f"--tables_dir={tables}", "--vocab_size=512",
                                     "--max_seq_len=64", "--by=ref_nll", "--keep=0.25", "--hardest"])
    data = BatchData(tiny_run.data_dir, 512, 64)
    ranked = np.setdiff1d(data.train_ids, data.holdout_ids)  # ref_nll reads the reference: its holdout is left out
    ref = batchmetrics.load_metric_column(tables, "ref_nll", data)[ranked]
    n = round(0.25 * len(ranked))
    want = np.sort(ranked[np.argsort(-ref, kind="stable")[:n]])
    kept = np.load(tables / "select" / "ref_nll_hardest_0.25_ids.npy")
    assert np.array_equal(kept, want)
    ranking = pd.read_csv(tables / "select" / "ref_nll_hardest_0.25_ranking.csv")
    assert ranking["kept"].sum() == n and ranking["rank"].iloc[0] == 1
    assert np.array_equal(np.sort(ranking["batch_id"]), ranked) and len(data.holdout_ids) > 0
    assert ranking["score"].iloc[0] == pytest.approx(ref.max(), rel=1e-6)
    how = json.loads((tables / "select" / "ref_nll_hardest_0.25_select.json").read_text())
    assert how["holdout"]["mode"] == "exclude" and how["n_ranked"] == len(ranked) and how["cost"]["flops"] == 0
    assert json.loads(spec_path.read_text())["include"] == str(tables / "select" / "ref_nll_hardest_0.25_ids.npy")
    run = TinyRun(tiny_run.data_dir, tables, tmp_path / "pruned")
    train.main(run.train_args(max_iters=4, eval_interval=2, schedule_spec=spec_path))
    trained = np.load(run.out_dir / "batch_ids.npy")
    assert set(trained.ravel()) <= set(kept.tolist()) and trained.size == 32
    easiest = select_batches.main([f"--data_dir={tiny_run.data_dir}", f"--tables_dir={tables}", "--vocab_size=512",
                                   "--max_seq_len=64", "--by=fk_grade", "--keep=0.1", "--easiest"])
    ids = np.load(str(easiest).replace("_spec.json", "_ids.npy"))
    fk = batchmetrics.load_metric_column(tables, "fk_grade", data)
    assert np.nanmax(fk[ids]) <= np.nanmin(np.delete(fk, np.concatenate([ids, data.val_ids])))  # holdout ranked too
    kept_all = select_batches.main([f"--data_dir={tiny_run.data_dir}", f"--tables_dir={tables}", "--vocab_size=512",
                                    "--max_seq_len=64", "--by=ref_nll", "--keep=1", "--holdout=keep"])
    assert np.array_equal(np.load(str(kept_all).replace("_spec.json", "_ids.npy")), data.train_ids)


def test_el2n_matches_its_definition(tiny_run, tmp_path):
    data = BatchData(tiny_run.data_dir, 512, 64)
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(tiny_run.out_dir, 4))
    model = checkpoint.model_from_checkpoint(ck)
    ids = data.train_ids[:5]
    got = SCORES["el2n"](model, data, ids, ScoreContext(batch_size=2))
    x, y = data.get(ids)
    with torch.no_grad():
        p = torch.softmax(model(x)[0], -1)
    onehot = torch.nn.functional.one_hot(y, 512).float()
    want = (p - onehot).pow(2).sum(-1).sqrt().mean(1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    it, _ = select_batches.early_checkpoint(tiny_run.out_dir, -1, "el2n")
    assert it == 4  # the first checkpoint at >= 10% of 24 steps


def test_bad_arguments_are_one_line(tiny_run):
    with pytest.raises(UserError, match=r"--by=nope: choose a selection score \(uniform, loss, rho, el2n, metric, magic\) or a batch metric: noisy, ref_nll"):
        select_batches.main([f"--data_dir={tiny_run.data_dir}", f"--tables_dir={tiny_run.tables_dir}",
                             "--vocab_size=512", "--max_seq_len=64", "--by=nope"])
    with pytest.raises(UserError, match=r"--keep=0.0: a fraction in \(0, 1\]"):
        select_batches.main(["--keep=0"])


# -----------------------------------------------------------------------------
# select_batches.py: an output folder that is a file; batches with no metric value

def select_args(tiny_data, tables, *more):
    return [f"--data_dir={tiny_data[0]}", f"--tables_dir={tables}", f"--vocab_size={VOCAB}", f"--max_seq_len={SEQ}",
            *more]


def test_a_file_where_an_output_folder_belongs_is_one_line(tiny_data, tmp_path):
    """tables/select as a file: FileExistsError from mkdir inside atomic_path."""
    shutil.copytree(tiny_data[1], tmp_path / "t")
    (tmp_path / "t" / "select").write_text("mine")
    with pytest.raises(UserError, match=r"cannot write .*select/.*: .*select is a file where a folder belongs"):
        select_batches.main(select_args(tiny_data, tmp_path / "t", "--by=fk_grade", "--keep=0.5"))
    assert (tmp_path / "t" / "select").read_text() == "mine"


def test_batches_without_a_metric_value_are_said_not_kept(tiny_data, tmp_path, capsys):
    """NaN scores were ranked last and never kept: --keep was not met, without a word."""
    t = tmp_path / "t"
    shutil.copytree(tiny_data[1], t)
    bm = pd.read_csv(t / "batch_metrics.csv")
    train_ids = np.flatnonzero(bm["batch_id"] >= 0)[-50:]
    bm.loc[train_ids, "fk_grade"] = np.nan
    bm.to_csv(t / "batch_metrics.csv", index=False)
    shutil.rmtree(t / "select", ignore_errors=True)
    select_batches.main(select_args(tiny_data, t, "--by=fk_grade", "--keep=1.0", "--holdout=keep"))
    out = capsys.readouterr().out
    assert "have no fk_grade value (NaN in batch_metrics.csv" in out and "not the" in out



def test_magic_is_the_metagradient_ranks_a_repeated_token_batch_last_and_counts_its_cost(tiny_run):
    """select_batches.py --by=magic on the fixture run as proxy: its outputs load, its score
    is minus the mean over steps 6 and 18 of the effect of adding z at t (a JVP along
    lambda_t), which equals the reverse pass's d val / d w[t, r] where z is the row r
    trained at t (two code paths); a planted window of one repeated token ranks below 32
    clean training windows; the proxy run, the reverse pass and the JVPs are counted."""
    spec = select_batches.main([f"--out_dir={tiny_run.out_dir}", "--by=magic", "--keep=0.5", "--pool=24",
                                "--n_val=16", "--magic_steps=2", "--tag=test"])
    name = str(spec).replace("_spec.json", "")
    how = json.loads(open(name + "_select.json").read())
    ranking = pd.read_csv(name + "_ranking.csv")
    kept = np.load(name + "_ids.npy")
    assert how["n_ranked"] == 24 and how["n_kept"] == 12 and len(kept) == 12 and ranking["kept"].sum() == 12
    assert np.array_equal(np.sort(ranking.loc[ranking["kept"], "batch_id"]), kept)
    assert ranking["score"].is_monotonic_decreasing  # --hardest (the default) keeps the highest: the most helpful
    data, ids = BatchData(tiny_run.data_dir, 512, 64), np.load(tiny_run.out_dir / "batch_ids.npy")
    steps, B = [6, 18], ids.shape[1]
    trained = np.concatenate([data.windows(ids[t]) for t in steps])  # no tag, no mask: the windows as trained
    clean = data.windows(np.random.default_rng(0).choice(data.train_ids, 32, replace=False))
    planted = np.full((1, clean.shape[1]), int(clean[0, 5]))
    pool = data.windows(ranking["batch_id"].to_numpy())
    eff, cost, res = proxy_effects(Trajectory(tiny_run.out_dir), np.concatenate([trained, clean, planted, pool]), k=2,
                                   n_val=16)
    assert cost["steps"] == how["cost"]["steps"] == steps and res.replay_max_diff == 0.0
    for k, t in enumerate(steps):
        np.testing.assert_allclose(eff[k * B:(k + 1) * B, k], res.dw[0, t], rtol=1e-4,
                                   atol=1e-6 * np.abs(res.dw[0, t]).max())
    score = -eff.mean(1)
    np.testing.assert_allclose(ranking["score"], score[-len(pool):], rtol=1e-5, atol=1e-9)
    score = score[len(trained):len(trained) + 33]
    assert score[-1] < score[:-1].min(), (score[-1], np.sort(score[:-1])[:3])
    c = how["cost"]
    last = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tiny_run.out_dir))
    assert c["proxy_flops"] == last["compute"]["total_flops"] > 0 and c["proxy_steps"] == 24
    assert c["flops"] == c["reverse_flops"] + c["score_flops"]
    assert c["total_flops"] == c["flops"] + c["proxy_flops"] + c["ref_fit_flops"]
    # the pass replays each step about twice (sqrt-T segments) and reverses it once (a double
    # backward, ~3 steps' FLOPs): 4.5x the proxy's training as measured; the JVPs ~ a training
    # window's FLOPs each, 24 windows x 2 steps
    assert 3 < c["reverse_flops"] / c["proxy_flops"] < 8 and c["reverse_s"] > 0 and c["score_s"] > 0
    assert 0.5 < c["score_flops"] / (24 * 2 * c["proxy_flops"] / ids.size) < 3


def test_magic_is_refused_online(tiny_run, tmp_path):
    with pytest.raises(UserError, match=r"--select=magic scores batches from a whole recorded run, offline only"):
        train.main(TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "online").train_args(
            max_iters=2, select="magic", select_pool=2))
