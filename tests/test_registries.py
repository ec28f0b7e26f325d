"""One registry per extension point: a schedule strategy, a selection score and a batch
metric, each added from this file as a newcomer would (one unit, registered by name),
trained on or computed, and recorded."""

import json
import shutil

import numpy as np
import pytest

import metrics
import select_batches
import train
from conftest import TinyRun
from prebias import batchmetrics, metrics_engine, schedule, selection
from prebias.checkpoint import latest_checkpoint, load_checkpoint, stream_records
from prebias.common import UserError
from prebias.data import BatchData


class HighestIdFirst(schedule.Strategy):
    """a toy order: the training batches from the highest id down, the same every epoch"""
    flat = True

    def setup(self, ids, vals, metric_of):
        self.stream = schedule._Epochs(np.sort(ids)[::-1], self.key, shuffle=False)

    def ids(self, s):
        return self.stream.at(np.arange(s * self.n, (s + 1) * self.n, dtype=np.int64))


def lowest_id(model, data, ids, ctx):
    """a toy score: the lowest batch ids are kept"""
    return -np.asarray(ids, np.float64)


@pytest.fixture
def toy_units():
    schedule.STRATEGIES.register("highest_id_first")(HighestIdFirst)
    selection.register("lowest_id", needs_model=False)(lowest_id)
    yield
    del schedule.STRATEGIES["highest_id_first"], selection.SCORES["lowest_id"]


def test_a_registered_strategy_is_trained_on_and_recorded(toy_units, tiny_data, tmp_path):
    data_dir, tables = tiny_data
    run = TinyRun(data_dir, tables, tmp_path / "toy")
    train.main(run.train_args(schedule="highest_id_first", max_iters=6, eval_interval=3))  # a flat flag choice
    data = BatchData(data_dir, 512, 64)
    want = np.sort(data.train_ids)[::-1][:6 * 8].reshape(6, 8)
    assert np.array_equal(np.load(run.out_dir / "batch_ids.npy"), want)
    ck = load_checkpoint(latest_checkpoint(run.out_dir))
    assert ck["schedule"]["spec"]["phases"] == [{"strategy": "highest_id_first"}]
    # in a spec file too, and the fingerprint guards resume like any other strategy's
    spec = tmp_path / "plan.json"
    spec.write_text(json.dumps({"phases": [{"strategy": "shuffle", "steps": 2}, {"strategy": "highest_id_first"}]}))
    s = schedule.Schedule(schedule.load_spec(spec), data.train_ids, 8, max_iters=6)
    assert np.array_equal(s.step_ids(2), want[0])
    with pytest.raises(schedule.SpecError, match="unknown key 'metric' for strategy highest_id_first"):
        schedule.validate_spec({"phases": [{"strategy": "highest_id_first", "metric": "fk_grade"}]})


def test_a_registered_score_selects_online_and_offline(toy_units, tiny_data, tmp_path):
    data_dir, tables = tiny_data
    run = TinyRun(data_dir, tables, tmp_path / "sel")
    train.main(run.train_args(select="lowest_id", select_pool=3, max_iters=4, eval_interval=2))
    rec = stream_records(run.out_dir)
    for pool, kept in zip(rec["pool_ids"], rec["batch_ids"]):
        assert len(pool) == 24 and np.array_equal(kept, pool[np.isin(pool, np.sort(pool)[:8])])  # pool order
    assert load_checkpoint(latest_checkpoint(run.out_dir))["config"]["select"] == "lowest_id"
    shutil.copytree(tables, tmp_path / "t")  # select_batches writes beside the table
    spec = select_batches.main([f"--data_dir={data_dir}", f"--tables_dir={tmp_path / 't'}", "--vocab_size=512",
                                "--max_seq_len=64", "--by=lowest_id", "--keep=0.25"])
    kept = np.load(str(spec).replace("_spec.json", "_ids.npy"))
    train_ids = BatchData(data_dir, 512, 64).train_ids
    assert np.array_equal(kept, np.sort(train_ids)[:round(0.25 * len(train_ids))])
    with pytest.raises(UserError, match="--select=nope: choose one of none, uniform, loss, rho, el2n, metric, magic, lowest_id"):
        train.main(run.train_args(out_dir=tmp_path / "x", select="nope", select_pool=2))


def test_every_score_works_offline_and_online(tiny_run):
    """The built-in scores on the same windows: offline through select_batches' path and
    online through the stream's selector give the same values."""
    from prebias.checkpoint import ckpt_path, model_from_checkpoint
    data = BatchData(tiny_run.data_dir, 512, 64)
    model = model_from_checkpoint(load_checkpoint(ckpt_path(tiny_run.out_dir, 4)))
    ids = data.train_ids[:6]
    ctx = selection.ScoreContext(batch_size=4, batch_metric=lambda m: np.arange(len(data), dtype=float),
                                 irreducible=lambda i: np.zeros(len(i)), metric="x", target=3.0)
    for name in ("loss", "rho", "el2n", "metric", "uniform"):
        a = selection.SCORES[name](model, data, ids, ctx)
        b = selection.SCORES[name](model, data, ids, selection.ScoreContext(**{**ctx.__dict__, "batch_size": 2}))
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)  # chunking never changes a score
    np.testing.assert_allclose(selection.SCORES["rho"](model, data, ids, ctx),
                               selection.SCORES["loss"](model, data, ids, ctx))  # zero irreducible loss


@pytest.fixture
def toy_metric():
    metrics.metric("n_commas", 1, "number of commas (a toy metric of the tests, no fast path)", "count", "0")(
        lambda t: float(t.text.count(",")))
    yield
    del metrics.TEXT_METRICS["n_commas"]


def test_a_registered_metric_falls_back_to_its_definition(toy_metric, tiny_data, tmp_path):
    texts = ["a, b, c.", "", "no comma here", "one, two"]
    got = metrics_engine.text_metrics(texts, ["n_words", "n_commas"])
    assert got["n_commas"].tolist() == [2.0, 0.0, 0.0, 1.0] and got["n_words"].tolist() == [3.0, 0.0, 3.0, 2.0]
    assert "n_commas" in metrics.resolve_metrics("all") and metrics.metric_versions(["n_commas"]) == {"n_commas": 1}
    # as a batch metric: a column of batch_metrics.csv, scored in the worker processes
    data_dir, _ = tiny_data
    batchmetrics.write_batch_metrics(data_dir, 512, 64, tmp_path, "n_commas", workers=2)
    df, _ = batchmetrics.load_batch_metrics(tmp_path, BatchData(data_dir, 512, 64))
    from prebias.data import window_texts
    from tokenizer import Tokenizer
    data = BatchData(data_dir, 512, 64)
    enc = Tokenizer.for_vocab(512, data_dir)
    some = [0, 5, len(data) - 1]
    want = [t.count(",") for t in window_texts([data.window(i) for i in some], enc)]
    assert df["n_commas"].to_numpy()[some].tolist() == want


def test_fast_paths_declare_the_stages_they_read():
    for name, fn in metrics_engine.FAST.items():
        assert name in metrics.TEXT_METRICS and set(fn.needs) <= set(metrics_engine.STAGES), name

    def sneaky(c):
        return c.items.nf  # reads a stage it does not declare
    sneaky.needs = ()
    c = metrics_engine.Chunk(["Tom ran."], metrics_engine._tables())
    with pytest.raises(RuntimeError, match="stage 'items' it does not declare"):
        sneaky(c.view(sneaky.needs))
