"""Batch metrics (stage 1b): the table scores exactly the tokens of each batch, with
the same functions and reference scorer that eval.py uses, and is reused, checked
and subset as documented."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import metrics
import tinystories
from prebias import batchmetrics, metrics_engine, refscorer
from prebias.common import UserError
from prebias.data import BatchData, index_dir, raw_dir, story_noise, story_noise_free, window_noise, window_text
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def table(tiny_data):
    data_dir, tables = tiny_data
    df, meta = batchmetrics.load_batch_metrics(tables, BatchData(data_dir, 512, 64))
    return data_dir, tables, df, meta


def test_table_has_one_row_per_batch_with_every_metric(table):
    data_dir, tables, df, meta = table
    data = BatchData(data_dir, 512, 64)
    assert len(df) == len(data) and df["batch_id"].tolist() == list(range(len(data)))
    assert list(df.columns) == batchmetrics.ID_COLUMNS + ["noisy"] + batchmetrics.REF_COLUMNS + metrics.text_metric_names()
    assert (df["split"] == "val").sum() == data.n_val
    for col in ("shard", "offset", "story_first", "story_last"):
        assert df[col].tolist() == data.index[col].tolist()
    assert meta["versions"] == metrics.metric_versions() and meta["tokenizer_sha256"] == data.meta["tokenizer_sha256"]


def test_values_are_the_metrics_of_the_exact_window(table):
    data_dir, _, df, _ = table
    data = BatchData(data_dir, 512, 64)
    enc = Tokenizer(data_dir / "tok512.model")
    scorer = refscorer.reference_scorer(data_dir, 512)
    ids = [0, 17, data.n_val, len(data) - 1]
    windows = [data.window(i) for i in ids]
    texts = [window_text(w, enc) for w in windows]
    want = metrics_engine.text_metrics(texts)
    for name, col in want.items():
        np.testing.assert_allclose(df.loc[ids, name].to_numpy(), col, rtol=1e-5, equal_nan=True, err_msg=name)
    np.testing.assert_allclose(df.loc[ids, "ref_nll"].to_numpy(), [scorer.nll(w) for w in windows], rtol=1e-5)
    assert all(len(w) == 65 for w in windows) and (df["n_tokens"] == 65).all()


def test_scorer_tables_equal_general_path_on_real_data(tiny_data, monkeypatch):
    """The reference scorer's probability tables (the path batch metrics take) give the
    general path's nll bit for bit on every window of the real data."""
    data_dir, _ = tiny_data
    data = BatchData(data_dir, 512, 64)
    wins = data.windows(np.arange(len(data)))
    fast = refscorer.NGramScorer.load(refscorer.scorer_path(data_dir, 512))
    got = fast.nll_many(wins)
    assert fast._probs() is not None
    monkeypatch.setattr(refscorer, "PROB_MAX", 0)
    general = refscorer.NGramScorer.load(refscorer.scorer_path(data_dir, 512))
    assert got.tobytes() == general.nll_many(list(wins)).tobytes() and general._probs() is None


def test_rows_and_summaries_are_what_pandas_writes(tiny_data):
    """The hand-formatted table (rows formatted in the workers, shard_metrics.csv without
    pandas) is byte for byte pandas' to_csv(index=False, float_format="%.6g") of the same
    values; a shard whose JSON has no "noise" field takes the no-parse path, and its
    noisy column is what parsing gives (all 0)."""
    data_dir, tables = tiny_data
    data = BatchData(data_dir, 512, 64)
    names = metrics.text_metric_names()
    cache = index_dir(data_dir, 512, 64) / "metrics"
    jobs = [(data_dir, 512, 64, s, names, None, cache / f"shard{s:02d}.npy", None) for s in range(len(data.tokens))]
    texts, summaries = zip(*map(batchmetrics._shard_rows, jobs))
    cols = batchmetrics.ID_COLUMNS + ["noisy"] + batchmetrics.REF_COLUMNS + names
    got = ",".join(cols) + "\n" + "".join(texts)
    assert got == (tables / "batch_metrics.csv").read_text()
    ix = data.index
    df = pd.DataFrame({"batch_id": np.arange(len(data)), "shard": ix["shard"].astype(np.int64),
                       "offset": ix["offset"], "story_first": ix["story_first"].astype(np.int64),
                       "story_last": ix["story_last"].astype(np.int64),
                       "n_stories": (ix["story_last"] - ix["story_first"] + 1).astype(np.int64),
                       "n_tokens": 65, "split": np.where(ix["shard"] == 0, "val", np.where(
                           np.isin(np.arange(len(data)), data.holdout_ids), "holdout", "train"))})
    raws = [raw_dir(data_dir) / s["name"].replace(".bin", ".json") for s in data.meta["shards"]]
    assert all(story_noise_free(r) for r in raws)
    df["noisy"] = np.concatenate([window_noise(np.asarray(data.tokens[s]), story_noise(raws[s]),
                                               ix["offset"][ix["shard"] == s], 64) for s in range(len(raws))])
    vals = np.concatenate([np.load(j[6]) for j in jobs])
    for k, c in enumerate(batchmetrics.REF_COLUMNS + names):
        df[c] = vals[:, k]
    assert got == df.to_csv(index=False, float_format="%.6g", lineterminator="\n")
    want = pd.DataFrame(list(summaries)).to_csv(index=False, float_format="%.6g", lineterminator="\n")
    assert batchmetrics._summary_csv(list(summaries)) == want == (tables / "shard_metrics.csv").read_text()
    nan_row = dict(summaries[0], fk_grade_mean=float("nan"), fk_grade_std=-0.0)
    assert batchmetrics._summary_csv([nan_row]) == pd.DataFrame([nan_row]).to_csv(index=False, float_format="%.6g")


def test_noise_free_check(tmp_path):
    """story_noise_free is True only where story_noise is all False: a noisy sample's
    shards (key written, even as null) and a key with an escaped letter are parsed."""
    tinystories.sample(tmp_path, n_stories=60, n_shards=3, noise=0.3)
    for p in sorted(raw_dir(tmp_path).glob("data*.json")):
        assert not story_noise_free(p)
    esc = tmp_path / "esc.json"
    esc.write_text('[{"story": "a", "\\u006Eoise": "swap"}]')
    assert story_noise(esc).all() and not story_noise_free(esc)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"story": 'the "noise" was loud'}]))
    assert not story_noise(plain).any() and story_noise_free(plain)


def test_window_text_cuts_stories_at_bos(tiny_data):
    enc = Tokenizer(tiny_data[0] / "tok512.model")
    a, b = enc.encode("The cat sat.", bos=False), enc.encode("A dog ran.", bos=False)
    assert window_text(np.array(a[2:] + [1] + b), enc) == enc.decode(a[2:]) + "\nA dog ran."


def test_shard_summary_is_the_mean_of_its_batches(table):
    _, tables, df, _ = table
    shards = pd.read_csv(tables / "shard_metrics.csv")
    for s in range(4):
        got = shards.loc[shards["shard"] == s]
        assert int(got["n_batches"].iloc[0]) == int((df["shard"] == s).sum())
        assert got["fk_grade_mean"].iloc[0] == pytest.approx(df.loc[df["shard"] == s, "fk_grade"].mean(), rel=1e-5)


def test_rerun_reuses_and_subset_recomputes(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    root = tmp_path / "d"
    shutil.copytree(data_dir, root)
    tables = tmp_path / "t"
    tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables)
    cache = index_dir(root, 512, 64) / "metrics"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(stamps) == 4
    tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps  # nothing recomputed
    tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables, metrics="sentiment,n_words")
    df = pd.read_csv(tables / "batch_metrics.csv")
    assert list(df.columns) == batchmetrics.ID_COLUMNS + ["noisy"] + batchmetrics.REF_COLUMNS + ["n_words", "sentiment"]
    with pytest.raises(UserError, match="unknown metric.*nope"):
        tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables, metrics="nope")


def test_table_of_other_data_is_rejected(tiny_data, tmp_path):
    data_dir, tables = tiny_data
    shutil.copytree(tables, tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "batch_metrics.json").read_text())
    meta["max_seq_len"] = 128
    (tmp_path / "t" / "batch_metrics.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="another tokenizer or max_seq_len"):
        batchmetrics.load_batch_metrics(tmp_path / "t", BatchData(data_dir, 512, 64))
    with pytest.raises(UserError, match="no batch metrics"):
        batchmetrics.load_batch_metrics(tmp_path / "none")


def test_model_as_reference_scorer(tiny_run):
    scorer = refscorer.reference_scorer(tiny_run.data_dir, 512, str(tiny_run.out_dir / "model.bin"))
    data = BatchData(tiny_run.data_dir, 512, 64)
    nll = scorer.nll_many([data.window(0), data.window(1)])
    import torch
    x, y = data.get([0])
    with torch.no_grad():
        want = float(scorer.model(x, y)[1])
    assert nll[0] == pytest.approx(want, rel=1e-6) and np.isfinite(nll).all()


def test_gender_word_lists_are_part_of_the_cache_key(tiny_data, tmp_path):
    """Changing the gender word lists recomputes every shard (metric_versions carries
    their hash); the same lists again reuse the cache."""
    data_dir, _ = tiny_data
    root, tables = tmp_path / "d", tmp_path / "t"
    shutil.copytree(data_dir, root)
    cache = index_dir(root, 512, 64) / "metrics"
    spec = "gender_male,gender_female"
    tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables, metrics=spec)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    before = pd.read_csv(tables / "batch_metrics.csv")
    try:
        metrics.set_gender_words(["cat"], ["dog"])
        tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables, metrics=spec)
        after = pd.read_csv(tables / "batch_metrics.csv")
        again = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
        assert all(again[n] != m for n, m in mtimes.items())  # every shard recomputed
        assert not np.allclose(after["gender_male"], before["gender_male"], equal_nan=True)
        tinystories.pretokenize(512, 64, root, workers=1, tables_dir=tables, metrics=spec)
        assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == again  # same lists: reused
    finally:
        metrics.set_gender_words()
