"""select_batches.py: offline selection keeps exactly the top/bottom batches by a score,
writes a spec that train.py trains on (only the kept ids), and EL2N matches its
definition."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import select_batches
import train
from conftest import TinyRun
from prebias import batchmetrics, checkpoint
from prebias.common import UserError
from prebias.data import BatchData
from prebias.selection import SCORES, ScoreContext


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
    with pytest.raises(UserError, match=r"--by=nope: choose a selection score \(uniform, loss, rho, el2n, metric\) or a batch metric: noisy, ref_nll"):
        select_batches.main([f"--data_dir={tiny_run.data_dir}", f"--tables_dir={tiny_run.tables_dir}",
                             "--vocab_size=512", "--max_seq_len=64", "--by=nope"])
    with pytest.raises(UserError, match=r"--keep=0.0: a fraction in \(0, 1\]"):
        select_batches.main(["--keep=0"])
