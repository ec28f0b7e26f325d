"""Bad input, as a careless or hostile user would give it: one line naming the file and
the fix, nothing written outside the intended folder, no silent result, no script in the
report page."""

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import eval as ev
import experiment
import report
import train
from conftest import TinyRun, refused
from prebias import checkpoint, common, tags
from prebias.common import FolderLock, UserError, parse_config
from prebias.configs import EvalConfig, TrainConfig
from prebias.refscorer import reference_scorer

EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


# -----------------------------------------------------------------------------
# the report page: everything escaped, and a policy that runs no script anyway

def _evil_experiment(d):
    """An experiment folder whose every string is an injection attempt."""
    arm = "a" + EVIL
    (d / "tables").mkdir(parents=True)
    (d / "experiment.json").write_text(json.dumps({
        "name": EVIL, "question": EVIL, "spec_path": EVIL, "commit": EVIL, "baseline": arm,
        "arms": {arm: {EVIL: EVIL}, "b": {}}, "seeds": [EVIL, 1], "base": {EVIL: EVIL}}))
    pd.DataFrame([{"arm": a, "metric": EVIL, "iter": 1, "n": 2, "mean": 1.0, "sd": 0.1, "lo": 0.9, "hi": 1.1,
                   "values": EVIL} for a in (arm, "b")]).to_csv(d / "tables" / "final.csv", index=False)
    pd.DataFrame([{"arm": "b", "baseline": arm, "metric": EVIL, "side": EVIL, "baseline_mean": 1, "arm_mean": 1,
                   "diff": 0.0, "lo": -1, "hi": 1, "lo_sim": -2, "hi_sim": 2, "p": 0.5, "p_holm": 0.5, "mdd80": 1,
                   "test": EVIL}]).to_csv(d / "tables" / "differences.csv", index=False)
    pd.DataFrame([{"arm": a, "metric": EVIL, "n": 2, "mean": 1.0, "lo": 1, "hi": 1, "min": 1, "max": 1}
                  for a in (arm, "b")]).to_csv(d / "tables" / "saturation.csv", index=False)
    pd.DataFrame(columns=["arm", "seed", "dir", "final_iter", "commit"]).to_csv(d / "tables" / "runs.csv", index=False)


class _Elements(HTMLParser):
    """Every element of a page with its attributes, as a browser's parser sees them."""

    def __init__(self, page):
        super().__init__()
        self.found = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def test_report_escapes_everything_and_forbids_scripts(tmp_path):
    _evil_experiment(tmp_path / "exp")
    page = report.main([str(tmp_path / "exp")]).read_text()
    elements = _Elements(page).found
    assert not [t for t, _ in elements if t in ("script", "iframe", "object", "embed", "base", "form")]
    assert not [(t, a) for t, a in elements for k in a if k.startswith("on")]  # no event handler anywhere
    assert all(a.get("src", "data:").startswith("data:") for t, a in elements if t == "img")
    assert page.count("&lt;script&gt;") >= 8  # the strings are shown, as text
    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert m and "default-src 'none'" in m.group(1) and "img-src data:" in m.group(1)
    assert "script-src" not in m.group(1)  # scripts fall under default-src 'none'


@pytest.mark.parametrize("damage, msg", [
    (lambda d: (d / "experiment.json").write_text("{arms: "), r"experiment.json is not valid JSON"),
    (lambda d: (d / "experiment.json").write_text("[1, 2]"), r"experiment.json holds a JSON list"),
    (lambda d: (d / "experiment.json").write_text('{"name": "x"}'), r"experiment.json lacks 'arms'"),
    (lambda d: pd.read_csv(d / "tables" / "final.csv").drop(columns="mean").to_csv(d / "tables" / "final.csv"),
     r"final.csv lacks the column 'mean'"),
    (lambda d: (d / "tables" / "runs.csv").write_text(""), r"runs.csv cannot be read"),
    (lambda d: (d / "tables" / "saturation.csv").unlink(), r"saturation.csv is missing"),
])
def test_report_on_damaged_files_is_one_line(tmp_path, damage, msg):
    d = tmp_path / "exp"
    _evil_experiment(d)
    damage(d)
    with pytest.raises(UserError, match=msg):
        report.main([str(d)])
    assert not (d / "report.html").exists()


def test_report_unwritable_out_is_one_line(tmp_path):
    _evil_experiment(tmp_path / "exp")
    with pytest.raises(UserError, match="cannot write .*experiment.json is a file where a folder belongs; move it"):
        report.main([str(tmp_path / "exp"), f"--out={tmp_path / 'exp' / 'experiment.json' / 'x.html'}"])


# -----------------------------------------------------------------------------
# experiment specs: arm names are folders of the experiment's own

@pytest.mark.parametrize("arm", ["..", ".lock", "experiment.json", "a$b$", "a/b", "", "x" * 65, "tables", "-x"])
def test_unsafe_arm_names_are_refused(tmp_path, arm):
    spec = tmp_path / "e.json"
    spec.write_text(json.dumps({"arms": {arm: {}, "ok": {}}}))
    with pytest.raises(UserError, match="must be a plain folder name"):
        experiment.main([str(spec), f"--out_root={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["e.json"]


def test_one_arm_experiment_prints_without_differences(capsys):
    final = pd.DataFrame([{"arm": "only", "metric": "val_loss", "mean": 2.0, "lo": 1.9, "hi": 2.1}])
    experiment.print_differences(pd.DataFrame(), final, {"seeds": [1, 2], "baseline": "only", "arms": {"only": {}},
                                                        "test": "auto"})
    assert "val_loss" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# configs and folders

def test_config_values_and_files(tmp_path):
    for bad in ("--beta1=nan", "--learning_rate=inf", "--grad_clip=-inf"):
        with pytest.raises(UserError, match="expected a finite number"):
            parse_config(TrainConfig(), [bad])
    assert parse_config(TrainConfig(), ["--schedule_hi=inf"]).schedule_hi == float("inf")  # its default: allowed
    with pytest.raises(UserError, match="expected a finite number"):
        parse_config(EvalConfig(), ["--temperature=nan"])  # used to skip the sampled generation silently
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list: it must be an object"):
        parse_config(TrainConfig(), [str(p)])


def test_folder_lock_never_follows_a_symlink_and_names_a_file(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link: remove it"):
        FolderLock(tmp_path / "run")
    assert target.read_text() == "keep me"
    with pytest.raises(UserError, match="is a file, not a folder"):
        FolderLock(target)


def test_stale_temps_only_the_named_files(tmp_path):
    keep = [tmp_path / ".notes.tmp", tmp_path / ".notes.json.abcdefgh.prebias.tmp", tmp_path / ".x.abcdefgh.tmp"]
    gone = tmp_path / ".config.json.abcdefgh.prebias.tmp"
    for p in keep + [gone]:
        p.write_text("")
    common.remove_stale_temps(tmp_path, r"config\.json")
    assert not gone.exists() and all(p.exists() for p in keep)


# -----------------------------------------------------------------------------
# a checkpoint of another run dropped into a run's ckpt/ is not evaluated as the run's

def test_eval_refuses_a_foreign_checkpoint(tiny_run, tmp_path):
    other = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "other")
    train.main(other.train_args(dim=16, n_heads=2, n_kv_heads=1, max_iters=1))
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    shutil.copy(other.out_dir / "ckpt" / "ckpt_1.pt", run / "ckpt" / "ckpt_99.pt")
    with pytest.raises(UserError, match=r"ckpt_99.pt is not a checkpoint of the run in .*: it was trained with "
                                        r"dim=16, the run with 32; move it out of"):
        ev.main([f"--out_dir={run}", "--n_prompts=1", "--max_new_tokens=4"])


# -----------------------------------------------------------------------------
# tags against the run that trains them

def _tagset(tmp_path, tag):
    from tokenizer import Tokenizer
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"tags": [tag]}))
    return p, Tokenizer()


def test_tag_rows_steps_and_ids(tmp_path, capsys):
    canary = {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}", "rows": 9,
              "steps": {"start": 5, "n": 2}}
    p, enc = _tagset(tmp_path, canary)
    ts = tags.load_tags(p, enc, 256, 512)
    with pytest.raises(UserError, match="asks for rows=9, but a step trains 8 batches"):
        ts.check_run(8, 100, "tag file t.json")  # it used to be capped at 8 silently
    ts.check_run(16, 3, "tag file t.json")
    assert "tag 'secret' is never active before max_iters=3" in capsys.readouterr().err
    p, enc = _tagset(tmp_path, {**canary, "id": "a b$"})
    with pytest.raises(UserError, match=r"tags\[0\].id: 'a b\$': letters, digits"):
        tags.load_tags(p, enc, 256, 512)



# -----------------------------------------------------------------------------
# train.py: values, exclusions and the optimizer file, refused before anything is written

@pytest.mark.parametrize("arg, msg", [
    ("--beta2=5", r"--beta2=5.0: must be in \[0, 1\)"), ("--beta1=-0.1", "must be in"),
    ("--device=tpu", "--device=tpu: choose auto, cpu, cuda"), ("--seed=-1", "--seed=-1: must be >= 0"),
])
def test_train_values_write_nothing(tiny_data, tmp_path, arg, msg):
    run = TinyRun(*tiny_data, tmp_path / "never")
    with pytest.raises(UserError, match=msg):
        train.main(run.train_args() + [arg])
    assert not run.out_dir.exists()


def test_exclusions_that_exclude_nothing_or_everything(tiny_data, tmp_path, capsys):
    from prebias.data import BatchData
    data = BatchData(tiny_data[0], 512, 64)
    cases = {"val": (data.val_ids[:20], "none of its 20 ids is a training batch"),
             "all": (data.train_ids, "it removes every training batch")}
    for name, (ids, msg) in cases.items():
        np.save(tmp_path / f"{name}.npy", ids)
        run = TinyRun(*tiny_data, tmp_path / f"run_{name}")
        with pytest.raises(UserError, match=msg):
            train.main(run.train_args(schedule_exclude=tmp_path / f"{name}.npy"))
        assert not run.out_dir.exists()  # it used to fail after ckpt_0 was written
    np.save(tmp_path / "huge.npy", np.array([10 ** 12, int(data.train_ids[0])]))  # no 931 GiB mask
    run = TinyRun(*tiny_data, tmp_path / "run_huge")
    train.main(run.train_args(schedule_exclude=tmp_path / "huge.npy", max_iters=2, eval_interval=2))
    assert "1 of its 2 ids are not training batches" in capsys.readouterr().err
    assert int(data.train_ids[0]) not in np.load(run.out_dir / "batch_ids.npy")


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_a_damaged_optimizer_file_on_resume_is_one_line(tiny_data, tmp_path, damage):
    import torch
    run = TinyRun(*tiny_data, tmp_path / "run")
    train.main(run.train_args(max_iters=4, eval_interval=2))
    opt = run.out_dir / "ckpt" / "optimizer_4.pt"
    if damage == "truncate":
        opt.write_bytes(opt.read_bytes()[:200])
    else:
        torch.save(torch.optim.SGD([torch.zeros(3)], lr=0.1).state_dict(), opt)
    with pytest.raises(UserError, match="optimizer_4.pt cannot be read as this run's optimizer state"):
        train.main(run.train_args(max_iters=8, eval_interval=2, init_from="resume"))


# -----------------------------------------------------------------------------
# batch metrics, references and offline selection

def test_select_by_a_name_that_would_escape_tables_dir(tiny_data, tmp_path):
    import select_batches
    shutil.copytree(tiny_data[1], tmp_path / "t")
    with pytest.raises(UserError, match=r"--by='\.\./\.\./x': a score or column name"):
        select_batches.main([f"--data_dir={tiny_data[0]}", f"--tables_dir={tmp_path / 't'}", "--vocab_size=512",
                             "--max_seq_len=64", "--by=../../x"])
    assert sorted(os.listdir(tmp_path)) == ["t"] and not (tmp_path / "t" / "select").exists()


@pytest.mark.parametrize("damage, msg", [
    (lambda t: pd.read_csv(t / "batch_metrics.csv").drop(columns="batch_id").to_csv(t / "batch_metrics.csv",
                                                                                   index=False),
     "batch_metrics.csv lacks the column 'batch_id'"),
    (lambda t: pd.read_csv(t / "batch_metrics.csv").assign(fk_grade="high").to_csv(t / "batch_metrics.csv",
                                                                                  index=False),
     "column 'fk_grade' holds 'high', not a number"),
    (lambda t: (t / "batch_metrics.csv").write_text(""), "batch_metrics.csv cannot be read"),
    (lambda t: (t / "batch_metrics.json").write_text('{"vocab_size": 512'), "batch_metrics.json is not valid JSON"),
    (lambda t: (t / "batch_metrics.json").write_text('{"vocab_size": 512}'), "batch_metrics.json lacks 'max_seq_len'"),
])
def test_damaged_batch_metrics_are_one_line(tiny_data, tmp_path, damage, msg):
    from prebias import batchmetrics
    from prebias.data import BatchData
    t = tmp_path / "t"
    shutil.copytree(tiny_data[1], t)
    damage(t)
    with pytest.raises(UserError, match=msg):
        batchmetrics.load_batch_metrics(t, BatchData(tiny_data[0], 512, 64))


def test_a_reference_model_of_another_vocabulary_or_a_shorter_context(tiny_data, tmp_path):
    """pretokenize --ref_model accepted both (--select_ref checked them, pretokenize not)."""
    import torch

    from export import export_v0
    from model import ModelArgs, Transformer
    from prebias import batchmetrics
    for name, args, msg in (("short", dict(vocab_size=512, max_seq_len=32), "has a context of 32 tokens, shorter "
                                                                             "than the 64-token windows"),
                            ("small", dict(vocab_size=256, max_seq_len=64), "has vocab_size 256, the data 512")):
        torch.manual_seed(0)
        export_v0(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, **args)), tmp_path / f"{name}.bin")
        with pytest.raises(UserError, match=msg):
            batchmetrics.write_batch_metrics(tiny_data[0], 512, 64, tmp_path / "t", "n_words",
                                             ref_model=str(tmp_path / f"{name}.bin"))
        assert not (tmp_path / "t" / "batch_metrics.csv").exists()


# -----------------------------------------------------------------------------
# a model file, a checkpoint and a lock: the lines name the file and the fix

def test_model_and_lock_lines_name_the_file_and_the_fix(tiny_data, tmp_path):
    d = tmp_path / "model.bin"
    d.mkdir()
    refused(lambda: reference_scorer(tiny_data[0], 512, str(d)), f"--ref_model={d}", "folder", "give")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    refused(lambda: checkpoint.load_checkpoint(foreign), str(foreign), "train.py")
    (tmp_path / "r31" / ".lock").mkdir(parents=True)
    refused(lambda: FolderLock(tmp_path / "r31"), str(tmp_path / "r31" / ".lock"), "remove")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_dead_writers_temp_is_removed_even_when_its_pid_is_reused(tmp_path):
    """atomic_path removes a killed writer's temp before its first write of the file. The pid
    in a temp's name may be held again by another process (pid_max is 32,768 here): the
    temp is a dead writer's when the process holding that pid started after the temp was
    last written. Seen failing in make crash-test: a killed pretokenize worker's temp was kept
    by a rerun worker that got the same pid. A live writer's temp (written after its start) stays."""
    import os
    import subprocess
    import time
    target = tmp_path / "data01.bin"
    live = subprocess.Popen(["sleep", "30"])  # a process that holds a pid now
    try:
        time.sleep(0.05)
        reused = tmp_path / f".data01.bin.abcdefgh.{live.pid}.prebias.tmp"  # written before that process started
        reused.write_text("half")
        os.utime(reused, (time.time() - 60, time.time() - 60))
        writing = tmp_path / f".data01.bin.ijklmnop.{live.pid}.prebias.tmp"  # written by it, after its start
        writing.write_text("in progress")
        mine = tmp_path / f".data01.bin.qrstuvwx.{os.getpid()}.prebias.tmp"  # this process's pid, an older file
        mine.write_text("half")
        os.utime(mine, (time.time() - 10 ** 6, time.time() - 10 ** 6))
        common._CLEANED.discard(target)
        with common.atomic_path(target) as tmp:
            tmp.write_text("whole")
        assert target.read_text() == "whole"
        assert not reused.exists() and not mine.exists() and writing.exists()
    finally:
        live.kill()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_zombie_writers_temp_is_removed(tmp_path):
    """A killed writer that is not reaped yet (a zombie: signal 0 still finds its pid) is gone."""
    import os
    import subprocess
    import time
    dead = subprocess.Popen(["sleep", "0"])  # exits at once; not waited for, so a zombie until reaped
    time.sleep(0.3)
    assert open(f"/proc/{dead.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    target = tmp_path / "data00.bin"
    stale = tmp_path / f".data00.bin.abcdefgh.{dead.pid}.prebias.tmp"
    stale.write_text("half")  # written after the process started, as its own temp would be
    common._CLEANED.discard(target)
    with common.atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert not stale.exists()
    dead.wait()
