"""train.py: exact batch provenance, resume, DDP, atomic checkpoints, config errors,
and the schedule."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import experiment
import train
from conftest import ROOT, TinyRun, experiment_spec
from prebias import checkpoint, stream
from prebias.checkpoint import optimizer_path
from prebias.common import UserError
from prebias.data import BatchData
from prebias.schedule import rank_micro_batches


def recorded_ids(out_dir) -> np.ndarray:
    return torch.cat(list(checkpoint.batch_ids_by_checkpoint(out_dir).values())).numpy()


def schedule_of(run: TinyRun, **over):
    cfg = train.parse_config(train.TrainConfig(), run.train_args(**over), train.CHOICES)
    return stream.build_schedule(cfg, BatchData(run.data_dir, run.vocab_size, run.max_seq_len))


def test_checkpoints_record_exactly_the_scheduled_batches(tiny_run):
    found = checkpoint.list_checkpoints(tiny_run.out_dir)
    assert [it for it, _ in found] == [0, 1, 2, 4, 8, 16, 24]
    sched = schedule_of(tiny_run)
    want = np.stack([sched.step_ids(s) for s in range(24)])
    assert np.array_equal(recorded_ids(tiny_run.out_dir), want)
    prev = -1
    for it, path in found:
        ck = torch.load(path, weights_only=True)  # tensors and plain types only
        assert ck["iter_num"] == it and ck["prev_iter"] == prev
        assert ck["batch_ids"].shape == (max(it - max(prev, 0), 0), 8)
        prev = it
    ids = checkpoint.batch_ids_seen(tiny_run.out_dir, 8).numpy()
    assert np.array_equal(ids, want[:8])
    assert set(ids.ravel()) <= set(BatchData(tiny_run.data_dir, 512, 64).train_ids)


def test_checkpoint_steps_are_log_spaced_then_regular():
    assert train.checkpoint_steps(1000, 200) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600, 800, 1000]
    assert train.checkpoint_steps(10, 4, log_spaced=False) == [0, 4, 8, 10]


def test_resume_after_kill_is_exact(tiny_data, tmp_path, monkeypatch):
    data, tables = tiny_data
    straight = TinyRun(data, tables, tmp_path / "straight")
    train.main(straight.train_args(max_iters=10, eval_interval=4))
    broken = TinyRun(data, tables, tmp_path / "broken")
    real_step = train.Trainer.train_step

    def dying_step(self, ids):
        if self.iter_num == 6:  # killed between checkpoints 4 and 8
            raise KeyboardInterrupt
        return real_step(self, ids)
    monkeypatch.setattr(train.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(broken.train_args(max_iters=10, eval_interval=4))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    assert [it for it, _ in checkpoint.list_checkpoints(broken.out_dir)] == [0, 1, 2, 4]
    train.main(broken.train_args(max_iters=10, eval_interval=4, init_from="resume"))
    assert np.array_equal(recorded_ids(broken.out_dir), recorded_ids(straight.out_dir))
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(straight.out_dir))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(broken.out_dir))
    assert a["iter_num"] == b["iter_num"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (straight.out_dir / "model.bin").read_bytes() == (broken.out_dir / "model.bin").read_bytes()
    # a plain resume of a finished run keeps its saved max_iters: nothing more to train
    before = checkpoint.list_checkpoints(broken.out_dir)
    trainer = train.main([f"--out_dir={broken.out_dir}", "--init_from=resume"])
    assert trainer.iter_num == 10 and checkpoint.list_checkpoints(broken.out_dir) == before


def test_kill_during_checkpoint_save_keeps_previous(tiny_data, tmp_path, monkeypatch):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "out")
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("iter_num") == 4:  # f: the open temp (checkpoint.save_torch)
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(run.train_args(max_iters=8, eval_interval=4))
    ckdir = run.out_dir / "ckpt"
    assert sorted(p.name for p in ckdir.glob("ckpt_*")) == ["ckpt_0.pt", "ckpt_1.pt", "ckpt_2.pt"]
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run.out_dir))["iter_num"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    train.main(run.train_args(max_iters=8, eval_interval=4, init_from="resume"))
    assert np.array_equal(recorded_ids(run.out_dir), np.stack([schedule_of(run).step_ids(s) for s in range(8)]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path / "out")
    real_step = train.Trainer.train_step
    monkeypatch.setattr(train.Trainer, "train_step",
                        lambda self, ids: float("nan") if self.iter_num == 3 else real_step(self, ids))
    with pytest.raises(UserError, match="loss became nan at step 4"):
        train.main(run.train_args(max_iters=8, eval_interval=4))
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run.out_dir))["iter_num"] == 2


@pytest.mark.slow
def test_ddp_two_ranks_see_the_same_batches(tiny_data, tmp_path):
    """torchrun with 2 gloo ranks (1 micro-step each) == 1 process with 2 micro-steps."""
    data, tables = tiny_data
    single = TinyRun(data, tables, tmp_path / "single")
    train.main(single.train_args(max_iters=6, eval_interval=4))
    ddp = TinyRun(data, tables, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *ddp.train_args(max_iters=6, eval_interval=4)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.array_equal(recorded_ids(ddp.out_dir), recorded_ids(single.out_dir))
    for (it, pa), (_, pb) in zip(checkpoint.list_checkpoints(single.out_dir), checkpoint.list_checkpoints(ddp.out_dir)):
        a, b = checkpoint.load_checkpoint(pa), checkpoint.load_checkpoint(pb)
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4, it
    losses = [line for line in out.stdout.splitlines() if line.startswith("step:4/6 loss:")]
    assert len(losses) == 1  # only rank 0 logs


def test_run_record_and_log_lines(tiny_run):
    import json
    cfg = json.loads((tiny_run.out_dir / "config.json").read_text())
    assert cfg["dim"] == 32 and cfg["max_iters"] == 24
    run = json.loads((tiny_run.out_dir / "run.json").read_text())
    assert run["commit"] and "torch" in run["versions"]
    lines = (tiny_run.out_dir / "train.log").read_text().splitlines()
    assert [ln.split()[0] for ln in lines if " loss:" in ln] == [f"step:{s}/24" for s in (4, 8, 12, 16, 20, 24)]
    assert all(k in lines[-2] + lines[-1] for k in ("lr:", "ms:", "tok/s:", "mfu:", "val_loss:"))


@pytest.mark.parametrize("arg, msg", [
    ("--no_such_key=1", "unknown config key 'no_such_key'; valid keys: out_dir"),
    ("--dim=big", "--dim=big: expected int"),
    ("--schedule=random", "choose one of shuffle, sorted, filter"),
    ("--max_iters=-5", "--max_iters=-5: must be >= 0"),
    ("--eval_interval=0", "--eval_interval=0: must be at least 1"),
    ("--batch_size=0", "--batch_size=0: must be at least 1"),
    ("--select=loss", "selection needs a pool larger than 1"),
    ("--compile=maybe", "expected True or False"),
])
def test_config_errors(arg, msg):
    with pytest.raises(UserError, match=msg):
        train.main([arg])


def test_data_and_shape_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="no batch index"):
        train.main(tiny_run.train_args(data_dir=tmp_path, out_dir=tmp_path / "o"))
    with pytest.raises(UserError, match="pretokenize --vocab_size=512 --max_seq_len=32"):
        train.main(tiny_run.train_args(max_seq_len=32, out_dir=tmp_path / "o"))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train.main(tiny_run.train_args())
    with pytest.raises(UserError, match="trained with n_layers=2, not 3"):
        train.main(tiny_run.train_args(init_from="resume", n_layers=3))


# -----------------------------------------------------------------------------
# schedule (the strategies themselves: tests/test_schedule.py)

def test_rank_slices_partition_the_step():
    step = np.arange(16)
    parts = [rank_micro_batches(step, r, 4, 2) for r in range(4)]
    assert all(p.shape == (2, 2) for p in parts)
    assert np.array_equal(np.concatenate([p.ravel() for p in parts]), step)
    assert np.array_equal(rank_micro_batches(step, 0, 1, 8).ravel(), step)


def test_sorted_schedule_from_batch_metrics(tiny_run, tmp_path):
    from prebias import batchmetrics
    data = BatchData(tiny_run.data_dir, 512, 64)
    s = schedule_of(tiny_run, schedule="sorted", schedule_metric="fk_grade")
    fk = batchmetrics.load_metric_column(tiny_run.tables_dir, "fk_grade", data)
    first = fk[s.step_ids(0)]
    assert np.all(np.diff(first[~np.isnan(first)]) >= 0)
    assert np.nanmin(fk[data.train_ids]) == first[0]
    with pytest.raises(UserError, match="unknown batch metric 'nope'"):
        schedule_of(tiny_run, schedule="sorted", schedule_metric="nope")


# -----------------------------------------------------------------------------
# bad input refused with one line before anything is written

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


SHORT = dict(max_iters=4, eval_interval=2)


def test_a_model_too_big_for_memory_is_one_line_and_no_folder(tiny_data, tmp_path):
    run = TinyRun(*tiny_data, tmp_path / "huge")
    with pytest.raises(UserError, match=r"--dim=1000000 .*parameters.*more than"):
        train.main(run.train_args(dim=1000000, **SHORT))
    assert not run.out_dir.exists()


def test_a_seed_past_64_bits_is_refused_by_train_and_the_spec_check(tiny_data, tmp_path):
    run = TinyRun(*tiny_data, tmp_path / "seed")
    for seed in (10 ** 30, 2 ** 63):
        with pytest.raises(UserError, match=r"--seed=\d+: must be below 2\*\*63"):
            train.main(run.train_args(seed=seed, **SHORT))
    assert not run.out_dir.exists()
    spec = experiment_spec(tiny_data, tmp_path / "big.json", seeds=[1, 10 ** 30])
    with pytest.raises(UserError, match=r"'seeds' must be .*below 2\*\*63"):
        experiment.load_spec(spec)
    train.validate(train.TrainConfig(seed=2 ** 63 - 1))  # the largest seed is fine


def test_exclude_list_messages_say_what_the_ids_are_and_the_fix(tiny_data, tmp_path):
    run = TinyRun(*tiny_data, tmp_path / "x")
    big, every = tmp_path / "big.npy", tmp_path / "all.npy"
    np.save(big, np.array([10 ** 12]))
    np.save(every, np.arange(10 ** 6))
    with pytest.raises(UserError, match=r"none of its 1 ids is a training batch, .*training batches are \d+ ids in "
                                        r"\d+\.\.\d+, and its ids are 1 past the last training batch "
                                        r"\(e\.g\. 1000000000000\); list training batch ids"):
        train.main(run.train_args(schedule_exclude=big, **SHORT))
    with pytest.raises(UserError, match=r"it removes every training batch \(all \d+\), so nothing is left to "
                                        r"train on: leave some out of it"):
        train.main(run.train_args(schedule_exclude=every, **SHORT))
    assert not run.out_dir.exists()


def test_a_select_ref_that_is_a_folder_is_one_line(tiny_data, tmp_path):
    """--select_ref=<folder> ended in IsADirectoryError while hashing it."""
    run = TinyRun(*tiny_data, tmp_path / "out")
    with pytest.raises(UserError, match=r"--select_ref=.* is a folder: give a checkpoint"):
        train.main(run.train_args(max_iters=2, eval_interval=2, select="rho", select_pool=2, select_ref=str(tmp_path)))


# -----------------------------------------------------------------------------
# on resume: the optimizer file must be the one saved with the checkpoint; damaged records; shape flags

@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Three finished 4-step runs: 'a' (seed 1, every optimizer file kept), 'b' (seed 5,
    the same shape), 'c' (another shape, the same number of tensors)."""
    root = tmp_path_factory.mktemp("audit_train")
    out = {}
    for name, kw in (("a", dict(seed=1, keep_optimizer=True)), ("b", dict(seed=5)),
                     ("c", dict(seed=1, dim=16, n_heads=2, n_kv_heads=1))):
        run = TinyRun(*tiny_data, root / name)
        train.main(run.train_args(**SHORT, **kw))
        out[name] = run
    return out


def copy_run(run: TinyRun, dest) -> TinyRun:
    shutil.copytree(run.out_dir, dest)
    return TinyRun(run.data_dir, run.tables_dir, dest)


def records(run: TinyRun) -> tuple[str, str]:
    return (run.out_dir / "history.jsonl").read_text(), (run.out_dir / "train.log").read_text()


def resume(run: TinyRun, **kw):
    return train.main(run.train_args(max_iters=6, eval_interval=2, seed=1, init_from="resume", **kw))


def test_an_optimizer_file_of_another_shape_is_refused_before_writing(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "run")
    shutil.copy(optimizer_path(runs["c"].out_dir, 4), optimizer_path(run.out_dir, 4))
    before = records(run)
    with pytest.raises(UserError, match="optimizer_4.pt is not the optimizer state saved with ckpt_4.pt"):
        resume(run)
    assert records(run) == before


@pytest.mark.parametrize("source", ["other_run", "other_step"])
def test_an_optimizer_file_of_another_run_or_step_is_refused(runs, tmp_path, source):
    run = copy_run(runs["a"], tmp_path / "run")
    src = optimizer_path(runs["b"].out_dir, 4) if source == "other_run" else optimizer_path(run.out_dir, 2)
    shutil.copy(src, optimizer_path(run.out_dir, 4))
    before = records(run)
    want = "seed=5, not 1" if source == "other_run" else "at step 2, not 4"
    with pytest.raises(UserError, match=f"optimizer_4.pt is not the optimizer state saved with ckpt_4.pt.*{want}"):
        resume(run)
    assert records(run) == before


def test_an_optimizer_file_from_before_the_record_resumes_with_a_warning(runs, tmp_path, capsys):
    """A file written before optimizer files recorded their checkpoint (a bare state dict)
    of the right shape: taken, with a warning in train.log; the resume is exact."""
    run = copy_run(runs["a"], tmp_path / "run")
    p = optimizer_path(run.out_dir, 4)
    state = torch.load(p, weights_only=True)
    state.pop("checkpoint")
    torch.save(state, p)
    resume(run)
    assert "predates the record" in (run.out_dir / "train.log").read_text()
    true = copy_run(runs["a"], tmp_path / "true")
    resume(true)
    from prebias.checkpoint import load_checkpoint
    a, b = (load_checkpoint(r.out_dir / "ckpt" / "ckpt_6.pt") for r in (run, true))
    assert a["val_loss"] == b["val_loss"]


def test_a_bare_optimizer_state_of_another_shape_is_refused(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "run")
    state = torch.load(optimizer_path(runs["c"].out_dir, 4), weights_only=True)
    state.pop("checkpoint")
    torch.save(state, optimizer_path(run.out_dir, 4))
    before = records(run)
    with pytest.raises(UserError, match=r"optimizer_4.pt cannot be read as this run's optimizer state .*shape"):
        resume(run)
    assert records(run) == before


def test_a_damaged_config_json_is_rebuilt_from_the_first_checkpoint(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "run")
    cfg_p, run_p = run.out_dir / "config.json", run.out_dir / "run.json"
    good_cfg, good_run = json.loads(cfg_p.read_text()), json.loads(run_p.read_text())
    cfg_p.write_text(cfg_p.read_text()[:60])
    run_p.write_text("{")
    resume(run)
    assert json.loads(cfg_p.read_text()) == good_cfg
    assert json.loads(run_p.read_text()) == good_run
    last = json.loads((run.out_dir / "history.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "resume" and last["rebuilt"] == ["config.json", "run.json"]


def test_a_damaged_run_json_without_its_start_record_is_refused(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "run")
    (run.out_dir / "run.json").write_text("{")
    (run.out_dir / "history.jsonl").write_text("")
    with pytest.raises(UserError, match=r"run.json is not valid JSON .*history.jsonl has no start line"):
        resume(run)
    assert (run.out_dir / "run.json").read_text() == "{"


def test_an_explicit_shape_flag_that_differs_from_the_init_checkpoint_is_refused(runs, tmp_path):
    src = runs["a"].out_dir / "ckpt" / "ckpt_4.pt"
    run = TinyRun(runs["a"].data_dir, runs["a"].tables_dir, tmp_path / "cont")
    with pytest.raises(UserError, match=r"--dim=64 .*has dim=32: drop --dim"):
        train.main(run.train_args(init_from=src, dim=64, max_iters=1, eval_interval=1))
    assert not run.out_dir.exists()
    args = [a for a in run.train_args(init_from=src, max_iters=1, eval_interval=1)
            if not a.startswith(("--dim=", "--n_layers=", "--n_heads=", "--n_kv_heads="))]
    train.main(args)  # no shape flags: the checkpoint's shape
    assert json.loads((run.out_dir / "config.json").read_text())["n_layers"] == 2


def test_an_empty_out_dir_or_a_wandb_dir_that_is_a_file_is_refused(tmp_path, monkeypatch):
    """--out_dir= trained into the working folder (overwriting the repository's model.bin);
    WANDB_DIR naming a file sent wandb's run elsewhere. Both one line before anything is
    written (seen failing on the old code: the first trained, the second started)."""
    monkeypatch.chdir(tmp_path)
    for out in ("", " "):
        with pytest.raises(UserError, match="--out_dir=.*: give a folder"):
            train.main([f"--out_dir={out}", f"--data_dir={tmp_path / 'none'}"])
    (tmp_path / "wf").write_text("")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wf"))
    with pytest.raises(UserError, match="WANDB_DIR=.* is a file, not a folder"):
        train.main([f"--out_dir={tmp_path / 'run'}", "--wandb_log=True", f"--data_dir={tmp_path / 'none'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wf"]
