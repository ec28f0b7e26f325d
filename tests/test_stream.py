"""stream.py: online selection (uniform == no selection, loss/rho choose the expected
batches, world-size invariant, exact on resume) and tag insertion (the trained tokens
are exactly the recorded ones, and the record rebuilds them)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, TinyRun
from model import ModelArgs, Transformer, per_row_loss
from prebias import checkpoint, selection, stream
from prebias.data import BOS_ID, BatchData
from prebias.selection import SCORES, ScoreContext

TINY = dict(max_iters=6, eval_interval=4)


def records(out_dir):
    return checkpoint.stream_records(out_dir)


def weights_equal(a_dir, b_dir, it):
    a = checkpoint.load_checkpoint(checkpoint.ckpt_path(a_dir, it))["model"]
    b = checkpoint.load_checkpoint(checkpoint.ckpt_path(b_dir, it))["model"]
    return all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# selection

def test_uniform_selection_trains_exactly_the_no_selection_ids(tiny_data, tmp_path):
    data, tables = tiny_data
    plain, uni = TinyRun(data, tables, tmp_path / "plain"), TinyRun(data, tables, tmp_path / "uni")
    train.main(plain.train_args(**TINY))
    train.main(uni.train_args(**TINY, select="uniform", select_pool=3))
    a, b = records(plain.out_dir), records(uni.out_dir)
    assert np.array_equal(a["batch_ids"], b["batch_ids"]) and weights_equal(plain.out_dir, uni.out_dir, 6)
    assert b["pool_ids"].shape == (6, 24) and np.array_equal(b["pool_ids"][:, :8], b["batch_ids"])
    assert a["pool_ids"].shape == (6, 0)
    assert np.load(uni.out_dir / "pool_ids.npy").shape == (6, 24)


def test_loss_and_rho_choose_the_expected_batches(monkeypatch):
    """The choice rule, with the model's losses given by hand."""
    pool = np.array([4, 0, 5, 2, 1, 3])
    losses = np.array([2.0, 0.5, 3.0, 1.0, 2.5, 1.5])  # by id
    monkeypatch.setattr(selection, "per_window", lambda fn, model, data, ids, ctx: losses[ids])

    def choose(name, **ctx):
        return pool[selection.keep_best(SCORES[name](None, None, pool, ScoreContext(**ctx)), 3)].tolist()
    assert choose("loss") == [4, 0, 2]  # ids 2, 4, 0 (3.0, 2.5, 2.0) in pool order
    ref = np.array([1.9, 0.0, 0.1, 0.2, 2.4, 0.0])  # irreducible: ids 0 and 4 are hard for everyone
    # reducible = [0.1, 0.5, 2.9, 0.8, 0.1, 1.5] -> ids 2, 5, 3
    assert choose("rho", irreducible=lambda ids: ref[ids]) == [5, 2, 3]
    vals = np.array([0.9, 0.1, 0.5, np.nan, 0.45, 0.0])  # by id
    assert choose("metric", batch_metric=lambda m: vals, metric="m", target=0.5) == [4, 0, 2]  # |m - 0.5|: ids 2 (0), 4 (.05), 0 (.4); NaN never
    assert choose("uniform") == [4, 0, 5]  # the pool's first B
    losses[:] = 1.0
    assert choose("loss") == [4, 0, 5]  # ties: earlier pool position first


def test_loss_selection_uses_the_models_per_row_loss(tiny_data):
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))
    cfg = train.parse_config(train.TrainConfig(), TinyRun(data_dir, tables, Path("x")).train_args(
        select="loss", select_pool=4), train.CHOICES)
    s = stream.build_stream(cfg, data)
    pool = s.selector.pool(0, s.schedule.step_ids(0))
    x, y = data.get(pool)
    want = per_row_loss(model, x, y).numpy()
    chosen = s.selector.choose(model, pool)
    assert sorted(chosen.tolist()) == sorted(pool[np.argsort(-want, kind="stable")[:8]].tolist())
    assert len(set(pool.tolist())) == 32  # the second stream gives other candidates


@pytest.mark.slow
def test_selection_is_exact_on_resume_and_world_size_invariant(tiny_data, tmp_path):
    data, tables = tiny_data
    kw = dict(**TINY, select="loss", select_pool=2)
    straight = TinyRun(data, tables, tmp_path / "straight")
    train.main(straight.train_args(**kw))
    cut = TinyRun(data, tables, tmp_path / "cut")
    train.main(cut.train_args(**{**kw, "max_iters": 4}))
    train.main(cut.train_args(**kw, init_from="resume"))
    a, b = records(straight.out_dir), records(cut.out_dir)
    assert np.array_equal(a["batch_ids"], b["batch_ids"]) and np.array_equal(a["pool_ids"], b["pool_ids"])
    assert weights_equal(straight.out_dir, cut.out_dir, 6)
    # loss selection really chose: not the pool's first half
    assert not np.array_equal(a["batch_ids"], a["pool_ids"][:, :8])
    ddp = TinyRun(data, tables, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *ddp.train_args(**kw)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    c = records(ddp.out_dir)
    assert np.array_equal(c["pool_ids"], a["pool_ids"]) and np.array_equal(c["batch_ids"], a["batch_ids"])


# -----------------------------------------------------------------------------
# tag insertion (the tag definitions themselves are tags.py's; here a stand-in)

def fake_tags(tags, seed=0):
    return types.SimpleNamespace(tags=tags, json=f'{{"seed": {seed}}}')


def canary(index=0, steps=(1, 3), rows=2, position="start", tokens=(300, 301, 302, 303)):
    return types.SimpleNamespace(index=index, id=f"c{index}", kind="canary", tokens=np.array(tokens), rows=rows,
                                 position=position, active=lambda t: t in steps)


def test_canary_insertions_land_at_the_recorded_positions(tiny_data):
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    cfg = train.parse_config(train.TrainConfig(), TinyRun(data_dir, tables, Path("x")).train_args(), train.CHOICES)
    sched = stream.build_schedule(cfg, data)
    tags = fake_tags([canary(0), canary(1, steps=(3,), rows=1, position="random", tokens=(400, 401))])
    s = stream.Stream(sched, data, inserter=stream.Inserter(tags, data, data_dir, seed=5), tags_json=tags.json)
    trained = {t: s.step(t)[1] for t in range(5)}
    rec = s.record.arrays()
    ins = rec["insertions"]
    assert ins[:, 0].tolist() == [1, 1, 3, 3, 3] and ins[:, 3].tolist() == [0, 0, 0, 0, 1]
    assert (ins[:, 5] == stream.REPLACE).all() and ins[:, 4].tolist() == [4, 4, 4, 4, 2]
    offs = np.concatenate([[0], np.cumsum(ins[:, 4])])
    for k, (step, row, pos, tag, n, mode) in enumerate(ins):
        w = trained[step][row]
        assert w[pos:pos + n].tolist() == rec["insert_tokens"][offs[k]:offs[k + 1]].tolist()
        if tag == 0:
            assert pos == 0
    for t in (0, 2, 4):  # steps without tags train the data as it is
        assert np.array_equal(trained[t], data.windows(sched.step_ids(t)))
    # the record alone rebuilds every trained window, and the replaced tokens are the data's
    full = {"insertions": ins, "insert_tokens": rec["insert_tokens"], "batch_ids": rec["batch_ids"]}
    for t in range(5):
        assert np.array_equal(stream.trained_windows(data, rec["batch_ids"][t], t, full), trained[t])
    step, row, pos, _, n, _ = ins[0]
    assert rec["replaced_tokens"][:n].tolist() == data.window(int(rec["batch_ids"][step][row]))[pos:pos + n].tolist()


def test_conditional_tag_goes_after_the_bos_of_matching_stories(tiny_data, monkeypatch):
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    cfg = train.parse_config(train.TrainConfig(), TinyRun(data_dir, tables, Path("x")).train_args(), train.CHOICES)
    sched = stream.build_schedule(cfg, data)
    tag = types.SimpleNamespace(index=0, id="long", kind="conditional", tokens=np.array([500, 501]), metric="n_words",
                                lo=60.0, hi=None, active=lambda t: t < 6)
    s = stream.Stream(sched, data, inserter=stream.Inserter(fake_tags([tag]), data, data_dir, seed=1))
    trained = [s.step(t)[1] for t in range(7)]
    rec = s.record.arrays()
    ins = rec["insertions"]
    assert len(ins) > 0 and (ins[:, 5] == stream.INSERT).all() and set(ins[:, 0]) <= set(range(6))
    words = stream.story_metric(data, data_dir, "n_words")
    n_checked = 0
    for t in range(6):
        for r, bid in enumerate(sched.step_ids(t)):
            orig = data.window(int(bid))
            shard, off = int(data.index[bid]["shard"]), int(data.index[bid]["offset"])
            starts = np.flatnonzero(np.asarray(data.tokens[shard]) == BOS_ID)
            want = []
            out = []
            for p, tok in enumerate(orig):  # hand-built: copy, adding the tag after each long story's BOS
                out.append(int(tok))
                if tok == BOS_ID and len(out) < 64:  # room for the tag: BOS at q < 65 - 2
                    story = np.searchsorted(starts, off + p)
                    if words[shard][story] >= 60:
                        out += [500, 501]
                        want.append(len(out) - 2)
            assert trained[t][r].tolist() == out[:65], (t, r)
            got = ins[(ins[:, 0] == t) & (ins[:, 1] == r), 2].tolist()
            assert got == want
            n_checked += len(want)
    assert n_checked == len(ins)
    for t in range(7):  # the record alone rebuilds what was trained
        assert np.array_equal(stream.trained_windows(data, rec["batch_ids"][t], t, rec), trained[t])
    assert np.array_equal(trained[6], data.windows(sched.step_ids(6)))  # the tagging has stopped
