"""
Evaluate every checkpoint of a run (stage 3c): validation loss, generations from fixed
prompts scored with the same metrics as the training batches, and the mean batch
metrics of what each checkpoint was trained on.

$ python eval.py                                    # the default run in out/
$ python eval.py --out_dir=out/curriculum           # another run
$ python eval.py --temperature=0.8 --top_p=0.9      # also a sampled generation per prompt
$ python eval.py --n_prompts=16 --max_new_tokens=100 --redo=True
$ WANDB_MODE=offline python eval.py --out_dir=out/canary --wandb_log=True   # also to wandb (tracking.py)

Outputs and inputs side by side, per checkpoint, is what a saturation curve or an
experiment compares: <out_dir>/tables/eval_outputs.csv (one row per checkpoint x decoding
x prompt), eval_summary.csv (per checkpoint) and summary.csv (out_* prompt means next to
in_* batch means). Checkpoints already evaluated with the same settings are skipped (kept
in tables/eval_config.json with a stamp of each checkpoint file); --redo=True redoes
everything. The prompts and every column are defined in docs/evaluation.md.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import metrics
from model import mean_loss
from prebias import batchmetrics, metrics_engine, tracking
from prebias.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoints, run_config
from prebias.common import (DoneRecord, UserError, auto_device, file_signature, main_guard, parse_config,
                            write_csv_atomic)
from prebias.configs import EvalConfig, check_eval
from prebias.data import TABLES_DIR, BatchData, load_stories, raw_shards, sha256_file
from prebias.refscorer import reference_scorer
from tokenizer import Tokenizer

# config: EvalConfig (prebias/configs.py) holds every key with its default and why
# -----------------------------------------------------------------------------

EVAL_VERSION = 2  # bump when an output column's definition changes
OPEN_PROMPT = "Once upon a time"
OUTPUT_METRICS = metrics.output_metric_names()


@dataclass
class Prompt:
    prompt_id: int
    story_index: int
    tokens: list  # BOS + prompt tokens
    expected: list  # true continuation tokens ([] for the open prompt)


# -----------------------------------------------------------------------------
# the run and its data

def eval_run_config(cfg: EvalConfig) -> dict:
    """The run's training config (checkpoint.run_config), with this eval's overrides."""
    run = run_config(cfg.out_dir)
    run["data_dir"] = cfg.data_dir or run.get("data_dir", "data")
    run["tables_dir"] = cfg.tables_dir or run.get("tables_dir", str(TABLES_DIR))
    for k in ("vocab_size", "max_seq_len"):
        if k not in run:
            raise UserError(f"{cfg.out_dir}/config.json has no {k}: it was not written by train.py")
    return run


def word_cut(ids: list[int], at_least: int, enc) -> int | None:
    """The first position >= at_least where a new word starts (a piece beginning with
    sentencepiece's '▁', or a newline), so a prompt of ids[:cut] ends with a whole word."""
    for k in range(at_least, len(ids)):
        piece = enc.sp.id_to_piece(ids[k])
        if piece.startswith("▁") or piece == "<0x0A>":
            return k
    return None


def build_prompts(cfg: EvalConfig, run: dict, enc) -> list[Prompt]:
    """n_prompts held-out story openings, then the open prompt."""
    T = int(run["max_seq_len"])
    if cfg.prompt_tokens < 1 or cfg.prompt_tokens + 1 >= T:
        raise UserError(f"--prompt_tokens={cfg.prompt_tokens}: must be in [1, {T - 2}] "
                        f"(the model's max_seq_len is {T})")
    n_exp = min(cfg.max_new_tokens, T - (cfg.prompt_tokens + 1))
    stories = load_stories(raw_shards(run["data_dir"])[0])
    prompts = []
    for i, story in enumerate(stories):
        if len(prompts) == cfg.n_prompts:
            break
        ids = enc.encode(story)  # BOS first
        cut = word_cut(ids, cfg.prompt_tokens + 1, enc)
        if cut is not None and cut + 1 < len(ids) and cut + 1 < T:
            prompts.append(Prompt(len(prompts), i, ids[:cut], ids[cut:cut + min(n_exp, T - cut)]))
    if len(prompts) < cfg.n_prompts:
        raise UserError(f"--n_prompts={cfg.n_prompts}: shard 0 of {run['data_dir']} has only "
                        f"{len(prompts)} stories longer than {cfg.prompt_tokens + 1} tokens; ask for fewer")
    prompts.append(Prompt(len(prompts), -1, enc.encode(OPEN_PROMPT), []))
    return prompts


def settings(cfg: EvalConfig, data, scorer, data_dir) -> dict:
    """Everything the cached results depend on, besides the checkpoint itself."""
    keep = ("val_batches", "n_prompts", "prompt_tokens", "max_new_tokens", "temperature", "top_p", "seed")
    s = {k: getattr(cfg, k) for k in keep}
    if cfg.temperature <= 0:  # sampling settings are unused then
        s.update(top_p=None, seed=None)
    s.update(eval_version=EVAL_VERSION, metrics_version=metrics.METRICS_VERSION,
             metric_versions=metrics.metric_versions(), scorer=scorer.fingerprint(),
             tokenizer_sha256=data.meta["tokenizer_sha256"],
             prompt_shard_sha256=sha256_file(raw_shards(data_dir)[0]))  # the prompts' stories
    return s


# -----------------------------------------------------------------------------
# one checkpoint

def generate(model, prompts: list[Prompt], cfg: EvalConfig) -> dict[str, list[list[int]]]:
    """{decoding: new tokens per prompt}, one batched KV-cached call per decoding."""
    toks = [p.tokens for p in prompts]
    out = {"greedy": model.generate(toks, cfg.max_new_tokens, temperature=0.0)}
    if cfg.temperature > 0:
        out["sampled"] = model.generate(toks, cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_p=cfg.top_p, seed=cfg.seed)
    return out


def score_outputs(it: int, prompts: list[Prompt], gens: dict, enc, scorer) -> pd.DataFrame:
    """The eval_outputs.csv rows of one checkpoint."""
    frames = []
    for decoding, new in gens.items():
        texts = [enc.decode(g) for g in new]
        df = pd.DataFrame({
            "iter": it, "decoding": decoding,
            "prompt_id": [p.prompt_id for p in prompts],
            "story_index": [p.story_index for p in prompts],
            "prompt": [enc.decode(p.tokens[1:]) for p in prompts],
            "generated": texts,
            "expected": [enc.decode(p.expected) for p in prompts],
            "n_prompt_tokens": [len(p.tokens) for p in prompts],
            "n_new_tokens": [len(g) for g in new],
            "n_expected_tokens": [len(p.expected) for p in prompts],
        })
        nll = []
        for p, g in zip(prompts, new):  # nll of the generated tokens only, given BOS + prompt
            t = scorer.token_nll(np.asarray(p.tokens + g, dtype=np.int64))
            nll.append(float(t[len(p.tokens) - 1:].mean()) if g else math.nan)
        df["ref_nll"] = nll
        df["ref_ppl"] = np.exp(df["ref_nll"])
        has_ref = np.array([bool(p.expected) for p in prompts])
        for name in ("bleu", "rouge_l", "prefix_match"):
            df[name] = math.nan
        if has_ref.any():
            sel = np.flatnonzero(has_ref)
            ov = metrics.overlap_metrics([texts[i] for i in sel], [df["expected"][i] for i in sel],
                                         [new[i] for i in sel], [prompts[i].expected for i in sel])
            for name, col in ov.items():
                df.loc[sel, name] = col
        for name, col in metrics_engine.text_metrics(texts).items():
            df[name] = col
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarise_outputs(out: pd.DataFrame) -> dict:
    """Prompt means of every output metric, greedy unprefixed, sampled with _sampled."""
    row = {}
    for decoding, g in out.groupby("decoding", sort=False):
        suffix = "" if decoding == "greedy" else f"_{decoding}"
        for m in OUTPUT_METRICS:
            row[m + suffix] = g[m].mean()  # skips NaN; all-NaN -> NaN
    return row


# -----------------------------------------------------------------------------
# input side: batch metric means over the ids recorded in the checkpoints

def batch_metric_columns(bm: pd.DataFrame) -> list[str]:
    return [c for c in bm.columns if c not in batchmetrics.ID_COLUMNS and pd.api.types.is_numeric_dtype(bm[c])]


class BatchMeans:
    """Running means of every batch metric: feed each checkpoint's ids in order."""

    def __init__(self, bm: pd.DataFrame, table_path):
        self.cols = batch_metric_columns(bm)
        self.vals = bm[self.cols].to_numpy(dtype=np.float64)  # row = batch_id
        self.path = table_path
        self.sum = np.zeros(len(self.cols))
        self.cnt = np.zeros(len(self.cols))
        self.n_cum = 0

    def add(self, ids: np.ndarray) -> dict:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vals)):
            raise UserError(f"a checkpoint records batch id {int(ids.max())} but {self.path} has "
                            f"{len(self.vals)} batches: pass the run's --tables_dir and --data_dir")
        sub = self.vals[ids]
        ok = ~np.isnan(sub)
        s, c = np.where(ok, sub, 0.0).sum(0), ok.sum(0)
        self.sum += s
        self.cnt += c
        self.n_cum += ids.size
        row = {"n_batches_since": ids.size, "n_batches_cum": self.n_cum}
        with np.errstate(invalid="ignore", divide="ignore"):
            since = np.where(c > 0, s / np.maximum(c, 1), np.nan)
            cum = np.where(self.cnt > 0, self.sum / np.maximum(self.cnt, 1), np.nan)
        row.update({f"in_{k}_since": v for k, v in zip(self.cols, since)})
        row.update({f"in_{k}_cum": v for k, v in zip(self.cols, cum)})
        return row


# -----------------------------------------------------------------------------
# cache of finished checkpoints

def load_cache(tables: Path, want: dict, redo: bool):
    """(outputs, summary, record) of earlier evaluations: common.DoneRecord in
    eval_config.json (the settings, and the file signature of each evaluated checkpoint)."""
    record = DoneRecord(tables / "eval_config.json", want, redo)
    out_p, sum_p = tables / "eval_outputs.csv", tables / "eval_summary.csv"
    if record.changed:
        print(f"eval settings changed since {record.path} was written: re-evaluating every checkpoint")
    if not record.done or not (out_p.exists() and sum_p.exists()):
        record.done = {}
        return pd.DataFrame(), pd.DataFrame(), record
    try:
        outputs, summary = pd.read_csv(out_p, keep_default_na=False, na_values=[""]), pd.read_csv(sum_p)
        bad = cache_problem(out_p, outputs, sum_p, summary, want["temperature"] > 0)
    except (ValueError, OSError, pd.errors.ParserError):
        bad = f"{tables}: the cached eval tables cannot be read"
    if bad:  # a cache: recomputed whole, and both tables rewritten (the old rows are not kept)
        print(f"{bad}: re-evaluating every checkpoint")
        record.done = {}
        return pd.DataFrame(), pd.DataFrame(), record
    for c in ("prompt", "generated", "expected"):  # empty texts must stay "", not NaN
        outputs[c] = outputs[c].fillna("").astype(str)
    return outputs, summary, record


def cache_problem(out_p: Path, outputs: pd.DataFrame, sum_p: Path, summary: pd.DataFrame, sampled: bool) -> str:
    """'' when both cached tables have every column this version writes (iter an integer,
    the metrics numbers), else what is wrong with which file."""
    texts = ("decoding", "prompt", "generated", "expected")
    want = {out_p: (outputs, ["iter", "prompt_id", "story_index", "n_prompt_tokens", "n_expected_tokens",
                              *OUTPUT_METRICS], texts),
            sum_p: (summary, ["iter", "tokens_seen", "n_batches_seen", "val_loss", "val_ppl", "train_loss",
                              *OUTPUT_METRICS, *(f"{m}_sampled" for m in OUTPUT_METRICS if sampled)], ())}
    for path, (df, numeric, other) in want.items():
        missing = [c for c in (*numeric, *other) if c not in df.columns]
        if missing:
            return f"{path} lacks the column {missing[0]!r}"
        wrong = [c for c in numeric if not pd.api.types.is_numeric_dtype(df[c]) and len(df)]
        if wrong or (len(df) and not pd.api.types.is_integer_dtype(df["iter"])):
            return f"{path}: column {(wrong or ['iter'])[0]!r} does not hold numbers"
    return ""


def write_eval_tables(tables: Path, outputs, summary, record: DoneRecord, keep):
    write_csv_atomic(outputs.sort_values(["iter", "decoding", "prompt_id"], kind="stable"),
                     tables / "eval_outputs.csv")
    write_csv_atomic(summary.sort_values("iter"), tables / "eval_summary.csv")
    record.save(keep=keep)


# -----------------------------------------------------------------------------

def check_chain(ckpts: list):
    """Before anything is evaluated: each checkpoint follows the one listed before it, so
    the batches every checkpoint has seen are known (the memory-mapped small fields only)."""
    prev = -1
    for it, path in ckpts:
        p = int(load_checkpoint(path)["prev_iter"])
        if p > prev:  # the checkpoints between are missing
            raise UserError(f"{path} follows step {p} but the checkpoint before it is step {prev}: restore "
                            f"ckpt_{p}.pt (and any between) so the batches seen are known")
        if p < prev:  # two lines of training from step p are mixed
            raise UserError(f"{path} follows step {p}, but ckpt_{prev}.pt lies between: it does not lead to "
                            f"{path.name} (a second run from step {p} into the same folder?): move out of "
                            f"{path.parent} the checkpoints that are not this run's (ckpt_{prev}.pt, or "
                            f"{path.name} and those after it)")
        prev = it


def evaluate(cfg: EvalConfig):
    from tqdm import tqdm

    # 1) the run, its data, prompts and yardsticks
    ckpts = run_checkpoints(cfg.out_dir)
    check_chain(ckpts)
    run = eval_run_config(cfg)
    V, T = int(run["vocab_size"]), int(run["max_seq_len"])
    data = BatchData(run["data_dir"], V, T)
    means = None
    if (Path(run["tables_dir"]) / "batch_metrics.csv").exists():
        bm, _ = batchmetrics.load_batch_metrics(run["tables_dir"], data)
        means = BatchMeans(bm, Path(run["tables_dir"]) / "batch_metrics.csv")
    else:
        print(f"no batch metrics in {run['tables_dir']} (pretokenized with --metrics=none?): summary.csv "
              "has the outputs only, no in_<metric> columns")
    scorer = reference_scorer(run["data_dir"], V)
    enc = Tokenizer.for_vocab(V, run["data_dir"])
    prompts = build_prompts(cfg, run, enc)
    val_ids = data.val_ids[:cfg.val_batches]
    if len(val_ids) == 0 or cfg.val_batches < 1:
        raise UserError(f"--val_batches={cfg.val_batches}: need at least 1 ({data.n_val} available)")
    device = auto_device(cfg.device)

    # 2) reuse what is cached with the same settings and an unchanged checkpoint file
    tables = Path(cfg.out_dir) / "tables"
    want = settings(cfg, data, scorer, run["data_dir"])
    outputs, summary, record = load_cache(tables, want, cfg.redo)
    have = set(summary["iter"]) if len(summary) else set()
    iters_now = {it for it, _ in ckpts}
    keep = sorted(iters_now & have)

    # 3) every checkpoint in order: input means always, outputs only when not cached
    in_rows, new, n_cum = [], [], 0
    for it, path in tqdm(ckpts, desc="eval", unit="ckpt"):
        ck = load_checkpoint(path)
        n_cum += ck["batch_ids"].numel()
        in_rows.append({"iter": it, **(means.add(ck["batch_ids"].numpy()) if means else
                                        {"n_batches_since": ck["batch_ids"].numel(), "n_batches_cum": n_cum})})
        if it in have and record.is_done(it, file_signature(path)):
            continue
        model = model_from_checkpoint(ck, device)
        vl = mean_loss(model, data, val_ids, cfg.batch_size, device)
        out = score_outputs(it, prompts, generate(model, prompts, cfg), enc, scorer)
        row = {"iter": it, "tokens_seen": n_cum * T, "n_batches_seen": n_cum,
               "val_loss": vl, "val_ppl": math.exp(vl), "train_loss": float(ck["train_loss"]),
               **summarise_outputs(out)}
        keep_o = outputs[outputs["iter"] != it] if len(outputs) else outputs
        keep_s = summary[summary["iter"] != it] if len(summary) else summary
        outputs = pd.concat([keep_o, out], ignore_index=True)
        summary = pd.concat([keep_s, pd.DataFrame([row])], ignore_index=True)
        record.mark(it, file_signature(path))
        keep.append(it)
        write_eval_tables(tables, outputs, summary, record, keep)  # progress survives a crash
        new.append(it)
        del model, ck

    # 4) drop rows of checkpoints that no longer exist, then the joined summary
    outputs = outputs[outputs["iter"].isin(iters_now)]
    summary = summary[summary["iter"].isin(iters_now)]
    write_eval_tables(tables, outputs, summary, record, sorted(iters_now))
    joined = join_summary(summary, pd.DataFrame(in_rows))
    write_csv_atomic(joined, tables / "summary.csv")
    print(f"evaluated {len(new)} checkpoint(s), reused {len(ckpts) - len(new)} from the cache")
    for name in ("eval_outputs.csv", "eval_summary.csv", "summary.csv", "eval_config.json"):
        print(f"wrote {tables / name}")
    if cfg.wandb_log and new:
        log_wandb(cfg, run, joined[joined["iter"].isin(new)], outputs[outputs["iter"].isin(new)])
    return joined


def log_wandb(cfg: EvalConfig, run: dict, rows: pd.DataFrame, outputs: pd.DataFrame):
    """Each newly evaluated checkpoint's summary.csv row as eval/<column> against eval/iter
    (its own step axis: the training run's steps are already logged), and the generations."""
    wb = tracking.start(project=run.get("wandb_project", "llama2_prebiasing"), dir=cfg.out_dir, config=run,
                        name=run.get("wandb_run_name") or f"{Path(cfg.out_dir).name}-eval",
                        group=run.get("wandb_group", ""), job_type=run.get("wandb_job_type", "") or "eval",
                        run_id=run.get("wandb_run_id", ""))
    wb.define_metric("eval/iter")
    wb.define_metric("eval/*", step_metric="eval/iter")
    for _, r in rows.iterrows():
        wb.log({f"eval/{k}": float(v) for k, v in r.items() if np.isfinite(v)})
    wb.log({"eval/generations": tracking.table(outputs[["iter", "decoding", "prompt", "generated"]])})
    wb.finish()


def join_summary(summary: pd.DataFrame, inputs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: losses, out_<metric> prompt means and in_<metric>_since/_cum means."""
    base = ["iter", "tokens_seen", "val_loss", "val_ppl", "train_loss"]
    s = summary.sort_values("iter").reset_index(drop=True)
    outs = s[[c for c in s.columns if c not in base and c != "n_batches_seen"]].add_prefix("out_")
    left = pd.concat([s[base], outs], axis=1)
    j = left.merge(inputs, on="iter", how="left")
    front = ["iter", "tokens_seen", "n_batches_since", "n_batches_cum", "val_loss", "val_ppl", "train_loss"]
    return j[front + [c for c in j.columns if c not in front]]


def main(argv=None):
    cfg = parse_config(EvalConfig(), sys.argv[1:] if argv is None else argv)
    check_eval(cfg)  # the values alone (experiment.py runs it on a spec's eval settings too)
    return evaluate(cfg)


if __name__ == "__main__":
    main_guard(main)
