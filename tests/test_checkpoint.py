"""prebias/checkpoint.py's guards, as eval.py meets them: a checkpoint that is a link or a
folder, or a copy under another step, is refused before anything is written, and a broken
chain names the checkpoint to restore."""

import shutil

import torch

import eval as ev
from conftest import EVAL, refused, run_with_checkpoints
from prebias import checkpoint


def test_a_checkpoint_that_is_a_link_or_a_folder_is_refused_before_anything(tiny_run, tmp_path):
    run = run_with_checkpoints(tiny_run, tmp_path / "run")
    link = run / "ckpt" / "ckpt_4.pt"
    link.symlink_to(run / "ckpt" / "ckpt_1.pt")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), str(link), "symbolic link")
    assert not (run / "tables").exists()
    link.unlink()
    link.mkdir()
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), str(link), "not a plain file")
    assert not (run / "tables").exists()


def test_a_checkpoint_copied_under_another_step_is_refused(tiny_run, tmp_path):
    run = run_with_checkpoints(tiny_run, tmp_path / "run")
    shutil.copy(run / "ckpt" / "ckpt_1.pt", run / "ckpt" / "ckpt_16.pt")
    refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_16.pt", "step 1", "delete")
    assert not (run / "tables").exists()


def test_the_ordering_message_names_the_checkpoint_to_restore(tiny_run, tmp_path):
    run = run_with_checkpoints(tiny_run, tmp_path / "run", keep=(0, 1, 4))  # ckpt_2 missing: ckpt_4 follows step 2
    msg = refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_4.pt", "restore ckpt_2.pt")
    assert not (run / "tables").exists(), msg  # refused before the first checkpoint is evaluated
    # two branches: ckpt_4 rewritten to follow step 1, while ckpt_2 (which also follows step 1) stays
    run = run_with_checkpoints(tiny_run, tmp_path / "branch", keep=(0, 1, 2, 4))
    p2, p4 = checkpoint.ckpt_path(run, 2), checkpoint.ckpt_path(run, 4)
    ck = checkpoint.load_checkpoint(p4, mmap=False)
    ck["prev_iter"] = 1
    ck["batch_ids"] = torch.cat([checkpoint.load_checkpoint(p2)["batch_ids"], ck["batch_ids"]])
    torch.save(ck, p4)
    msg = refused(lambda: ev.main([f"--out_dir={run}", *EVAL]), "ckpt_4.pt", "ckpt_2.pt")
    assert "restore ckpt_1.pt" not in msg  # ckpt_1 is there: restoring it fixes nothing


def test_the_same_checkpoint_saved_twice_is_the_same_bytes(tmp_path):
    """torch.save given a path names the zip archive inside after it: the atomic temp's random
    name and pid made every save's bytes (and size: a byte per entry per pid digit) differ."""
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, "iter_num": 4}
    checkpoint.save_checkpoint(obj, tmp_path / "a" / "ckpt_4.pt")
    checkpoint.save_checkpoint(obj, tmp_path / "ckpt_4.pt")
    a, b = (tmp_path / "a" / "ckpt_4.pt").read_bytes(), (tmp_path / "ckpt_4.pt").read_bytes()
    assert a == b and torch.equal(torch.load(tmp_path / "ckpt_4.pt", weights_only=True)["model"]["w"], obj["model"]["w"])
