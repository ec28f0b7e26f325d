"""The holdout split (RHO-LOSS's): pretokenize marks seeded blocks of whole training
stories, the reference scorer is fitted on them, runs that read the reference never
train on them (and say so), other runs keep every batch and their ids, and a reference
that is not held out is refused."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import select_batches
import tinystories
import train
from conftest import TinyRun
from prebias import checkpoint, refscorer, stream
from prebias.common import UserError
from prebias.data import (BOS_ID, BatchData, build_index, choose_holdout, holdout_batches, holdout_tokens,
                          index_dir)
from prebias.schedule import Schedule

RHO = dict(max_iters=4, eval_interval=2, select="rho", select_pool=2)


def test_holdout_batches_are_the_windows_touching_held_out_stories():
    # shard 1: stories start at tokens 0, 5, 9, 14 (4 stories, 18 tokens); T = 4: windows at 0, 4, 8, 12
    tok = np.array([1, 3, 3, 3, 3, 1, 4, 4, 4, 1, 5, 5, 5, 5, 1, 6, 6, 6], np.uint16)
    index = build_index([np.array([1, 7, 7, 7, 7], np.uint16), tok], 4)  # shard 0 (validation): batch 0
    # window [o, o+5): 0-4 holds story 0, 4-8 stories 0-1, 8-12 stories 1-2, 12-16 stories 2-3
    assert index["story_first"].tolist() == [0, 0, 0, 1, 2] and index["story_last"].tolist() == [0, 0, 1, 2, 3]
    # stories 1..2 of shard 1 held out: the windows at 4, 8 and 12 touch them
    assert holdout_batches(index, np.array([[1, 1, 3]])).tolist() == [2, 3, 4]
    assert holdout_batches(index, np.array([[1, 0, 1]])).tolist() == [1, 2]
    assert holdout_batches(index, np.zeros((0, 3), np.int64)).tolist() == []


def test_holdout_blocks_are_seeded_training_stories():
    rows = choose_holdout([100, 70, 64, 33], 0.25, seed=3, block=32)
    # training shards 1..3 hold 3 + 2 + 2 blocks; round(0.25 * 7) = 2 of them
    assert rows.shape == (2, 3) and set(rows[:, 0]) <= {1, 2, 3}
    assert all((hi - lo) in (32, 6, 1) and lo % 32 == 0 for _, lo, hi in rows)
    assert np.array_equal(rows, choose_holdout([100, 70, 64, 33], 0.25, seed=3, block=32))
    assert not np.array_equal(rows, choose_holdout([100, 70, 64, 33], 0.25, seed=4, block=32))
    assert len(choose_holdout([100, 70], 0.0)) == 0


def test_pretokenize_marks_the_holdout_and_fits_the_reference_on_it(tiny_data):
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    held = data.holdout_ids
    stories = np.array(json.loads((data_dir / "tok512" / "holdout.json").read_text())["stories"])
    assert len(stories) == round(0.1 * 30)  # 3 training shards x 10 blocks of 32 stories (300 a shard)
    assert np.array_equal(held, holdout_batches(data.index, stories)) and len(held) > 0
    assert held.min() >= data.n_val  # never the validation shard
    # the batch index is the one built from the tokens: the holdout is a marking
    toks = [np.fromfile(data_dir / "tok512" / s["name"], np.uint16) for s in data.meta["shards"]]
    assert np.load(index_dir(data_dir, 512, 64) / "batches.npy").tobytes() == build_index(toks, 64).tobytes()
    bm = pd.read_csv(tables / "batch_metrics.csv")
    assert np.array_equal(np.flatnonzero(bm["split"] == "holdout"), held)
    assert (bm["split"] == "val").sum() == data.n_val
    # the saved scorer is exactly the 3-gram of the held-out stories, not of the validation shard
    seqs = holdout_tokens(data_dir, 512)
    assert len(seqs) == (stories[:, 2] - stories[:, 1]).sum() and all(q[0] == BOS_ID for q in seqs)
    saved = refscorer.NGramScorer.load(refscorer.scorer_path(data_dir, 512))
    fit = refscorer.NGramScorer(3, 512).fit([q.astype(np.int64) for q in seqs])
    val = np.asarray(data.tokens[0], np.int64)
    on_val = refscorer.NGramScorer(3, 512).fit(np.split(val, np.flatnonzero(val == BOS_ID)[1:]))
    assert saved.fingerprint() == fit.fingerprint() != on_val.fingerprint()
    meta = json.loads((tables / "batch_metrics.json").read_text())
    assert meta["scorer_fit"]["on"] == "holdout" and meta["scorer"] == saved.fingerprint()
    assert meta["scorer_fit"]["stories_sha256"] == data.holdout_meta["stories_sha256"]


def test_no_holdout_keeps_the_validation_fit(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    tinystories.pretokenize(512, 64, d, workers=1, tables_dir=tmp_path / "t", metrics="n_words", holdout=0.0)
    data = BatchData(d, 512, 64)
    assert len(data.holdout_ids) == 0
    assert "holdout" not in set(pd.read_csv(tmp_path / "t" / "batch_metrics.csv")["split"])
    val = np.asarray(data.tokens[0], np.int64)
    on_val = refscorer.NGramScorer(3, 512).fit(np.split(val, np.flatnonzero(val == BOS_ID)[1:]))
    assert refscorer.NGramScorer.load(refscorer.scorer_path(d, 512)).fingerprint() == on_val.fingerprint()
    assert refscorer.scorer_fit(d, 512)["on"] == "validation shard"
    # a run that reads the reference needs a holdout (or --holdout=keep, the old oracle)
    run = TinyRun(d, tmp_path / "t", tmp_path / "rho")
    with pytest.raises(UserError, match="has no holdout: re-run python tinystories.py pretokenize"):
        train.main(run.train_args(**RHO))
    with pytest.raises(UserError, match="reads the reference, but .* has no holdout"):
        select_batches.main([f"--data_dir={d}", f"--tables_dir={tmp_path / 't'}", "--vocab_size=512",
                             "--max_seq_len=64", "--by=ref_nll"])
    # marking a holdout refits the scorer on it, and the cached batch metrics are recomputed
    done = index_dir(d, 512, 64) / "metrics" / "done.json"
    before = json.loads(done.read_text())["settings"]["scorer"]
    tinystories.pretokenize(512, 64, d, workers=1, tables_dir=tmp_path / "t", metrics="n_words")
    scorer = refscorer.NGramScorer.load(refscorer.scorer_path(d, 512))
    assert json.loads(done.read_text())["settings"]["scorer"] == scorer.fingerprint() != before
    bm = pd.read_csv(tmp_path / "t" / "batch_metrics.csv")
    ids = [0, data.n_val, len(data) - 1]
    np.testing.assert_allclose(bm.loc[ids, "ref_nll"], scorer.nll_many(data.windows(ids)), rtol=1e-5)
    assert refscorer.scorer_fit(d, 512)["on"] == "holdout"


def test_rho_never_trains_on_the_holdout_and_a_plain_run_keeps_its_ids(tiny_data, tmp_path):
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    held = data.holdout_ids
    rho = TinyRun(data_dir, tables, tmp_path / "rho")
    train.main(rho.train_args(**RHO))
    rec = checkpoint.stream_records(rho.out_dir)
    assert not np.isin(rec["batch_ids"], held).any() and not np.isin(rec["pool_ids"], held).any()
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(rho.out_dir, 4))
    h = ck["schedule"]["holdout"]
    assert h["mode"] == "exclude" and h["in_schedule"] == 0 and h["n_batches"] == len(held)
    assert h["sha256"] == data.holdout_meta["sha256"]
    assert ck["schedule"]["reference"]["kind"] == "ref_nll" and ck["schedule"]["reference"]["fit"]["on"] == "holdout"
    assert np.array_equal(np.load(rho.out_dir / "holdout_ids.npy"), held)
    # a run that reads no reference trains on every training batch, in the order it always had
    plain = TinyRun(data_dir, tables, tmp_path / "plain")
    train.main(plain.train_args(max_iters=6, eval_interval=3, select="loss", select_pool=2))
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(plain.out_dir, 6))
    assert ck["schedule"]["holdout"]["mode"] == "keep"
    assert ck["schedule"]["holdout"]["in_schedule"] == len(held)
    want = Schedule({"phases": [{"strategy": "shuffle"}]}, data.train_ids, 8, seed=1337, max_iters=6)
    pools = checkpoint.stream_records(plain.out_dir)["pool_ids"]
    assert np.array_equal(pools[:, :8], np.stack([want.step_ids(s) for s in range(6)]))
    aux = Schedule({"phases": [{"strategy": "shuffle"}]}, data.train_ids, 8, seed=stream._pool_seed(1337), max_iters=6)
    assert np.array_equal(pools[:, 8:], np.stack([aux.step_ids(s) for s in range(6)]))
    # a schedule sorted by the reference's loss reads it too: the holdout goes
    cfg = train.parse_config(train.TrainConfig(), plain.train_args(schedule="sorted", schedule_metric="ref_nll"),
                             train.CHOICES)
    sched = stream.build_schedule(cfg, data)
    assert sched.holdout["mode"] == "exclude" and sched.n == len(data.train_ids) - len(held)


def test_reference_model_trained_on_the_holdout(tiny_run, tmp_path):
    data = BatchData(tiny_run.data_dir, 512, 64)
    ref = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "ref")
    train.main(ref.train_args(max_iters=4, eval_interval=2, holdout="only"))
    assert np.isin(np.load(ref.out_dir / "batch_ids.npy"), data.holdout_ids).all()
    ref_ck = checkpoint.ckpt_path(ref.out_dir, 4)
    run = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "rho_ref")
    train.main(run.train_args(**RHO, select_ref=ref_ck))
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(run.out_dir, 4))
    r = ck["schedule"]["reference"]
    assert r["kind"] == "model" and r["trained_on"] == "holdout only" and r["outside_holdout"] == 0
    fit = checkpoint.load_checkpoint(ref_ck)["compute"]["total_flops"]
    assert ck["compute"]["ref_fit_flops"] == fit > 0
    assert not np.isin(np.load(run.out_dir / "batch_ids.npy"), data.holdout_ids).any()
    # a reference trained on the training batches is no irreducible-loss model: refused
    bad = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "bad")
    with pytest.raises(UserError, match=r"trained on \d+ batches outside the holdout"):
        train.main(bad.train_args(**RHO, select_ref=checkpoint.ckpt_path(tiny_run.out_dir, 24)))
    train.main(bad.train_args(**RHO, select_ref=checkpoint.ckpt_path(tiny_run.out_dir, 24), holdout="keep"))


def test_a_reference_fitted_elsewhere_is_refused(tiny_data, tmp_path):
    data_dir, tables = tiny_data
    t = tmp_path / "tables"
    shutil.copytree(tables, t)
    meta = json.loads((t / "batch_metrics.json").read_text())
    meta["scorer_fit"] = {"on": "validation shard"}  # as an older pretokenize fitted it
    (t / "batch_metrics.json").write_text(json.dumps(meta))
    run = TinyRun(data_dir, t, tmp_path / "rho")
    with pytest.raises(UserError, match="fitted on validation shard, not on this data's holdout"):
        train.main(run.train_args(**RHO))
    with pytest.raises(UserError, match="fitted on validation shard, not on this data's holdout"):
        select_batches.main([f"--data_dir={data_dir}", f"--tables_dir={t}", "--vocab_size=512", "--max_seq_len=64",
                             "--by=ref_nll"])


def test_a_resume_refuses_another_reference(tiny_data, tmp_path):
    data_dir, tables = tiny_data
    t = tmp_path / "tables"
    shutil.copytree(tables, t)
    run = TinyRun(data_dir, t, tmp_path / "rho")
    train.main(run.train_args(**{**RHO, "max_iters": 2}))
    meta = json.loads((t / "batch_metrics.json").read_text())
    meta["scorer"] = "another scorer"  # the reference refitted: other irreducible losses
    (t / "batch_metrics.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="fingerprint mismatch"):
        train.main(run.train_args(**RHO, init_from="resume"))
