"""batch_viewer.py and the readers of a run's numpy record it shares with report.py
(prebias/stream.py): steps past the run say so; a wrong or damaged batch_ids.npy,
insertions.npz or masked_rows.npy is one line naming the file and the fix; --chars and
--max_rows out of range are refused before anything is written."""

import shutil

import numpy as np
import pytest

import batch_viewer
import report
from conftest import refused
from prebias.common import UserError


def test_steps_past_the_schedule_and_untrained_ids_say_so(tiny_run, capsys):
    with pytest.raises(UserError, match=r"--step=100000000000000000000: at most \d+ \(the run trained steps 0\.\.23"):
        batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=100000000000000000000"])
    ids = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=5", "--ids_only=True"])
    assert len(ids) == 8 and "NOT TRAINED" not in capsys.readouterr().err  # a trained step: ids only
    later = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=30", "--ids_only=True"])
    out = capsys.readouterr()
    assert "NOT TRAINED: the run has trained steps 0..23" in out.err and out.out.split() == [str(i) for i in later]


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


def test_negative_chars_refused(tiny_run, tmp_path):
    refused(lambda: batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=2", "--chars=-5"]), "--chars=-5")
    refused(lambda: report.main([str(tiny_run.out_dir), "--chars=-5", f"--out={tmp_path / 'r.html'}"]),
            "--chars=-5")
    refused(lambda: report.main([str(tiny_run.out_dir), "--max_rows=0", f"--out={tmp_path / 'r.html'}"]),
            "--max_rows=0")
    assert not (tmp_path / "r.html").exists()
