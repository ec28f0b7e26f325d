"""Issue 21, second audit: train.py and experiment.py refuse bad input with one line
before writing anything, and never take another run's files as this run's."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import experiment
import train
from conftest import TinyRun, experiment_spec
from prebias.checkpoint import optimizer_path
from prebias.common import UserError

SHORT = dict(max_iters=4, eval_interval=2)


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


# -----------------------------------------------------------------------------
# 1. the experiment's name is a plain folder name

@pytest.mark.parametrize("how", ["stem", "flag_up", "flag_html"])
def test_an_experiment_name_that_leaves_out_root_is_refused(tiny_data, tmp_path, how):
    root = tmp_path / "w"
    root.mkdir()
    spec = experiment_spec(tiny_data, root / ("...json" if how == "stem" else "ok.json"))
    flag = {"stem": [], "flag_up": ["--name=../esc"], "flag_html": ["--name=<script>"]}[how]
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(UserError, match="experiment name .* must be a plain folder name"):
        experiment.main([str(spec), f"--out_root={root / 'out'}", "--aggregate_only=True", *flag])
    assert sorted(p.name for p in root.iterdir()) == before  # no out/, no experiment.json, no .lock beside the spec


# -----------------------------------------------------------------------------
# 2, 3. the optimizer file must be the one saved with the checkpoint

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


# -----------------------------------------------------------------------------
# 4, 5. sizes and seeds no machine or generator takes

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


# -----------------------------------------------------------------------------
# 6. a damaged config.json / run.json on resume

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


# -----------------------------------------------------------------------------
# 7. an explicit shape flag under --init_from=<ckpt>

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


# -----------------------------------------------------------------------------
# 8. a one-arm experiment's differences table

def test_a_one_arm_experiment_writes_a_readable_empty_differences_table(tmp_path):
    import report
    spec = {"arms": {"shuffle": {}}, "baseline": "shuffle", "seeds": [1, 2], "metrics": ["val_loss"],
            "primary": ["val_loss"], "test": "auto", "base": {}, "name": "one", "question": ""}
    exp = tmp_path / "one"
    runs = []
    for seed in (1, 2):
        d = exp / "shuffle" / f"seed{seed}"
        (d / "tables").mkdir(parents=True)
        pd.DataFrame({"iter": [0, 4, 8], "val_loss": [6.2, 5.0 + seed / 10, 4.0 + seed / 10]}).to_csv(
            d / "tables" / "summary.csv", index=False)
        (d / "config.json").write_text(json.dumps({"seed": seed}))
        runs.append(experiment.Run("shuffle", seed, d, []))
    experiment.aggregate(exp, spec, runs)
    diff = pd.read_csv(exp / "tables" / "differences.csv")
    assert len(diff) == 0 and {"arm", "metric", "diff", "lo", "hi", "p", "p_holm", "test"} <= set(diff.columns)
    (exp / "experiment.json").write_text(json.dumps({**spec, "arm_order": ["shuffle"]}))
    page = report.experiment_page(exp, report.ReportConfig(viewer="none"))
    assert "No differences to show: the experiment has one arm" in page


# -----------------------------------------------------------------------------
# 9. exclude lists that exclude nothing, or everything

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
