"""eval.py on the tiny fixture run: tables, exact input means, val loss, cache and errors."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import eval as ev
import model as model_mod
from conftest import EVAL, refused, run_with_checkpoints
from prebias.common import UserError

N_PROMPTS, NEW = 2, 12
ARGS = [f"--n_prompts={N_PROMPTS}", f"--max_new_tokens={NEW}", "--val_batches=4", "--device=cpu"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A private copy of the fixture run (other tests share tiny_run), evaluated once."""
    out = tmp_path_factory.mktemp("evalrun") / "out"
    shutil.copytree(tiny_run.out_dir, out)
    ev.main([f"--out_dir={out}", *ARGS])
    return tiny_run, out


def ckpt_iters(out):
    from prebias.checkpoint import list_checkpoints
    return [it for it, _ in list_checkpoints(out)]


def test_tables_written(run):
    tiny, out = run
    iters = ckpt_iters(out)
    assert iters == [0, 1, 2, 4, 8, 16, 24]
    t = out / "tables"
    o = pd.read_csv(t / "eval_outputs.csv", keep_default_na=False, na_values=[""])
    assert len(o) == len(iters) * (N_PROMPTS + 1)
    assert sorted(o["iter"].unique()) == iters
    assert set(o["decoding"]) == {"greedy"}
    for c in ["prompt", "generated", "expected", "ref_nll", "ref_ppl", "bleu", "rouge_l", "prefix_match",
              "n_chars", "ttr", "sentiment", "rep3"]:
        assert c in o.columns
    assert (o["n_new_tokens"] <= NEW).all()
    # the open prompt has no expected text, so no overlap scores; story prompts do
    open_rows = o[o["prompt_id"] == N_PROMPTS]
    assert (open_rows["prompt"] == ev.OPEN_PROMPT).all()
    assert open_rows[["bleu", "rouge_l", "prefix_match"]].isna().all().all()
    story = o[o["prompt_id"] < N_PROMPTS]
    assert story[["bleu", "rouge_l", "prefix_match"]].notna().all().all()
    assert (story["n_expected_tokens"] == NEW).all()  # 9 + 12 tokens fit in max_seq_len 64
    assert np.allclose(o["ref_ppl"], np.exp(o["ref_nll"]), equal_nan=True)
    s = pd.read_csv(t / "eval_summary.csv")
    assert s["iter"].tolist() == iters
    assert {"tokens_seen", "val_loss", "val_ppl", "train_loss", "bleu", "ttr"} <= set(s.columns)
    j = pd.read_csv(t / "summary.csv")
    assert j["iter"].tolist() == iters
    assert any(c.startswith("out_") for c in j.columns)
    assert "in_ref_nll_since" in j.columns and "in_fk_grade_cum" in j.columns
    # out_ means are the prompt means of eval_outputs
    for it in (8, 24):
        assert j.loc[j["iter"] == it, "out_ttr"].item() == pytest.approx(o.loc[o["iter"] == it, "ttr"].mean(),
                                                                       nan_ok=True)
    assert json.loads((t / "eval_config.json").read_text())["settings"]["max_new_tokens"] == NEW


def test_input_means_match_checkpoint_ids(run):
    tiny, out = run
    from prebias.batchmetrics import ID_COLUMNS
    bm = pd.read_csv(tiny.tables_dir / "batch_metrics.csv").set_index("batch_id")
    cols = [c for c in bm.columns if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(bm[c])]
    j = pd.read_csv(out / "tables" / "summary.csv").set_index("iter")
    seen = []
    for p in sorted((out / "ckpt").glob("ckpt_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        ck = torch.load(p, map_location="cpu", weights_only=True)
        ids = ck["batch_ids"].numpy().reshape(-1)
        seen.extend(ids.tolist())
        it = ck["iter_num"]
        assert j.loc[it, "n_batches_since"] == len(ids)
        assert j.loc[it, "n_batches_cum"] == len(seen)
        for c in cols:
            since, cum = j.loc[it, f"in_{c}_since"], j.loc[it, f"in_{c}_cum"]
            if len(ids) == 0:
                assert math.isnan(since) and math.isnan(cum)
                continue
            want_since = bm.loc[ids, c].mean()
            want_cum = bm.loc[seen, c].mean()
            assert since == pytest.approx(want_since, abs=1e-9, nan_ok=True), (it, c)
            assert cum == pytest.approx(want_cum, abs=1e-9, nan_ok=True), (it, c)


def test_val_loss_direct(run):
    tiny, out = run
    from prebias.checkpoint import load_checkpoint, model_from_checkpoint
    from prebias.data import BatchData
    data = BatchData(tiny.data_dir, tiny.vocab_size, tiny.max_seq_len)
    m = model_from_checkpoint(load_checkpoint(out / "ckpt" / "ckpt_8.pt"))
    x, y = data.get(data.val_ids[:4])
    with torch.no_grad():
        want = float(m(x, y)[1])
    s = pd.read_csv(out / "tables" / "eval_summary.csv").set_index("iter")
    assert s.loc[8, "val_loss"] == pytest.approx(want, rel=1e-5)
    assert s.loc[8, "val_ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_cache_skips_done_checkpoints_and_redo_recomputes(run, monkeypatch):
    tiny, out = run
    before = pd.read_csv(out / "tables" / "eval_outputs.csv")

    def boom(*a, **k):
        raise AssertionError("generate called for a cached checkpoint")

    monkeypatch.setattr(model_mod.Transformer, "generate", boom)
    ev.main([f"--out_dir={out}", *ARGS])  # everything cached: no generation at all
    pd.testing.assert_frame_equal(pd.read_csv(out / "tables" / "eval_outputs.csv"), before)

    monkeypatch.undo()
    calls, orig = [], model_mod.Transformer.generate

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(model_mod.Transformer, "generate", counting)
    ev.main([f"--out_dir={out}", *ARGS, "--redo=True"])
    assert len(calls) == 7
    after = pd.read_csv(out / "tables" / "eval_outputs.csv")
    pd.testing.assert_frame_equal(after, before)  # deterministic
    # a changed setting invalidates the cache; a retouched checkpoint file is redone alone
    calls.clear()
    ev.main([f"--out_dir={out}", *ARGS[:-1], "--val_batches=2"])
    assert len(calls) == 7
    calls.clear()
    p = out / "ckpt" / "ckpt_4.pt"
    p.write_bytes(p.read_bytes())  # new mtime: stamp differs
    ev.main([f"--out_dir={out}", *ARGS[:-1], "--val_batches=2"])
    assert len(calls) == 1


def test_sampled_decoding_adds_rows(run, tmp_path):
    tiny, out = run
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    ev.main([f"--out_dir={dst}", "--n_prompts=1", "--max_new_tokens=6", "--val_batches=1",
             "--temperature=1.0", "--top_p=0.9", "--seed=3"])
    o = pd.read_csv(dst / "tables" / "eval_outputs.csv")
    assert len(o) == 7 * 2 * 2
    j = pd.read_csv(dst / "tables" / "summary.csv")
    assert "out_ttr_sampled" in j.columns and "out_ttr" in j.columns


def test_no_checkpoints_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        ev.main([f"--out_dir={tmp_path / 'empty'}"])


def test_unknown_key_is_user_error():
    with pytest.raises(UserError, match="unknown config key"):
        ev.main(["--nonsense=1"])


def test_prompts_end_with_a_whole_word(run):
    tiny, out = run
    from tokenizer import Tokenizer
    enc = Tokenizer.for_vocab(512, tiny.data_dir)
    cfg = ev.EvalConfig(out_dir=str(out), n_prompts=3, prompt_tokens=8)
    prompts = ev.build_prompts(cfg, ev.eval_run_config(cfg), enc)
    from prebias.data import load_stories, raw_shards
    stories = load_stories(raw_shards(tiny.data_dir)[0])
    for p in prompts[:-1]:
        text = enc.decode(p.tokens[1:])
        story = stories[p.story_index]
        assert len(p.tokens) >= 9 and story.startswith(text)
        assert story[len(text)] in " \n"  # the next character begins a new word
        assert enc.decode(p.tokens[1:] + p.expected).strip() in story
    assert enc.decode(prompts[0].tokens[1:]) == " ".join(stories[0].split(" ")[:len(enc.decode(prompts[0].tokens[1:]).split(" "))])


def test_gender_word_lists_are_part_of_the_cache_key(run, monkeypatch):
    import metrics
    tiny, out = run
    small = ["--n_prompts=1", "--max_new_tokens=2", "--val_batches=1", "--device=cpu"]
    ev.main([f"--out_dir={out}", *small])
    calls, orig = [], model_mod.Transformer.generate
    monkeypatch.setattr(model_mod.Transformer, "generate", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    male, female = metrics.gender_words()
    try:
        metrics.set_gender_words(male + ["knight"], female)
        ev.main([f"--out_dir={out}", *small])
        assert len(calls) == 7  # every checkpoint re-scored with the new lists
        calls.clear()
        ev.main([f"--out_dir={out}", *small])
        assert calls == []  # and then reused
    finally:
        metrics.set_gender_words(male, female)


def test_data_without_batch_metrics_still_evaluates_outputs(tiny_data, tmp_path, capsys):
    import tinystories
    import train
    from conftest import TinyRun
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0] / "TinyStories_all_data", data / "TinyStories_all_data")
    shutil.copy(tiny_data[0] / "tok512.model", data / "tok512.model")
    tinystories.pretokenize(512, 64, data, workers=1, tables_dir=tmp_path / "tables", metrics="none")
    run = TinyRun(data, tmp_path / "tables", tmp_path / "out")
    train.main(run.train_args(max_iters=2, eval_interval=2))
    capsys.readouterr()
    joined = ev.main([f"--out_dir={run.out_dir}", "--n_prompts=1", "--max_new_tokens=4", "--val_batches=1"])
    out = capsys.readouterr().out
    assert out.count("no batch metrics in") == 1 and "outputs only" in out
    assert list(joined["iter"]) == [0, 1, 2] and "out_n_words" in joined and not any(c.startswith("in_") for c in joined)
    assert joined["n_batches_since"].tolist() == [0, 8, 8]


# -----------------------------------------------------------------------------
# the cache's columns and the sampling flags

@pytest.mark.parametrize("table", ["eval_outputs.csv", "eval_summary.csv"])
def test_eval_cache_with_other_columns_is_recomputed(tiny_run, tmp_path, capsys, table):
    run = run_with_checkpoints(tiny_run, tmp_path / "run")
    first = ev.main([f"--out_dir={run}", *EVAL])
    (run / "tables" / table).write_text("a,b\n1,2\n")
    capsys.readouterr()
    again = ev.main([f"--out_dir={run}", *EVAL])
    out = capsys.readouterr().out
    assert f"{run / 'tables' / table}" in out and "re-evaluating every checkpoint" in out
    assert "evaluated 3 checkpoint(s), reused 0" in out
    outputs = pd.read_csv(run / "tables" / "eval_outputs.csv", keep_default_na=False)
    assert sorted(set(outputs["iter"])) == [0, 1, 2] and {"prompt", "generated", "expected"} <= set(outputs.columns)
    pd.testing.assert_frame_equal(first, again)  # the same numbers as the first evaluation


@pytest.mark.parametrize("flag", ["--temperature=-1", "--top_p=2", "--top_p=-0.5"])
def test_eval_sampling_flags_out_of_range_are_refused(tiny_run, tmp_path, flag):
    run = run_with_checkpoints(tiny_run, tmp_path / "run")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL, "--temperature=0.8", flag]), flag.split("=")[0] + "=")
    assert not (run / "tables").exists()
