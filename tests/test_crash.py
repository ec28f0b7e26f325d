"""Crash safety as a tested property, the way SQLite tests it: a stage is killed (SIGKILL,
as `kill -9`) at one of its file writes, then run again, and what it leaves must be what
an uninterrupted run leaves, with no temp file behind.

The kill points come from prebias.common.fault_point, called before every rename that
publishes a file (atomic_path): PREBIAS_FAULT_COUNT=<file> lists a stage's writes,
PREBIAS_FAULT_AT=N kills it at the Nth. The stage runs as its own session
(start_new_session), so the kill takes its workers with it.

Compared: a manifest of the folder, file -> sha256, where a checkpoint (.pt) is hashed by
its content less its wall-clock timings (compute.*_s: a rerun takes another time), a .json less
its keys "seconds" and "*_s" (the reference scorer's fit time, select_batches' cost), a .csv
less those columns and "gradients" (attribute.py's LDS table: its cost, 0 when cached), and
report.html less its "written by report.py on <minute>" line. Left out: logs and records
of each start (train.log, history.jsonl, run.json with its start time, .lock): a resumed
run logs its resume.
"""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SEQ, VOCAB, experiment_spec

LOGS = {".lock", "train.log", "history.jsonl", "run.json"}  # differ by a run's time and its starts


def run_stage(args, cwd, fault_at=None, count=None, timeout=300, fault_errno=None):
    """python <args> as its own session, with the fault hook armed as asked (fault_errno:
    the fault_at-th write fails with that error instead of a kill)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREBIAS_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if count is not None:
        env["PREBIAS_FAULT_COUNT"] = str(count)
    if fault_at is not None:
        env["PREBIAS_FAULT_AT"] = str(fault_at)
    if fault_errno is not None:
        env["PREBIAS_FAULT_ERRNO"] = fault_errno
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def writes(args, cwd, tmp) -> list[str]:
    """The paths the stage publishes, in order (one uninterrupted run, counted)."""
    log = Path(tmp) / "count.txt"
    log.unlink(missing_ok=True)
    r = run_stage(args, cwd, count=log)
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


def _pt_digest(p: Path) -> str:
    import torch
    obj = torch.load(p, weights_only=True, map_location="cpu")
    if isinstance(obj.get("compute"), dict):
        obj["compute"] = {k: v for k, v in obj["compute"].items() if not k.endswith("_s")}
    if isinstance(obj.get("config"), dict):  # a checkpoint after a resume says init_from=resume
        obj["config"] = {k: v for k, v in obj["config"].items() if k != "init_from"}
    buf = io.BytesIO()
    _canon(obj, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _canon(x, out):
    """A byte string of x (nested dicts, lists, tensors, plain values) independent of the pickle."""
    import torch
    if isinstance(x, dict):
        out.write(b"{")
        for k in sorted(x, key=str):
            out.write(repr(k).encode() + b":")
            _canon(x[k], out)
        out.write(b"}")
    elif isinstance(x, (list, tuple)):
        out.write(b"[")
        for v in x:
            _canon(v, out)
        out.write(b"]")
    elif isinstance(x, torch.Tensor):
        flat = torch.empty(x.numel(), dtype=x.dtype).copy_(x.detach().reshape(-1))  # any strides, 0-dim too
        out.write(f"T{x.dtype}{tuple(x.shape)}".encode() + flat.view(torch.uint8).numpy().tobytes())
    else:
        out.write(repr(x).encode() + b";")


def _untimed(x):
    """A JSON value less its wall-clock fields ("seconds", "<what>_s"): a rerun takes another time.
    A DoneRecord ({"settings", "done"}) keeps its items and their inputs' sizes, not the
    inputs' mtimes (file_signature: a rerun rewrites the checkpoints it reads)."""
    if isinstance(x, dict) and set(x) == {"settings", "done"} and isinstance(x["done"], dict):
        return {"settings": x["settings"], "done": {k: v[0] if isinstance(v, list) and len(v) == 2 else v
                                                    for k, v in x["done"].items()}}
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not (k == "seconds" or k.endswith("_s"))}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def _untimed_csv(text: str) -> str:
    """A CSV table less its cost columns ("seconds", "<what>_s", and "gradients": those this
    invocation computed, 0 on a rerun that finds them cached)."""
    import csv
    rows = list(csv.reader(io.StringIO(text)))
    keep = [i for i, k in enumerate(rows[0] if rows else []) if not (k in ("seconds", "gradients") or k.endswith("_s"))]
    return "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows)


def manifest(folder, skip=LOGS) -> dict:
    """{relative path: sha256} of every file under folder but the logs; temp files stay in.
    A .pt is hashed by its content less compute.*_s, a .json less its timings (_untimed)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name not in skip:
            if p.suffix == ".pt":
                h = _pt_digest(p)
            elif p.suffix == ".html":  # report.py's "written by report.py on <minute>" line
                h = hashlib.sha256(re.sub(rb"written by report.py on [0-9: -]+", b"", p.read_bytes())).hexdigest()
            elif p.suffix == ".csv":  # a table's cost columns (lds_*.csv: retrain_s, seconds)
                h = hashlib.sha256(_untimed_csv(p.read_text()).encode()).hexdigest()
            elif p.suffix == ".json" and not p.name.endswith(".prebias.tmp"):
                h = hashlib.sha256(json.dumps(_untimed(json.loads(p.read_text())), sort_keys=True).encode()).hexdigest()
            else:
                h = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(folder))] = h
    return out


def temps(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*.prebias.tmp"))


# -----------------------------------------------------------------------------
# train: the numpy record written after the last checkpoint

def tagged_train_args(data, tables, out, tags):
    return [ROOT / "train.py", f"--data_dir={data}", f"--tables_dir={tables}", f"--vocab_size={VOCAB}",
            f"--max_seq_len={SEQ}", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--max_iters=12", "--eval_interval=8", "--eval_iters=2",
            "--log_interval=4", "--learning_rate=3e-3", "--warmup_iters=4", "--device=cpu", "--dtype=float32",
            f"--tags={tags}", f"--out_dir={out}", f"--model_bin={out}/model.bin"]


def canary_file(path: Path) -> Path:
    path.write_text(json.dumps({"seed": 1, "tags": [{"id": "secret", "kind": "canary",
                                                     "text": "the secret number is {digits:6}",
                                                     "steps": {"start": 0, "n": 12, "every": 1}, "rows": 1,
                                                     "position": "random"}]}))
    return path


@pytest.fixture(scope="module")
def tagged_run(tiny_data, tmp_path_factory):
    """(args, its writes, clean manifest, work folder) of a 12-step run with a canary at
    every step; the clean run is kept in <work>/clean, <work>/run is free for a killed one."""
    import shutil
    data, tables = tiny_data
    work = tmp_path_factory.mktemp("tagged")
    args = tagged_train_args(data, tables, work / "run", canary_file(work / "tags.json"))
    paths = writes(args, work, work)
    clean = manifest(work / "run")
    shutil.move(work / "run", work / "clean")
    return args, paths, clean, work


def view_step(out, step, cwd):
    return run_stage([ROOT / "batch_viewer.py", f"--out_dir={out}", f"--step={step}", "--chars=0"], cwd)


@pytest.mark.parametrize("name", ["insertions.npz", "batch_ids.npy"])
def test_record_after_the_last_checkpoint_is_mended_by_resume(tagged_run, name):
    """A kill after the final checkpoint, at the write of the run's numpy record: the batch
    viewer says the record is stale (never a batch without the canary it trained on), and a
    resume of the complete run rewrites it as the clean run has it (seen failing before: the
    viewer showed step 11 without its canary, and the resume left batch_ids.npy stale)."""
    import shutil
    args, paths, clean, work = tagged_run
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    last = max(i for i, p in enumerate(paths, 1) if p.endswith(name))
    assert any(p.endswith("ckpt_12.pt") for p in paths[:last])  # after the final checkpoint
    r = run_stage(args, work, fault_at=last, count=work / "kill.txt")
    (work / "kill.txt").unlink()
    assert r.returncode == -9
    view = view_step(out, 11, work)
    if view.returncode == 0:  # the record it read must be the one trained on: the canary is in step 11
        assert "tag 0" in view.stdout, view.stdout
    else:
        assert view.stderr.count("\n") == 1 and "resume the run" in view.stderr, view.stderr
    r = run_stage(args + ["--init_from=resume"], work)
    assert r.returncode == 0, r.stderr
    assert manifest(out) == clean
    assert temps(out) == []
    view = view_step(out, 11, work)
    assert view.returncode == 0 and "tag 0" in view.stdout, view.stderr


def test_insertions_of_other_steps_are_refused(tagged_run, tmp_path):
    """insertions.npz says the steps it was written for: one that disagrees with batch_ids.npy
    (written from other checkpoints) is one line, not a batch shown without its tags."""
    import shutil
    work = tagged_run[3]
    out = tmp_path / "copy"
    shutil.copytree(work / "clean", out)
    z = dict(np.load(out / "insertions.npz"))
    keep = z["insertions"][:, 0] < 8  # as written at ckpt_8
    n = int(z["insertions"][keep, 4].sum())
    z.update(insertions=z["insertions"][keep], insert_tokens=z["insert_tokens"][:n],
             replaced_tokens=z["replaced_tokens"][:n], n_steps=np.int64(8))
    np.savez(out / "insertions.npz", **z)
    view = view_step(out, 11, tmp_path)
    assert view.returncode == 1 and view.stderr.count("\n") == 1, view.stdout + view.stderr
    assert "records the insertions of 8 steps but batch_ids.npy has 12" in view.stderr


# -----------------------------------------------------------------------------
# the sweep: kill a stage at each of its writes in turn, rerun, compare

def crash_sweep(args, out, cwd, points=None, between=None, reset=None, skip=LOGS, shard=(0, 1),
                fault_errno=None) -> int:
    """Kill `args` at each of its writes (or at `points`: 1-based, negative from the end,
    or "middle"), run `between(n)` on what the kill left, rerun it (rerun_args) and require
    the clean run's manifest of `out` with no temp file left. reset() puts the inputs back
    before each run (default: remove out). shard=(i, k) kills at every k-th of those writes
    from the i-th, so k workers can share one stage's sweep. fault_errno="ENOSPC" (say): the
    write fails with that error instead of a kill, and the stage must stop with exit 1 and
    one error line, the path named, no temp left. Returns the number of writes."""
    import shutil
    reset = reset or (lambda: shutil.rmtree(out, ignore_errors=True))
    count = Path(cwd) / "count.txt"
    reset()
    paths = writes(args, cwd, cwd)
    clean = manifest(out, skip)
    assert temps(out) == []
    for n in kill_points(len(paths), points, shard):
        reset()
        count.unlink(missing_ok=True)
        r = run_stage(args, cwd, fault_at=n, count=count, fault_errno=fault_errno)
        if fault_errno:  # a multi-run command (experiment, attribute) lists its failed runs above
            assert r.returncode == 1 and one_error_line(r.stderr) and paths[n - 1] in r.stderr, (n, r.stderr[-2000:])
            assert temps(out) == [], (n, paths[n - 1])
        else:
            assert r.returncode == -9, (n, paths[n - 1], r.stderr)
        if between:
            between(n)
        r = run_stage(rerun_args(args), cwd)
        assert r.returncode == 0, (n, paths[n - 1], r.stderr)
        assert manifest(out, skip) == clean, (n, paths[n - 1])
        assert temps(out) == [], (n, paths[n - 1])
    return len(paths)


def kill_points(n_writes, points=None, shard=(0, 1)) -> list[int]:
    """The writes (1-based) crash_sweep kills at: `points` (1-based, negative from the end,
    "middle") or all, then every shard[1]-th of them from the shard[0]-th."""
    at = {"middle": (n_writes + 1) // 2}
    todo = sorted({at.get(n, n) if at.get(n, n) > 0 else n_writes + 1 + n for n in points} if points
                  else range(1, n_writes + 1))
    return todo[shard[0]::shard[1]]


def test_the_shards_of_a_sweep_kill_at_every_write_once():
    assert kill_points(7, ["middle", -1, 1]) == [1, 4, 7]
    shards = [kill_points(111, shard=(i, 4)) for i in range(4)]
    assert sorted(sum(shards, [])) == list(range(1, 112)) and shards[3][:2] == [4, 8]


def rerun_args(args) -> list:
    """How a user reruns a killed command: the same, but train.py resumes once it has a
    checkpoint (as its error says: use --init_from=resume)."""
    args = [str(a) for a in args]
    if args[0].endswith("train.py") and "--init_from=resume" not in args:
        out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
        if list((Path(out) / "ckpt").glob("ckpt_*.pt")):
            return args + ["--init_from=resume"]
    return args


def test_sample_killed_at_any_write_is_refused_then_rewritten_whole(tmp_path):
    """A sample cut short is never read as a smaller data set: the shards' reader refuses it
    in one line until a rerun writes it whole (seen failing before: a sample killed after
    its second shard was read as 2 shards, and its rerun refused them as downloaded data)."""
    from prebias.common import UserError
    from prebias.data import raw_shards
    data = tmp_path / "data"
    args = [ROOT / "tinystories.py", "sample", f"--data_dir={data}", "--n_stories=40", "--n_shards=3"]

    def between(n):
        if n > 1:  # from the first shard's write on, the set is partial until the final marker
            with pytest.raises(UserError, match="unfinished sample"):
                raw_shards(data)

    assert crash_sweep(args, data, tmp_path, between=between) == 5  # SAMPLE, 3 shards, SAMPLE
    (data / "TinyStories_all_data" / "data01.json").unlink()  # a finished sample that lost a shard
    with pytest.raises(UserError, match="lacks data01.json of the 3 shards its sample wrote"):
        raw_shards(data)


# -----------------------------------------------------------------------------
# every stage: its command on the tiny run (or data), the folder it writes, how to reset

EVAL_ARGS = ["--n_prompts=2", "--max_new_tokens=8", "--val_batches=4", "--batch_size=4", "--device=cpu"]


@pytest.fixture(scope="module")
def beds(tagged_run, tiny_data):
    """{name: pristine folder}: 'clean' (the tagged run, trained), 'evaluated' (and eval.py
    run on it), 'raw' (the fixture's raw shards and tokenizer, not pretokenized)."""
    import shutil
    work = tagged_run[3]
    ev = work / "evaluated"
    if not ev.exists():
        shutil.copytree(work / "clean", ev)
        r = run_stage([ROOT / "eval.py", f"--out_dir={ev}", *EVAL_ARGS], work)
        assert r.returncode == 0, r.stderr
    raw = work / "raw"
    if not raw.exists():
        (raw / "data").mkdir(parents=True)
        shutil.copytree(tiny_data[0] / "TinyStories_all_data", raw / "data" / "TinyStories_all_data")
        shutil.copy(tiny_data[0] / f"tok{VOCAB}.model", raw / "data")
    return {"clean": work / "clean", "evaluated": ev, "raw": raw, "data": tiny_data[0], "tables": tiny_data[1],
            "train_args": tagged_run[0]}


def stage_bed(name, beds, tmp):
    """(args, folder written, reset, skip) of stage `name` in tmp."""
    import shutil
    run = tmp / "run"

    def copy_of(src):
        def reset():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(src, run)
        return reset
    if name == "sample":
        data = tmp / "data"
        return [ROOT / "tinystories.py", "sample", f"--data_dir={data}", "--n_stories=40", "--n_shards=3"], data, \
            None, LOGS
    if name == "pretokenize":
        def reset():
            shutil.rmtree(tmp / "p", ignore_errors=True)
            shutil.copytree(beds["raw"], tmp / "p")
        return [ROOT / "tinystories.py", "pretokenize", f"--vocab_size={VOCAB}", f"--max_seq_len={SEQ}",
                f"--data_dir={tmp / 'p' / 'data'}", f"--tables_dir={tmp / 'p' / 'tables'}", "--workers=1",
                "--metrics=fk_grade,ttr"], tmp / "p", reset, LOGS
    if name == "train":
        args = [str(a) for a in beds["train_args"]]
        args = [a if not a.startswith(("--out_dir=", "--model_bin=")) else a.split("=")[0] + "=" +
                str(run) + ("/model.bin" if a.startswith("--model_bin") else "") for a in args]
        return args, run, None, LOGS
    if name == "resume":
        args = [a for a in stage_bed("train", beds, tmp)[0]] + ["--init_from=resume", "--max_iters=16"]
        return args, run, copy_of(beds["clean"]), LOGS
    if name == "export":
        return [ROOT / "export.py", run / "exported.bin", "--latest", f"--out_dir={run}", "--version=1"], run, \
            copy_of(beds["clean"]), LOGS
    if name == "eval":
        return [ROOT / "eval.py", f"--out_dir={run}", *EVAL_ARGS], run, copy_of(beds["clean"]), LOGS
    if name in ("visualize_attn", "visualize_embd", "visualize_sat_batch", "visualize_sat_output"):
        return [ROOT / f"{name}.py", f"--out_dir={run}"], run, copy_of(beds["evaluated"]), LOGS
    if name == "durability":
        return [ROOT / "durability.py", f"--out_dir={run}", "--R=20", "--n_prompts=2", "--device=cpu"], run, \
            copy_of(beds["clean"]), LOGS
    if name == "report":
        return [ROOT / "report.py", run, f"--out={run / 'report.html'}"], run, copy_of(beds["evaluated"]), LOGS
    if name == "select_batches":
        def reset():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(beds["tables"], run, ignore=shutil.ignore_patterns("select"))
        return [ROOT / "select_batches.py", "--by=fk_grade", "--keep=0.5", f"--data_dir={beds['data']}",
                f"--tables_dir={run}", f"--vocab_size={VOCAB}", f"--max_seq_len={SEQ}"], run, reset, LOGS
    if name == "attribute":  # an influence table, then an LDS of 2 subsets: retrains as subprocesses
        return [ROOT / "attribute.py", f"--out_dir={run}", "--probe=val", "--n_val=2", "--d=32",
                "--estimators=grad_dot,tracin", "--validate=lds", "--subsets=2", "--n_boot=50", "--jobs=1"], run, \
            copy_of(beds["clean"]), LOGS | {"retrain.log"}
    if name == "experiment":  # 2 arms x 1 seed of 12 steps, eval, durability, tables, report
        spec = experiment_spec((beds["data"], beds["tables"]), tmp / "exp.json", seeds=[1])
        s = json.loads(spec.read_text())
        s["base"].update(max_iters=12, eval_interval=8, log_interval=4)
        s["durability"]["R"] = 20
        spec.write_text(json.dumps(s))
        return [ROOT / "experiment.py", spec, f"--out_root={run}", "--jobs=1"], run, None, LOGS | {"experiment.log"}
    raise KeyError(name)


STAGES = ["sample", "pretokenize", "train", "resume", "eval", "export", "visualize_attn", "visualize_embd",
          "visualize_sat_batch", "visualize_sat_output", "durability", "select_batches", "report", "attribute",
          "experiment"]


# the default run kills each stage at its middle write (one kill, one rerun: about 20 s a
# stage on 2 cores); `make crash-test` (PREBIAS_CRASH_ALL=1) kills it at every write in turn:
# 126 writes over the first 12 stages, attribute's 55 (~10 s a run here) and experiment's 111
# (~35 s a run), each a kill and a rerun: ~50 min on 2 workers, as long again with ENOSPC.
SWEPT = ["pretokenize", "train", "resume", "eval", "export", "visualize_attn", "visualize_embd",
         "visualize_sat_batch", "visualize_sat_output", "durability", "select_batches", "report", "attribute",
         "experiment"]
# make test kills an experiment once, in its own tiny experiment (the tiny_experiment fixture)
SAMPLED = [s for s in SWEPT if s != "experiment"]
# the long sweeps are cut into shards (every k-th write) that the workers of -n share
SHARDS = {"attribute": 2, "experiment": 4}


@pytest.mark.parametrize("name", SAMPLED)
def test_a_stage_killed_at_a_write_reruns_to_the_clean_result(name, beds, tmp_path):
    args, out, reset, skip = stage_bed(name, beds, tmp_path)
    crash_sweep(args, out, tmp_path, points=["middle"], reset=reset, skip=skip)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PREBIAS_CRASH_ALL") != "1",
                    reason="the exhaustive sweep (every write of every stage) runs in make crash-test")
@pytest.mark.parametrize("name,shard", [(n, (i, SHARDS.get(n, 1))) for n in sorted(SWEPT, key=lambda n: -SHARDS.get(n, 1))
                                         for i in range(SHARDS.get(n, 1))],  # the longest first: xdist balances
                         ids=lambda v: f"{v[0] + 1}of{v[1]}" if isinstance(v, tuple) else v)
@pytest.mark.parametrize("fault", ["kill", "ENOSPC"])  # every kill first
def test_a_stage_killed_at_every_write_reruns_to_the_clean_result(name, shard, fault, beds, tmp_path):
    """Killed, or out of disk (ENOSPC), at each write in turn; rerun (with room): the clean result."""
    args, out, reset, skip = stage_bed(name, beds, tmp_path)
    crash_sweep(args, out, tmp_path, reset=reset, skip=skip, shard=shard,
                fault_errno=None if fault == "kill" else fault)


# -----------------------------------------------------------------------------
# the environment's faults: a full disk, a read-only folder, a device torch lacks: one line

def test_main_guard_says_an_environment_fault_in_one_line(capsys):
    import errno
    from prebias.common import main_guard
    for code, fix in ((errno.ENOSPC, "free some space"), (errno.EROFS, "remount this one read-write"),
                      (errno.EACCES, "may write"), (errno.EDQUOT, "quota")):
        def fail(code=code):
            raise OSError(code, os.strerror(code), "/x/out/ckpt_4.pt")
        with pytest.raises(SystemExit) as e:
            main_guard(fail)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: cannot write /x/out/ckpt_4.pt: ")
        assert fix in err
    with pytest.raises(FileNotFoundError):  # not the environment's fault: a traceback as before
        main_guard(lambda: open("/nonexistent/x"))


def _fill_disk(path):
    """A pool worker's write on a full disk (np.save's error names no file)."""
    import errno
    from prebias.common import atomic_path
    with atomic_path(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_failing_inside_another_keeps_its_own_name(tmp_path):
    """pretokenize writes each shard's metrics (a pool worker's atomic write) inside the open
    batch_metrics.csv: a full disk at a shard was named as the CSV (found by make crash-test)."""
    import errno
    from concurrent.futures import ProcessPoolExecutor
    from prebias.common import atomic_path
    for nested in ("inline", "worker"):
        with pytest.raises(OSError) as e, atomic_path(tmp_path / "outer.csv") as tmp:
            tmp.write_text("id\n")
            if nested == "inline":
                _fill_disk(tmp_path / "inner.npy")
            else:
                with ProcessPoolExecutor(1) as pool:
                    pool.submit(_fill_disk, tmp_path / "inner.npy").result()
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "inner.npy")), nested
        assert list(tmp_path.iterdir()) == [], nested  # neither file, nor a temp of either
    with pytest.raises(OSError) as e, atomic_path(tmp_path / "outer.csv"):  # its own write's fault: its name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(tmp_path / "outer.csv")


# every stage, a full disk and a read-only folder in turn (main_guard's line for each is
# tested above; here, that each stage's writes reach it and leave no temp)
@pytest.mark.parametrize("name,fault", [(n, ("ENOSPC", "EROFS")[i % 2]) for i, n in enumerate(["sample", *SWEPT])])
def test_a_write_that_fails_is_one_line_naming_the_path(name, fault, beds, tmp_path):
    """The stage's first write fails (through the hook) as on a full disk or a read-only
    folder: exit 1, one line naming the file and the fix, no temp file left."""
    args, out, reset, _ = stage_bed(name, beds, tmp_path)
    (reset or (lambda: None))()
    r = run_stage(args, tmp_path, fault_at=1, count=tmp_path / "count.txt", fault_errno=fault)
    first = (tmp_path / "count.txt").read_text().splitlines()[0]
    assert r.returncode == 1 and one_error_line(r.stderr).startswith(f"error: cannot write {first}: "), \
        r.stderr[-2000:]
    assert temps(out) == []


def test_a_run_of_an_experiment_out_of_disk_is_named_whole(beds, tmp_path):
    """A run's write fails inside an experiment: the experiment lists that run with the
    run's own error line whole (path and fix), then its one error line."""
    args, out, _, _ = stage_bed("experiment", beds, tmp_path)
    r = run_stage(args, tmp_path, fault_at=4, count=tmp_path / "count.txt", fault_errno="ENOSPC")
    path = (tmp_path / "count.txt").read_text().splitlines()[3]
    assert path.endswith("seed1/config.json") and r.returncode == 1, r.stderr[-2000:]
    assert one_error_line(r.stderr).startswith("error: 1 of 2 runs failed")
    failed = next(ln for ln in r.stderr.splitlines() if ln.startswith("FAILED"))
    assert f"error: cannot write {path}: " in failed and "run the same command again): see " in failed, failed
    assert temps(out) == []


def one_error_line(stderr: str) -> str:
    """The command's one error line (its last), checked to be the only one and no traceback
    (tqdm's progress lines may stand before it)."""
    lines = stderr.strip().splitlines()
    assert lines and "Traceback" not in stderr and sum(ln.startswith("error:") for ln in lines) == 1, stderr[-2000:]
    return lines[-1]


def mount(*args) -> str:
    """'' when `mount args` worked, else why not (no root, no CAP_SYS_ADMIN in a container)."""
    try:
        r = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def test_train_on_a_full_disk_then_resumed_with_room_is_the_clean_run(beds, tmp_path):
    """A real full disk (a 400 KiB tmpfs): train stops with one line; remounted larger, the
    resume finishes the run as the uninterrupted one (manifest), no temp file left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    why = mount("-t", "tmpfs", "-o", "size=400k", "tmpfs", disk)
    if why:
        pytest.skip(f"cannot mount a tmpfs here ({why}); test_a_write_that_fails_is_one_line covers it by the hook")
    try:
        args, _, _, _ = stage_bed("train", beds, disk)
        r = run_stage(args, tmp_path)
        line = one_error_line(r.stderr)
        assert r.returncode == 1 and "No space left on device" in line and str(disk) in line, r.stderr[-2000:]
        assert temps(disk) == []
        assert mount("-o", "remount,size=16m", disk) == ""
        r = run_stage(args + ["--init_from=resume"], tmp_path)
        assert r.returncode == 0, r.stderr
        clean = manifest(beds["clean"])
        got = manifest(disk / "run")
        assert got.keys() == clean.keys()
        assert {k: v for k, v in got.items() if k.endswith(".npy") or k.endswith(".npz")} == \
            {k: v for k, v in clean.items() if k.endswith(".npy") or k.endswith(".npz")}
        assert temps(disk) == []
    finally:
        subprocess.run(["umount", disk], capture_output=True)


def test_eval_into_a_read_only_folder_is_one_line(beds, tmp_path):
    """A real read-only folder (a read-only bind mount of the run): eval says so in one line."""
    import shutil
    run, ro = tmp_path / "run", tmp_path / "ro"
    shutil.copytree(beds["clean"], run)
    ro.mkdir()
    why = mount("--bind", run, ro) or mount("-o", "remount,bind,ro", ro)
    if why:
        subprocess.run(["umount", ro], capture_output=True)
        pytest.skip(f"cannot make a read-only bind mount here ({why}); test_a_write_that_fails_is_one_line covers it")
    try:
        r = run_stage([ROOT / "eval.py", f"--out_dir={ro}", *EVAL_ARGS], tmp_path)
        line = one_error_line(r.stderr)
        assert r.returncode == 1 and "Read-only file system" in line and str(ro) in line, r.stderr[-2000:]
    finally:
        subprocess.run(["umount", ro], capture_output=True)
    assert temps(run) == []


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "xpu"])
def test_a_device_torch_lacks_is_one_line(device, beds, tmp_path):
    import torch
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    r = run_stage([ROOT / "eval.py", f"--out_dir={beds['clean']}", f"--device={device}"], tmp_path)
    assert r.returncode == 1 and one_error_line(r.stderr).startswith(f"error: --device={device}: "), r.stderr


def test_a_done_record_clears_its_killed_writers_temp(tmp_path):
    """A rerun that finds every item done never writes its done-record again, so the temp of
    the record's killed write was never removed (attribute's kill at its 54th write)."""
    from prebias.common import DoneRecord
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "done.json").write_text(json.dumps({"settings": {"v": 1}, "done": {"a": 1}}))
    tmp = tmp_path / f".done.json.abcd1234.{int(dead.stdout)}.prebias.tmp"
    tmp.write_text("{}")
    assert DoneRecord(tmp_path / "done.json", {"v": 1}).is_done("a", 1) and temps(tmp_path) == []
