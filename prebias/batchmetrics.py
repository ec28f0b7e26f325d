"""
Batch metrics (stage 1b): every batch's decoded text scored with metrics.py, plus its
loss under the reference scorer, into out/tables/batch_metrics.csv (one row per
batch_id), out/tables/shard_metrics.csv (per shard) and out/tables/batch_metrics.json
(tokenizer, vocab size, max_seq_len, metric versions, scorer fingerprint).

Run by `python tinystories.py pretokenize`; reused by train.py (metric orders) and
eval.py (means over the batches each checkpoint saw). The reference scorer is the one
yardstick for inputs and outputs: by default a token 3-gram model fitted on the
holdout's stories (data/tok{V}/ref_ngram3.npz; refscorer.reference_source), or a
trained model (--ref_model). The split column says val, train or holdout (a training
batch touching a held-out story: runs that read the reference never train on it);
batch_metrics.json says what the scorer was fitted on (scorer_fit).

$ python tinystories.py pretokenize --vocab_size=512 --metrics=sentiment,fk_grade
$ python tinystories.py pretokenize --ref_model=model.bin
"""

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import metrics
from prebias import metrics_engine
from prebias.common import DoneRecord, UserError, atomic_path, write_json_atomic
from prebias.data import (TABLES_DIR, BatchData, index_dir, raw_dir, shard_window_texts, shard_windows_2d, story_noise,
                          story_noise_free, tok_dir, token_stamps, window_noise)
from prebias.inputs import read_csv, read_json
from prebias.refscorer import ModelScorer, fit_reference_scorer, reference_scorer, scorer_fit, scorer_path
from prebias.sp_tokenizer import Tokenizer

ID_COLUMNS = ["batch_id", "shard", "offset", "story_first", "story_last", "n_stories", "n_tokens", "split"]
REF_COLUMNS = ["ref_nll", "ref_ppl"]


# -----------------------------------------------------------------------------
# per-shard work (a process per shard): score into a cached .npy, then format its CSV rows

_SCORERS: dict = {}  # per process: the reference scorer of the last (data, model file) scored


def _scorer(data_dir, vocab_size, ref_model, fitted=None):
    """reference_scorer, loaded once per process (a worker scores several shards: its
    lookup and probability tables are built once), again when its file changes; fitted:
    the scorer just fitted and saved to that file, kept instead of loading it."""
    p = Path(ref_model) if ref_model else scorer_path(data_dir, vocab_size)
    st = p.stat() if p.exists() else None
    key = (str(Path(data_dir).resolve()), vocab_size, str(ref_model), st and (st.st_mtime_ns, st.st_size, st.st_ino))
    if key not in _SCORERS or st is None or fitted is not None:
        _SCORERS.clear()
        _SCORERS[key] = fitted if fitted is not None else reference_scorer(data_dir, vocab_size, ref_model)
    return _SCORERS[key]


def _score_shard(job):
    """Score one shard's batches: a float64 matrix (batch, [ref_nll, ref_ppl, *names])
    saved as .npy (binary, so a reused shard costs only its formatting)."""
    data_dir, vocab_size, max_seq_len, shard, names, ref_model, out_npy, gender = job
    if metrics.gender_words() != tuple(gender):  # the parent's lists, also where workers are spawned, not forked
        metrics.set_gender_words(*gender)  # (only when they differ: new lists rebuild the engine's tables)
    data = BatchData(data_dir, vocab_size, max_seq_len)
    enc = Tokenizer.for_vocab(vocab_size, data_dir)
    offsets = data.index["offset"][data.index["shard"] == shard]
    tokens = np.asarray(data.tokens[shard])
    nll = _scorer(data_dir, vocab_size, ref_model).nll_many(shard_windows_2d(tokens, offsets, max_seq_len))
    texts = shard_window_texts(tokens, offsets, max_seq_len, enc)
    cols = [nll, np.exp(nll), *metrics_engine.text_metrics(texts, names).values()]
    with atomic_path(out_npy) as tmp, open(tmp, "wb") as f:
        np.save(f, np.stack(cols, axis=1).astype(np.float64), allow_pickle=False)
    return shard


def _shard_rows(job) -> tuple[str, dict]:
    """One shard's batch_metrics.csv rows as text (no header) and its shard_metrics.csv
    summary. Formatted here, in the worker, as pandas' to_csv(float_format="%.6g") would
    (ints plain, floats %.6g, NaN empty), at a fraction of its per-cell cost."""
    data_dir, vocab_size, max_seq_len, shard, names, ref_model, npy, _ = job
    if ref_model is not None:  # not cached: score it first
        _score_shard(job)
    data = BatchData(data_dir, vocab_size, max_seq_len)
    ids = np.flatnonzero(data.index["shard"] == shard)
    rows = data.index[ids]
    raw = raw_dir(data_dir) / data.meta["shards"][shard]["name"].replace(".bin", ".json")
    if story_noise_free(raw):  # no story is marked: every window's share is 0 (no JSON to parse)
        noisy = np.zeros(len(ids))
    else:
        noisy = window_noise(np.asarray(data.tokens[shard]), story_noise(raw), rows["offset"], max_seq_len)
    values = np.column_stack([noisy, np.load(npy)])  # (batch, [noisy, ref_nll, ref_ppl, *names])
    split = "val" if shard == 0 else "train"
    splits = np.where(np.isin(ids, data.holdout_ids), "holdout", split)  # the holdout: a marking, ids unchanged
    fixed = [(*r, sp) for r, sp in zip(np.column_stack([ids, rows["shard"], rows["offset"], rows["story_first"],
                                                        rows["story_last"], rows["story_last"] - rows["story_first"] + 1])
                                       .astype(np.int64).tolist(), splits.tolist())]
    head = "%d,%d,%d,%d,%d,%d," + f"{max_seq_len + 1}," + "%s"
    tail = ",%.6g" * values.shape[1]
    text = "\n".join(map(str.__add__, map(head.__mod__, map(tuple, fixed)), map(tail.__mod__, map(tuple, values.tolist()))))
    text = text.replace(",nan", ",") + "\n" if len(ids) else ""  # NaN -> empty cell, as pandas writes it
    summ = {"shard": shard, "split": split, "n_batches": len(ids), "n_holdout": int((splits == "holdout").sum()),
            "n_tokens": int(data.meta["shards"][shard]["n_tokens"]),
            "n_stories": int(data.meta["shards"][shard]["n_stories"])}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column's mean is NaN, as in pandas
        cols = ["noisy"] + REF_COLUMNS + names
        summ.update({f"{c}_mean": float(v) for c, v in zip(cols, np.nanmean(values, axis=0))})
        summ.update({f"{c}_std": float(v) for c, v in zip(cols, np.nanstd(values, axis=0, ddof=1))})
    return text, summ


def _summary_csv(summaries: list[dict]) -> str:
    """shard_metrics.csv as pandas' DataFrame(summaries).to_csv(index=False,
    float_format="%.6g") writes it (ints plain, floats %.6g, NaN empty), without
    importing pandas (half a second of the command)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if v != v else "%.6g" % v
        return str(v)

    cols = list(summaries[0]) if summaries else []
    return "".join(",".join(map(cell, r)) + "\n" for r in [cols] + [[s[c] for c in cols] for s in summaries])


def check_request(metric_spec, ref_model, vocab_size: int, max_seq_len: int, tokenizer_sha: str = "") -> list[str]:
    """The metric names asked for; one line for an unknown metric or a reference model
    that cannot score this data whole (pretokenize calls it before it writes anything)."""
    try:
        names = metrics.resolve_metrics(metric_spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    if ref_model:
        ModelScorer(ref_model).check(vocab_size, max_seq_len, tokenizer_sha)
    return names


def write_batch_metrics(data_dir, vocab_size, max_seq_len, tables_dir=None, metric_spec="all",
                        workers=None, ref_model=""):
    from tqdm import tqdm
    names = check_request(metric_spec, "", vocab_size, max_seq_len)  # the reference model is checked below
    tables_dir = Path(tables_dir or TABLES_DIR)
    data = BatchData(data_dir, vocab_size, max_seq_len)
    stamps = token_stamps(data_dir, vocab_size).done
    shard_keys = [stamps.get(s["name"].replace(".bin", ".json")) for s in data.meta["shards"]]
    if None in shard_keys:  # tokens made by an older version, or stamps.json deleted
        raise UserError(f"{tok_dir(data_dir, vocab_size) / 'stamps.json'} does not describe every shard: run "
                        f"python tinystories.py pretokenize --vocab_size={vocab_size} --max_seq_len={max_seq_len}")
    # 1) the reference scorer, fitted on the holdout (the validation shard where there is none)
    if ref_model:
        ref = ModelScorer(ref_model)
        ref.check(vocab_size, max_seq_len, data.meta["tokenizer_sha256"])
        scorer, scorer_fp = None, ref.fingerprint()
        fit = {"on": "model", "path": str(ref_model)}
    else:
        scorer = fit_reference_scorer(data_dir, vocab_size, shard_keys[0])
        scorer_fp, fit = scorer.fingerprint(), scorer_fit(data_dir, vocab_size)
    # 2) per shard, reusing the cached scores when nothing they depend on changed (the
    # metric versions carry the gender word lists' hash; the shard key its tokens')
    cache = index_dir(data_dir, vocab_size, max_seq_len) / "metrics"
    cache.mkdir(parents=True, exist_ok=True)
    want = {"metrics": names, "versions": metrics.metric_versions(names), "scorer": scorer_fp,
            "metrics_version": metrics.METRICS_VERSION}
    done = DoneRecord(cache / "done.json", want)
    jobs = []
    for s, key in enumerate(shard_keys):
        npy = cache / f"shard{s:02d}.npy"
        cached = done.is_done(s, key, npy)
        jobs.append((data_dir, vocab_size, max_seq_len, s, names, None if cached else ref_model, npy,
                     metrics.gender_words()))
    n_todo = sum(j[5] is not None for j in jobs)
    if n_todo and scorer is not None:  # its tables built once, here: forked workers share them (copy on write)
        _scorer(data_dir, vocab_size, "", scorer)._probs()
    # 3) stream the shards' rows into one table, in shard order (memory flat in the number of shards)
    cols = ID_COLUMNS + ["noisy"] + REF_COLUMNS + names
    summaries = []
    # a model scorer runs torch in the workers: forked from a parent whose OpenMP pool has
    # started they can deadlock (seen in the test suite), so those start fresh (spawn)
    ctx = multiprocessing.get_context("spawn") if ref_model else None
    with ProcessPoolExecutor(min(workers or os.cpu_count(), len(jobs)), mp_context=ctx) as pool, \
            atomic_path(tables_dir / "batch_metrics.csv") as tmp, open(tmp, "w") as out:
        out.write(",".join(cols) + "\n")
        bar = tqdm(pool.map(_shard_rows, jobs), total=len(jobs), desc=f"batch metrics ({n_todo} to score)")
        for (text, summ), job in zip(bar, jobs):
            out.write(text)
            summaries.append(summ)
            done.mark(job[3], shard_keys[job[3]], save=True)  # progress survives an interruption
    done.save(keep=range(len(shard_keys)))
    for old in cache.glob("shard*.json"):
        old.unlink()  # the per-shard stamps of earlier versions, replaced by done.json
    with atomic_path(tables_dir / "shard_metrics.csv") as tmp:
        tmp.write_text(_summary_csv(summaries))
    meta = {"vocab_size": vocab_size, "max_seq_len": max_seq_len, "n_batches": len(data),
            "tokenizer": data.meta["tokenizer"], "tokenizer_sha256": data.meta["tokenizer_sha256"],
            "data_dir": str(Path(data_dir).resolve()), "scorer_fit": fit, **want}
    write_json_atomic(tables_dir / "batch_metrics.json", meta)
    print(f"wrote {tables_dir / 'batch_metrics.csv'} ({len(data)} batches x {len(cols)} columns) "
          f"and {tables_dir / 'shard_metrics.csv'}")
    return tables_dir / "batch_metrics.csv"


# -----------------------------------------------------------------------------
# reading the table back

def load_batch_metrics(tables_dir, data=None):
    """The batch metrics table, checked against the batch index it must describe."""
    tables_dir = Path(tables_dir)
    csv, meta_p = tables_dir / "batch_metrics.csv", tables_dir / "batch_metrics.json"
    fix = "run python tinystories.py pretokenize with the same --vocab_size and --max_seq_len"
    if not csv.exists() or not meta_p.exists():
        raise UserError(f"no batch metrics in {tables_dir}: {fix}")
    meta = read_json(meta_p, "the batch metrics' record", fix, keys=("vocab_size", "max_seq_len", "tokenizer_sha256",
                                                                        "n_batches"))
    if data is not None and (meta["vocab_size"] != data.vocab_size or meta["max_seq_len"] != data.max_seq_len
                             or meta["tokenizer_sha256"] != data.meta["tokenizer_sha256"]
                             or meta["n_batches"] != len(data)):
        raise UserError(f"{csv} was made with another tokenizer or max_seq_len (vocab {meta['vocab_size']}, "
                        f"T {meta['max_seq_len']}) than the data in use: {fix}")
    head = read_csv(csv, "the batch metrics table", fix, columns=("batch_id",), nrows=0).columns
    df = read_csv(csv, "the batch metrics table", fix, columns=("batch_id",),
                  numeric=[c for c in head if c != "split"])
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
