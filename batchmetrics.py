"""
Batch metrics (stage 1b): every batch's decoded text scored with metrics.py, plus its
loss under the reference scorer, into out/tables/batch_metrics.csv (one row per
batch_id), out/tables/shard_metrics.csv (per shard) and out/tables/batch_metrics.json
(tokenizer, vocab size, max_seq_len, metric versions, scorer fingerprint).

Run by `python tinystories.py pretokenize`; reused by train.py (metric orders) and
eval.py (means over the batches each checkpoint saw). The reference scorer is the one
yardstick for inputs and outputs: by default a token 3-gram model fitted on the
validation shard (data/tok{V}/ref_ngram3.npz), or a trained model (--ref_model).

$ python tinystories.py pretokenize --vocab_size=512 --metrics=sentiment,fk_grade
$ python tinystories.py pretokenize --ref_model=model.bin
"""

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import metrics
from common import UserError, atomic_path, write_json_atomic
from data import TABLES_DIR, BatchData, index_dir, raw_dir, story_noise, tok_dir, window_noise, window_texts
from refscorer import ModelScorer, fit_reference_scorer, reference_scorer
from tokenizer import Tokenizer

ID_COLUMNS = ["batch_id", "shard", "offset", "story_first", "story_last", "n_stories", "n_tokens", "split"]
REF_COLUMNS = ["ref_nll", "ref_ppl"]


# -----------------------------------------------------------------------------
# per-shard scoring (a process per shard; each writes its own cached CSV)

def _score_shard(job):
    """Score one shard's batches: a float64 matrix (batch, [ref_nll, ref_ppl, *names])
    saved as .npy (binary: the CSV is formatted once, at the end)."""
    data_dir, vocab_size, max_seq_len, shard, names, ref_model, out_npy = job
    data = BatchData(data_dir, vocab_size, max_seq_len)
    enc = Tokenizer.for_vocab(vocab_size, data_dir)
    ids = np.flatnonzero(data.index["shard"] == shard)
    wins = [data.window(int(i)) for i in ids]
    nll = reference_scorer(data_dir, vocab_size, ref_model).nll_many(wins)
    cols = [nll, np.exp(nll), *metrics.text_metrics(window_texts(wins, enc), names).values()]
    with atomic_path(out_npy) as tmp, open(tmp, "wb") as f:
        np.save(f, np.stack(cols, axis=1).astype(np.float64), allow_pickle=False)
    return shard


def _shard_frame(data, shard: int, values: np.ndarray, names: list[str], noisy: np.ndarray):
    """The batch_metrics.csv rows of one shard: ids from the batch index, the share of
    tokens from corrupted stories (noisy), then values."""
    import pandas as pd
    ids = np.flatnonzero(data.index["shard"] == shard)
    rows = data.index[ids]
    df = pd.DataFrame({
        "batch_id": ids, "shard": rows["shard"], "offset": rows["offset"],
        "story_first": rows["story_first"], "story_last": rows["story_last"],
        "n_stories": rows["story_last"] - rows["story_first"] + 1,
        "n_tokens": data.max_seq_len + 1, "split": "val" if shard == 0 else "train"})
    df["noisy"] = window_noise(np.asarray(data.tokens[shard]), noisy, rows["offset"], data.max_seq_len)
    for j, c in enumerate(REF_COLUMNS + names):
        df[c] = values[:, j]
    return df


def write_batch_metrics(data_dir, vocab_size, max_seq_len, tables_dir=None, metric_spec="all",
                        workers=None, ref_model=""):
    import pandas as pd
    from tqdm import tqdm
    try:
        names = metrics.resolve_metrics(metric_spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    tables_dir = Path(tables_dir or TABLES_DIR)
    data = BatchData(data_dir, vocab_size, max_seq_len)
    stamps = json.loads((tok_dir(data_dir, vocab_size) / "stamps.json").read_text())
    shard_keys = [stamps[s["name"].replace(".bin", ".json")] for s in data.meta["shards"]]
    # 1) the reference scorer, fitted on the validation shard (shard 0)
    if ref_model:
        scorer_fp = ModelScorer(ref_model).fingerprint()
    else:
        scorer_fp = fit_reference_scorer(data_dir, vocab_size, np.asarray(data.tokens[0]),
                                         shard_keys[0]).fingerprint()
    # 2) per shard, reusing the cached scores when nothing they depend on changed
    cache = index_dir(data_dir, vocab_size, max_seq_len) / "metrics"
    cache.mkdir(parents=True, exist_ok=True)
    want = {"metrics": names, "versions": metrics.metric_versions(names), "scorer": scorer_fp,
            "metrics_version": metrics.METRICS_VERSION}
    jobs = []
    for s, key in enumerate(shard_keys):
        npy, stamp = cache / f"shard{s:02d}.npy", cache / f"shard{s:02d}.json"
        if not (npy.exists() and stamp.exists() and json.loads(stamp.read_text()) == {**want, "key": key}):
            jobs.append((data_dir, vocab_size, max_seq_len, s, names, ref_model, npy))
    with ProcessPoolExecutor(min(workers or os.cpu_count(), max(1, len(jobs)))) as pool:
        for s in tqdm(pool.map(_score_shard, jobs), total=len(jobs), desc="batch metrics", disable=not jobs):
            write_json_atomic(cache / f"shard{s:02d}.json", {**want, "key": shard_keys[s]})
    # 3) stream the shards into one table (memory flat in the number of shards)
    cols = ID_COLUMNS + ["noisy"] + REF_COLUMNS + names
    summaries = []
    with atomic_path(tables_dir / "batch_metrics.csv") as tmp, open(tmp, "w") as out:
        for s in range(len(shard_keys)):
            noisy = story_noise(raw_dir(data_dir) / data.meta["shards"][s]["name"].replace(".bin", ".json"))
            df = _shard_frame(data, s, np.load(cache / f"shard{s:02d}.npy"), names, noisy)
            df.to_csv(out, index=False, header=s == 0, float_format="%.6g")
            summ = {"shard": s, "split": "val" if s == 0 else "train", "n_batches": len(df),
                    "n_tokens": int(data.meta["shards"][s]["n_tokens"]),
                    "n_stories": int(data.meta["shards"][s]["n_stories"])}
            summ.update({f"{c}_mean": df[c].mean() for c in ["noisy"] + REF_COLUMNS + names})
            summ.update({f"{c}_std": df[c].std() for c in ["noisy"] + REF_COLUMNS + names})
            summaries.append(summ)
    with atomic_path(tables_dir / "shard_metrics.csv") as tmp:
        pd.DataFrame(summaries).to_csv(tmp, index=False, float_format="%.6g")
    meta = {"vocab_size": vocab_size, "max_seq_len": max_seq_len, "n_batches": len(data),
            "tokenizer": data.meta["tokenizer"], "tokenizer_sha256": data.meta["tokenizer_sha256"],
            "data_dir": str(Path(data_dir).resolve()), **want}
    write_json_atomic(tables_dir / "batch_metrics.json", meta)
    print(f"wrote {tables_dir / 'batch_metrics.csv'} ({len(data)} batches x {len(cols)} columns) "
          f"and {tables_dir / 'shard_metrics.csv'}")
    return tables_dir / "batch_metrics.csv"


# -----------------------------------------------------------------------------
# reading the table back

def load_batch_metrics(tables_dir, data=None):
    """The batch metrics table, checked against the batch index it must describe."""
    import pandas as pd
    tables_dir = Path(tables_dir)
    csv, meta_p = tables_dir / "batch_metrics.csv", tables_dir / "batch_metrics.json"
    fix = "run python tinystories.py pretokenize with the same --vocab_size and --max_seq_len"
    if not csv.exists() or not meta_p.exists():
        raise UserError(f"no batch metrics in {tables_dir}: {fix}")
    meta = json.loads(meta_p.read_text())
    if data is not None and (meta["vocab_size"] != data.vocab_size or meta["max_seq_len"] != data.max_seq_len
                             or meta["tokenizer_sha256"] != data.meta["tokenizer_sha256"]
                             or meta["n_batches"] != len(data)):
        raise UserError(f"{csv} was made with another tokenizer or max_seq_len (vocab {meta['vocab_size']}, "
                        f"T {meta['max_seq_len']}) than the data in use: {fix}")
    df = pd.read_csv(csv)
    if len(df) != meta["n_batches"] or not (df["batch_id"].to_numpy() == np.arange(len(df))).all():
        raise UserError(f"{csv} is incomplete or reordered: {fix}")
    return df, meta


def load_metric_column(tables_dir, name: str, data) -> np.ndarray:
    """One metric for every batch_id, for metric-based schedules."""
    df, meta = load_batch_metrics(tables_dir, data)
    numeric = [c for c in df.columns if c not in ID_COLUMNS]
    if name not in numeric:
        raise UserError(f"unknown batch metric {name!r}; valid: {', '.join(numeric)}")
    return df[name].to_numpy(dtype=np.float64)
