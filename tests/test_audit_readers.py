"""The readers of a run's own records and the flags of the commands that read them (issue
21, second audit): a damaged cache is recomputed, a damaged or foreign record (batch_ids.npy,
insertions.npz, masked_rows.npy, a checkpoint that is a link or a copy) is one line naming
the file and the fix, and a flag out of range is refused before anything is written."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import attribute
import batch_viewer
import eval as ev
import report
import sample
from prebias import checkpoint, tags
from prebias.common import FolderLock, UserError
from prebias.refscorer import reference_scorer
from tokenizer import Tokenizer

EVAL = ["--n_prompts=1", "--max_new_tokens=4", "--val_batches=2", "--device=cpu"]


def small_run(tiny_run, dest, keep=(0, 1, 2)):
    """A copy of the fixture run with only the checkpoints of `keep` (a valid chain)."""
    shutil.copytree(tiny_run.out_dir, dest)
    for it, p in checkpoint.list_checkpoints(dest):
        if it not in keep:
            p.unlink()
    return dest


def refused(fn, *words):
    """The UserError line of fn(), checked to be one line holding every word."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# -----------------------------------------------------------------------------
# 1. eval.py's cache: tables with other columns are a cache that is not there

@pytest.mark.parametrize("table", ["eval_outputs.csv", "eval_summary.csv"])
def test_eval_cache_with_other_columns_is_recomputed(tiny_run, tmp_path, capsys, table):
    run = small_run(tiny_run, tmp_path / "run")
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


# -----------------------------------------------------------------------------
# 2. attribute.py's count flags, checked before anything is computed or written

@pytest.mark.parametrize("flag", ["--n_val=0", "--n_val=-3", "--k=-1", "--k=0", "--n_random=0", "--subsets=1",
                                  "--moves=0", "--move_rows=0", "--move_frac=0", "--move_frac=0.7", "--top=-1",
                                  "--jobs=0", "--chunk=-1", "--n_boot=0", "--damping=-1",
                                  "--ekfac_damping=-0.5"])
def test_attribute_count_flags_are_refused_up_front(tiny_run, tmp_path, flag):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    topk = ["--validate=topk"] if flag.startswith(("--k=", "--n_random=")) else []
    refused(lambda: attribute.main([f"--out_dir={run}", "--probe=val", "--d=64", *topk, flag]),
            flag.split("=")[0] + "=")
    assert not (run / "attribution").exists() and not (run / "tables").exists()


# -----------------------------------------------------------------------------
# 3. and 4. the run's numpy record, read by one checked reader

BAD_IDS = {"ids out of range": lambda: np.full((24, 8), 10 ** 9),
           "negative ids": lambda: np.full((24, 8), -1),
           "floats": lambda: np.array([[1.5, 2.5]]),
           "float ids of the right shape": lambda: np.ones((24, 8)),
           "another batch size": lambda: np.zeros((24, 4), np.int64),
           "fewer steps than the checkpoints": lambda: np.zeros((3, 8), np.int64),
           "one dimension": lambda: np.zeros(24 * 8, np.int64)}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_a_wrong_batch_ids_record_is_refused_by_every_reader(tiny_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    np.save(run / "batch_ids.npy", BAD_IDS[case]())
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "batch_ids.npy", "write_ids_file")
    refused(lambda: report.main([str(run), f"--out={tmp_path / 'r.html'}"]), "batch_ids.npy")
    assert not (tmp_path / "r.html").exists()


def test_a_damaged_batch_ids_file_is_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    good = (run / "batch_ids.npy").read_bytes()
    (run / "batch_ids.npy").write_bytes(good[:100])
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "batch_ids.npy")
    (run / "batch_ids.npy").unlink()
    (run / "batch_ids.npy").mkdir()
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "batch_ids.npy", "folder")


def _insertions(run, rows, tokens):
    np.savez(run / "insertions.npz", insertions=np.asarray(rows, np.int64).reshape(-1, 6),
             insert_tokens=np.asarray(tokens, np.int64), replaced_tokens=np.asarray(tokens, np.int64),
             columns=np.array("step,row,pos,tag,n_tokens,mode"))


def test_insertions_record_read_back_and_refused_when_damaged(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    _insertions(run, [[2, 0, 3, 0, 2, 0]], [5, 6])  # step 2, row 0: tokens 3..4 replaced by [5, 6]
    ids = np.load(run / "batch_ids.npy")
    capsys.readouterr()
    assert batch_viewer.main([f"--out_dir={run}", "--step=2"]).tolist() == ids[2].tolist()
    assert "tag 0 replaced at token 3 (2 tokens)" in capsys.readouterr().out
    good = (run / "insertions.npz").read_bytes()
    (run / "insertions.npz").write_bytes(good[:200])  # the audit's `head -c 200`
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "insertions.npz", "write_ids_file")
    refused(lambda: report.main([str(run), f"--out={tmp_path / 'r.html'}"]), "insertions.npz")
    for rows, toks in (([[24, 0, 3, 0, 2, 0]], [5, 6]),  # a step the run never trained
                       ([[2, 8, 3, 0, 2, 0]], [5, 6]),  # a row beyond the batch
                       ([[2, 0, 64, 0, 2, 0]], [5, 6]),  # past the window's end
                       ([[2, 0, 3, 0, 2, 0]], [5]),  # fewer tokens than the rows say
                       ([[2, 0, 3, 0, 2, 7]], [5, 6]),  # neither replace (0) nor insert (1)
                       ([[2, 0, 3, 0, 2, 0]], [5, 10 ** 6])):  # a token beyond the vocabulary
        _insertions(run, rows, toks)
        refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "insertions.npz")
    np.savez(run / "insertions.npz", insertions=np.zeros((1, 6)))  # floats, and no tokens
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "insertions.npz")


def test_masked_rows_record_is_checked(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    np.save(run / "masked_rows.npy", np.array([[2, 1]], np.int64))
    capsys.readouterr()
    batch_viewer.main([f"--out_dir={run}", "--step=2"])
    assert capsys.readouterr().out.count("loss weight 0 at this step") == 1
    for bad in (np.array([[2, 9]]), np.array([[99, 1]]), np.array([[2.0, 1.0]]), np.array([2, 1])):
        np.save(run / "masked_rows.npy", bad)
        refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "masked_rows.npy")
    (run / "masked_rows.npy").write_bytes(b"\x93NUMPY garbage")
    refused(lambda: batch_viewer.main([f"--out_dir={run}", "--step=2"]), "masked_rows.npy")


# -----------------------------------------------------------------------------
# 5. sampling flags, 6. --chars

@pytest.mark.parametrize("flag", ["--temperature=-1", "--top_p=2", "--top_p=-0.5"])
def test_eval_sampling_flags_out_of_range_are_refused(tiny_run, tmp_path, flag):
    run = small_run(tiny_run, tmp_path / "run")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL, "--temperature=0.8", flag]), flag.split("=")[0] + "=")
    assert not (run / "tables").exists()


@pytest.mark.parametrize("flag", ["--temperature=-1", "--top_p=2", "--top_p=-0.5", "--top_k=-1"])
def test_sample_flags_out_of_range_are_refused(tiny_run, flag, capsys):
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    refused(lambda: sample.main([f"--checkpoint={ck}", "--max_new_tokens=4", "--device=cpu", flag]),
            flag.split("=")[0] + "=")
    assert capsys.readouterr().out == ""


def test_negative_chars_refused(tiny_run, tmp_path):
    refused(lambda: batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=2", "--chars=-5"]), "--chars=-5")
    refused(lambda: report.main([str(tiny_run.out_dir), "--chars=-5", f"--out={tmp_path / 'r.html'}"]),
            "--chars=-5")
    refused(lambda: report.main([str(tiny_run.out_dir), "--max_rows=0", f"--out={tmp_path / 'r.html'}"]),
            "--max_rows=0")
    assert not (tmp_path / "r.html").exists()


# -----------------------------------------------------------------------------
# 7. a checkpoint that is a link, a folder or a copy; the ordering message

def test_a_checkpoint_that_is_a_link_or_a_folder_is_refused_before_anything(tiny_run, tmp_path):
    run = small_run(tiny_run, tmp_path / "run")
    link = run / "ckpt" / "ckpt_4.pt"
    link.symlink_to(run / "ckpt" / "ckpt_1.pt")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), str(link), "symbolic link")
    assert not (run / "tables").exists()
    link.unlink()
    link.mkdir()
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), str(link), "not a plain file")
    assert not (run / "tables").exists()


def test_a_checkpoint_copied_under_another_step_is_refused(tiny_run, tmp_path):
    run = small_run(tiny_run, tmp_path / "run")
    shutil.copy(run / "ckpt" / "ckpt_1.pt", run / "ckpt" / "ckpt_16.pt")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_16.pt", "step 1", "delete")
    assert not (run / "tables").exists()


def test_the_ordering_message_names_the_checkpoint_to_restore(tiny_run, tmp_path):
    run = small_run(tiny_run, tmp_path / "run", keep=(0, 1, 4))  # ckpt_2 missing: ckpt_4 follows step 2
    msg = refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_4.pt", "restore ckpt_2.pt")
    assert not (run / "tables").exists(), msg  # refused before the first checkpoint is evaluated
    # two branches: ckpt_4 rewritten to follow step 1, while ckpt_2 (which also follows step 1) stays
    run = small_run(tiny_run, tmp_path / "branch", keep=(0, 1, 2, 4))
    p2, p4 = checkpoint.ckpt_path(run, 2), checkpoint.ckpt_path(run, 4)
    ck = checkpoint.load_checkpoint(p4, mmap=False)
    ck["prev_iter"] = 1
    ck["batch_ids"] = torch.cat([checkpoint.load_checkpoint(p2)["batch_ids"], ck["batch_ids"]])
    torch.save(ck, p4)
    msg = refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_4.pt", "ckpt_2.pt")
    assert "restore ckpt_1.pt" not in msg  # ckpt_1 is there: restoring it fixes nothing


# -----------------------------------------------------------------------------
# 8. the lines name the file and the fix

def test_tag_file_lines_name_the_file_and_the_fix(tmp_path):
    enc = Tokenizer()
    p = tmp_path / "tags.json"
    p.write_text(json.dumps({"seed": 1, "tags": [{"id": "a", "kind": "canary", "text": "x {digits:65}",
                                                   "steps": {"start": 1, "n": 2}, "rows": 1}]}))
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "tags[0].text", "{digits:65}", "e.g.")
    p.write_text(json.dumps({"seed": 1, "tags": [{"id": "a", "kind": "canary", "text": "x {digits:3} {digits:3}",
                                                   "steps": {"start": 1, "n": 2}, "rows": 1}]}))
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "tags[0].text", "one placeholder")
    p.write_text('{"seed": 1, "tags": [{"id": "a", "ki')
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "not valid JSON", "--tags")
    p.unlink()
    p.mkdir()
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "folder", "--tags")


def test_model_and_lock_lines_name_the_file_and_the_fix(tiny_data, tmp_path):
    d = tmp_path / "model.bin"
    d.mkdir()
    refused(lambda: reference_scorer(tiny_data[0], 512, str(d)), f"--ref_model={d}", "folder", "give")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    refused(lambda: checkpoint.load_checkpoint(foreign), str(foreign), "train.py")
    (tmp_path / "r31" / ".lock").mkdir(parents=True)
    refused(lambda: FolderLock(tmp_path / "r31"), str(tmp_path / "r31" / ".lock"), "remove")
