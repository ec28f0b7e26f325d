"""The third audit's findings (issue 21), each a test seen failing before its fix: a file
where an output folder belongs, figure resolution, a run record replaced by a folder, a
schedule too large to hold, steps past the run, a reader that left the pipe, metrics with
no value, generation cut by the context, candidate counts that fill the memory, and a
reference model trained with another tokenizer."""
import shutil
import sys

import numpy as np
import pandas as pd
import pytest

import batch_viewer
import durability
import sample
import select_batches
import tinystories
import train
import visualize_embd
from conftest import SEQ, VOCAB, TinyRun
from prebias import checkpoint
from prebias.common import UserError, main_guard


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


def test_figure_resolution_must_be_positive(tiny_run):
    with pytest.raises(UserError, match=r"--dpi=0: .* at least 1"):
        visualize_embd.main([f"--out_dir={tiny_run.out_dir}", "--dpi=0"])


def test_a_run_record_that_is_a_folder_is_refused_before_the_resume_writes(tiny_run, tmp_path):
    """history.jsonl as a folder: IsADirectoryError after 'resuming from ...'."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, out)
    (out / "history.jsonl").unlink()
    (out / "history.jsonl").mkdir()
    log = (out / "train.log").read_bytes()
    run = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, out)
    with pytest.raises(UserError, match=r"history.jsonl is not a plain file: the run writes its record there"):
        train.main(run.train_args(init_from="resume", max_iters=32))
    assert (out / "train.log").read_bytes() == log


def test_a_schedule_too_large_to_hold_is_one_line_and_no_folder(tiny_data, tmp_path):
    """--gradient_accumulation_steps=10**12: a 29 TiB allocation after ckpt_0 was written."""
    run = TinyRun(*tiny_data, tmp_path / "huge")
    with pytest.raises(UserError, match=r"batch ids in the schedule, more than"):
        train.main(run.train_args(gradient_accumulation_steps=10 ** 12))
    assert not run.out_dir.exists()


def test_steps_past_the_schedule_and_untrained_ids_say_so(tiny_run, capsys):
    with pytest.raises(UserError, match=r"--step=100000000000000000000: at most \d+ \(the run trained steps 0\.\.23"):
        batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=100000000000000000000"])
    ids = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=5", "--ids_only=True"])
    assert len(ids) == 8 and "NOT TRAINED" not in capsys.readouterr().err  # a trained step: ids only
    later = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=30", "--ids_only=True"])
    out = capsys.readouterr()
    assert "NOT TRAINED: the run has trained steps 0..23" in out.err and out.out.split() == [str(i) for i in later]


def test_a_reader_that_leaves_the_pipe_ends_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main_guard points it at /dev/null: put it back after
    def main():
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(SystemExit) as e:
        main_guard(main)
    assert e.value.code == 141 and capsys.readouterr().err == ""


def test_generation_cut_by_the_context_is_said(tiny_run, capsys):
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    sample.main([f"--checkpoint={ck}", "--max_new_tokens=1000000", "--device=cpu", "--temperature=0"])
    assert f"is cut to {SEQ + 1 - 1}" in capsys.readouterr().err  # the prompt: BOS alone


@pytest.mark.parametrize("flag", ["--R=1000000000000", "--R_context=10000000", "--exact_budget=1000000000"])
def test_candidate_counts_that_fill_the_memory_are_refused(tiny_run, flag):
    """--R=10**12 hung, filling the memory, with no output."""
    with pytest.raises(UserError, match=flag.split("=")[0] + r"=\d+: at most"):
        durability.main([f"--out_dir={tiny_run.out_dir}", flag])


def test_a_reference_checkpoint_of_another_tokenizer_is_refused(tiny_run, tmp_path, capsys):
    """A .pt of the same vocabulary size but another tokenizer scored the data as other text."""
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    c = checkpoint.load_checkpoint(ck)
    c["data"] = {**c["data"], "tokenizer_sha256": "0" * 64}
    import torch
    other = tmp_path / "ckpt_2.pt"
    torch.save(c, other)
    d = tmp_path / "data"
    shutil.copytree(tiny_run.data_dir, d)
    with pytest.raises(UserError, match=r"--ref_model=.* was trained with another tokenizer"):
        tinystories.pretokenize(VOCAB, SEQ, d, workers=1, tables_dir=tmp_path / "t", ref_model=str(other))
    # a model.bin records no tokenizer: said, and the data scored with it (its workers start
    # fresh: forked from this process, whose OpenMP pool has run, they deadlocked)
    tinystories.pretokenize(VOCAB, SEQ, d, workers=1, tables_dir=tmp_path / "t", metrics="fk_grade",
                            ref_model=str(tiny_run.out_dir / "model.bin"))
    assert "is a model.bin, which records no tokenizer" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "t" / "batch_metrics.csv")["ref_nll"].notna().all()
