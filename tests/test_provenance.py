"""Paths that could make a run's record untrue, each shut: two runs in one folder, a
random draw outside the training RNG, a silent overwrite of model.bin or config.json, a
resume onto other data or another order, stale temp files; plus the checkpoint format's
own guards, the plain-numpy record and the batch viewer."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import batch_viewer
import train
from conftest import ROOT, TinyRun
from model import ModelArgs, Transformer, mean_loss
from prebias import checkpoint
from prebias.common import FolderLock, UserError
from prebias.data import BatchData
from prebias.schedule import get_lr


def recorded_ids(out_dir) -> np.ndarray:
    return torch.cat(list(checkpoint.batch_ids_by_checkpoint(out_dir).values())).numpy()


def test_second_run_on_the_same_folder_is_refused(tiny_data, tmp_path):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "out")
    holder = FolderLock(run.out_dir)  # a run in progress
    try:
        with pytest.raises(UserError, match=r"out is in use by pid \d+ on .* since"):
            train.main(run.train_args(max_iters=2))
        assert not (run.out_dir / "ckpt").exists()
    finally:
        holder.release()
    # a real second process while the first trains
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *run.train_args(max_iters=400)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if (run.out_dir / "ckpt" / "ckpt_0.pt").exists():
                break
            first.poll()
            assert first.returncode is None, first.stderr.read()
            import time
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), *run.train_args(max_iters=4, seed=9),
                                 "--init_from=resume"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "is in use by pid" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


def test_resume_with_dropout_is_exact(tiny_data, tmp_path, monkeypatch):
    """The MFU measurement once drew from the training RNG after a resume restored it."""
    data, tables = tiny_data
    kw = dict(max_iters=6, eval_interval=4, dropout=0.1, peak_flops=0.0)
    straight = TinyRun(data, tables, tmp_path / "straight")
    train.main(straight.train_args(**kw))
    cut = TinyRun(data, tables, tmp_path / "cut")
    train.main(cut.train_args(**{**kw, "max_iters": 4}))
    train.main(cut.train_args(**kw, init_from="resume"))
    a = checkpoint.load_checkpoint(checkpoint.ckpt_path(straight.out_dir, 6))
    b = checkpoint.load_checkpoint(checkpoint.ckpt_path(cut.out_dir, 6))
    assert a["val_loss"] == b["val_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_model_bin_goes_into_the_runs_folder(tiny_data, tmp_path, monkeypatch):
    data, tables = tiny_data
    monkeypatch.chdir(tmp_path)
    run = TinyRun(data, tables, tmp_path / "elsewhere")
    args = [a for a in run.train_args(max_iters=1) if not a.startswith("--model_bin")]
    train.main(args)
    assert (run.out_dir / "model.bin").exists() and not (tmp_path / "model.bin").exists()
    assert train.default_model_bin(train.TrainConfig()) == "model.bin"  # the seed's path for the default run
    assert train.default_model_bin(train.TrainConfig(model_bin="none")) == ""


@pytest.mark.parametrize("arg, msg", [
    ("--max_iters=-5", "--max_iters=-5: must be >= 0"),
    ("--eval_interval=0", "--eval_interval=0: must be at least 1"),
    ("--batch_size=0", "--batch_size=0: must be at least 1"),
    ("--n_heads=3", "dim must be a multiple of n_heads"),
    ("--select=loss", "selection needs a pool larger than 1"),
    ("--select_pool=4", "a pool needs a --select method"),
])
def test_nonsense_values_write_nothing(tiny_data, tmp_path, arg, msg):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "o")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *run.train_args(), arg],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and msg in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not run.out_dir.exists() and not (tmp_path / "model.bin").exists()


def test_resume_keeps_the_original_record_and_logs_changes(tiny_data, tmp_path):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "out")
    train.main(run.train_args(max_iters=2, eval_interval=2))
    first = (run.out_dir / "config.json").read_text()
    train.main(run.train_args(max_iters=4, eval_interval=2, init_from="resume", learning_rate=1e-3))
    assert (run.out_dir / "config.json").read_text() == first  # never overwritten
    hist = [json.loads(line) for line in (run.out_dir / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in hist] == ["start", "resume"]
    assert hist[1]["changed"] == {"learning_rate": [3e-3, 1e-3], "max_iters": [2, 4]}
    log = (run.out_dir / "train.log").read_text()
    assert "resume: learning_rate 0.003 -> 0.001" in log
    assert checkpoint.run_config(run.out_dir)["learning_rate"] == 1e-3  # as the run stands now
    # the optimizer state is kept beside the latest checkpoint only
    assert sorted(p.name for p in (run.out_dir / "ckpt").glob("optimizer_*")) == ["optimizer_4.pt"]
    assert "optimizer" not in checkpoint.load_checkpoint(checkpoint.ckpt_path(run.out_dir, 2))


def test_resume_refuses_another_tokenizer_schedule_or_tags(tiny_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, out)
    run = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, out)
    with pytest.raises(UserError, match="schedule spec, tags or selection changed"):
        train.main(run.train_args(init_from="resume", max_iters=30, schedule="sorted", schedule_metric="fk_grade"))
    with pytest.raises(UserError, match="trained with seed=1337, not 5"):
        train.main(run.train_args(init_from="resume", max_iters=30, seed=5))
    ck = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out), mmap=False)
    ck["data"]["tokenizer_sha256"] = "0" * 64
    checkpoint.save_checkpoint(ck, checkpoint.latest_checkpoint(out))
    with pytest.raises(UserError, match="data of another tokenizer"):
        train.main(run.train_args(init_from="resume", max_iters=30))


def test_damaged_and_wrong_version_checkpoints(tmp_path):
    p = tmp_path / "ckpt_3.pt"
    p.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match="cannot be read .* damaged"):
        checkpoint.load_checkpoint(p)
    torch.save({"format_version": 99, "model": {}}, p)
    with pytest.raises(UserError, match="format 99; this code reads 1, 2"):
        checkpoint.load_checkpoint(p)


def test_stale_temp_files_are_removed_at_start(tiny_data, tmp_path):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "out")
    (run.out_dir / "ckpt").mkdir(parents=True)
    stale = [run.out_dir / "ckpt" / ".ckpt_4.pt.abc123xy.prebias.tmp", run.out_dir / ".batch_ids.npy.k_9Zq0aa.prebias.tmp"]
    mine = [run.out_dir / ".notes.tmp", run.out_dir / ".notes.json.abc123xy.prebias.tmp", run.out_dir / "ckpt" / ".x.tmp"]
    for p in stale + mine:
        p.write_bytes(b"")
    train.main(run.train_args(max_iters=1))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in mine)  # only the temp files of what train.py writes are removed


def test_get_lr_warmup_cosine_floor():
    cfg = types.SimpleNamespace(learning_rate=1.0, min_lr=0.0, decay_lr=True, warmup_iters=4, max_iters=14)
    assert get_lr(0, cfg) == pytest.approx(1 / 5) and get_lr(3, cfg) == pytest.approx(4 / 5)
    assert get_lr(4, cfg) == pytest.approx(1.0)
    assert get_lr(9, cfg) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: the mean of max and floor
    assert get_lr(14, cfg) == pytest.approx(0.1) and get_lr(99, cfg) == pytest.approx(0.1)
    assert get_lr(7, types.SimpleNamespace(**{**vars(cfg), "decay_lr": False})) == 1.0


def test_mean_loss_over_several_chunks_is_the_batch_mean(tiny_run):
    data = BatchData(tiny_run.data_dir, 512, 64)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))
    ids = data.val_ids[:7]
    x, y = data.get(ids)
    with torch.no_grad():
        logits, _ = m(x)
        per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    assert mean_loss(m, data, ids, 3, "cpu") == pytest.approx(float(per.mean()), rel=1e-5)  # chunks 3+3+1


def test_plain_numpy_record_and_batch_viewer(tiny_run, capsys):
    ids = np.load(tiny_run.out_dir / "batch_ids.npy", allow_pickle=False)
    assert ids.shape == (24, 8) and np.array_equal(ids, recorded_ids(tiny_run.out_dir))
    shown = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=5"])
    assert np.array_equal(shown, ids[5])
    out = capsys.readouterr().out
    assert out.startswith("step 5: 8 batches, trained at step 5") and f"batch_id:{ids[5][0]} " in out
    data = BatchData(tiny_run.data_dir, 512, 64)
    from tokenizer import Tokenizer
    first_text = Tokenizer.for_vocab(512, tiny_run.data_dir).decode(data.window(int(ids[5][0]))[1:].tolist())
    assert first_text.split()[0] in out
    future = batch_viewer.main([f"--out_dir={tiny_run.out_dir}", "--step=30"])
    assert "NOT TRAINED: the run has trained steps 0..23" in capsys.readouterr().out
    assert len(future) == 8 and not np.array_equal(future, ids[30 % 24])
    # train.py --show_batches is a shortcut to the viewer
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--out_dir={tiny_run.out_dir}", "--show_batches=5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"batch_id:{ids[5][0]} " in out.stdout
