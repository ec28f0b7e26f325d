"""The slurm launcher (prebias/launchers.py, experiment.py --launcher=slurm).

Against a real Slurm (`sudo .ci/slurm-up` starts a one-node one; .ci/run does): a tiny
2-arm x 2-seed experiment, plus an arm whose setting makes train.py fail, runs as one job
array; one job is scancelled once it has a checkpoint; the rerun submits only that run,
which resumes from its checkpoint; the tables equal those of the same experiment run with
--launcher=local. Without a running Slurm those tests skip with the reason, and the same
code path (submission, records, waiting, cuts, requeue, resume, gathering) runs through
submitit's LocalExecutor (--launcher=submitit_local)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import experiment
from conftest import ROOT, experiment_spec
from prebias import launchers
from prebias.common import UserError
from prebias.launchers import Job, LaunchOptions, launch

pytest.importorskip("submitit", reason="the optional extra (pip install -r requirements-extra.txt) is not installed")

TABLES = ("final", "differences", "curves", "saturation", "saturation_runs")
CKPTS = [0, 1, 2, 4, 8, 16, 32, 40, 80]


def slurm_missing() -> str:
    """'' when a Slurm answers here, else why not."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "no Slurm on this machine (apt-get install slurm-wlm munge, then sudo .ci/slurm-up)"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: start a one-node Slurm with sudo .ci/slurm-up"
    if r.returncode or not re.search(r"^(idle|mix|alloc)", r.stdout, re.M):
        why = (r.stderr.strip().splitlines() or [r.stdout.strip() or "no node up"])[-1]
        return f"Slurm is not up (sinfo: {why}): start a one-node Slurm with sudo .ci/slurm-up"
    return ""


@pytest.fixture(scope="module")
def slurm():
    why = slurm_missing()
    if why:
        pytest.skip(why)


def same_table(a: Path, b: Path) -> None:
    """The same rows, keys and counts; the numbers equal to float32 rounding. A Slurm job
    runs with --cpus-per-task threads and a local one with cores // jobs, and a matmul
    sums in another order with another thread count (seen: 1e-7 apart in tag_secret_gap)."""
    x, y = pd.read_csv(a, keep_default_na=False), pd.read_csv(b, keep_default_na=False)
    assert list(x.columns) == list(y.columns) and len(x) == len(y), a
    for c in x.columns:
        u, v = pd.to_numeric(x[c], errors="coerce"), pd.to_numeric(y[c], errors="coerce")
        if c == "values":  # each run's value, space-joined, 6 digits
            u = np.array([float(w) for r in x[c] for w in str(r).split()])
            v = np.array([float(w) for r in y[c] for w in str(r).split()])
            np.testing.assert_allclose(u, v, rtol=1e-4, err_msg=f"{a.name}:{c}")
        elif u.isna().all():  # text columns: exact
            assert x[c].tolist() == y[c].tolist(), (a.name, c)
        else:
            assert (u.isna() == v.isna()).all(), (a.name, c)
            np.testing.assert_allclose(u[u.notna()], v[v.notna()], rtol=1e-5, atol=1e-6, err_msg=f"{a.name}:{c}")


def records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / launchers.RECORD).read_text().splitlines()]


# -----------------------------------------------------------------------------
# the launcher's path through submitit's LocalExecutor (runs everywhere)

COUNTER = """
import os, sys, time
from pathlib import Path
out, n, delay = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
Path(str(out) + ".pid").write_text(f"{os.getpid()} {os.getppid()}")
done = out.read_text().split() if out.exists() else []
if done and "--resume" not in sys.argv:  # like train.py: a folder with steps is only resumed
    sys.exit(f"error: {out} has {len(done)} steps already: use --resume")
for i in range(len(done), n):
    with open(out, "a") as f:
        f.write(f"{i}\\n")
    time.sleep(delay)
print("counted to", n)
"""


def counter_job(tmp_path, name, n, delay, after="print('after')"):
    """A job whose first stage counts steps into a file (a stand-in for train.py: slow,
    resumable with --resume), then a second stage."""
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    d = tmp_path / "runs" / name
    count = [sys.executable, str(script), str(d / "steps.txt"), str(n)]
    return Job(name, d, [("count", count + [str(delay)]), ("after", [sys.executable, "-c", after])],
               resume={"count": count + ["0", "--resume"]})


def failing_job(tmp_path):
    return Job("bad", tmp_path / "runs" / "bad", [("check", [sys.executable, "-c",
                                                              "import sys; print('a bad line'); sys.exit(3)"])])


def wait_for(path: Path, lines: int, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().split()) >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {lines} lines")


def steps(job: Job) -> list[int]:
    return [int(x) for x in (job.dir / "steps.txt").read_text().split()]


def test_local_executor_failure_cut_and_rerun(tmp_path):
    """A job that finishes, one that fails (its log line), one cut (its process killed);
    the rerun skips the finished one, tries the failed one again, resumes the cut one."""
    ok = counter_job(tmp_path, "ok", 3, 0)
    bad = failing_job(tmp_path)
    cut = counter_job(tmp_path, "cut", 200, 0.05)
    opts = LaunchOptions(jobs=3, slurm_poll=0.1, name="t")

    def kill_when_counting():
        wait_for(cut.dir / "steps.txt", 5)
        os.kill(int((cut.dir / "steps.txt.pid").read_text().split()[0]), signal.SIGTERM)
    threading.Thread(target=kill_when_counting, daemon=True).start()
    res = launch([ok, bad, cut], "submitit_local", opts)
    assert res["ok"] is None
    assert re.fullmatch(r"check failed \(exit 3; a bad line\): see .*/bad/experiment.log", res["bad"])
    assert "was cut before it finished" in res["cut"] and "a rerun resumes it" in res["cut"], res["cut"]
    assert 5 <= len(steps(cut)) < 200
    rec = records(ok.dir)[0]
    assert Path(rec["stdout"]).exists() and Path(rec["stderr"]).exists() and rec["launcher"] == "submitit_local"

    # the rerun, planned as experiment.py plans it: the cut job's first stage now resumes
    cut2 = Job(cut.name, cut.dir, [("count", cut.resume["count"])] + cut.stages[1:], resume=cut.resume)
    res2 = launch([ok, bad, cut2], "submitit_local", opts)
    assert res2 == {"ok": None, "bad": res["bad"], "cut": None}
    assert steps(cut) == list(range(200))  # each step once: resumed, not restarted
    assert [len(records(j.dir)) for j in (ok, bad, cut)] == [1, 2, 2]


def test_local_executor_requeue_continues_the_cut_stage(tmp_path):
    """Slurm's warning signal before a time limit or a preemption (USR2): submitit
    requeues the same task, which skips nothing it has not done and goes on with the cut
    stage's resume command; one submission, one result."""
    job = counter_job(tmp_path, "requeued", 200, 0.05)

    def warn():
        wait_for(job.dir / "steps.txt", 5)
        worker = int((job.dir / "steps.txt.pid").read_text().split()[1])  # the submitit task running the stage
        os.kill(worker, signal.SIGUSR2)
    threading.Thread(target=warn, daemon=True).start()
    res = launch([job], "submitit_local", LaunchOptions(slurm_poll=0.1, name="t"))
    assert res == {"requeued": None}
    assert steps(job) == list(range(200))
    log = (job.dir / "experiment.log").read_text()
    assert log.count("--resume") == 1 and log.index("--resume") < log.index("print('after')")
    prog = json.loads((job.dir / launchers.PROGRESS).read_text())
    assert prog["finished"] and prog["done"] == ["count", "after"] and len(records(job.dir)) == 1


def test_local_executor_rerun_waits_for_its_running_job(tmp_path):
    """A job still running from an earlier launch (--detach, or a waiting command that was
    stopped) is waited for, never submitted a second time on its folder."""
    job = counter_job(tmp_path, "long", 40, 0.05)
    opts = LaunchOptions(slurm_poll=0.1, name="t")
    assert launch([job], "submitit_local", LaunchOptions(slurm_poll=0.1, name="t", detach=True)) == {"long": None}
    wait_for(job.dir / "steps.txt", 2)
    lines = []
    assert launch([job], "submitit_local", opts, say=lines.append) == {"long": None}
    assert any(re.fullmatch(r"long: its submitit_local job \d+ is RUNNING: waiting for it, not submitting another", x)
               for x in lines), lines
    assert len(records(job.dir)) == 1 and steps(job) == list(range(40))


def test_experiment_detach_then_gather(tiny_experiment, tmp_path):
    """--detach=True returns while the jobs run; --aggregate_only=True with the launcher
    waits for them and aggregates; the finished runs are not submitted again. (The runs
    are copies of the tiny experiment's, so only eval and durability run, and skip.)"""
    out_root = tmp_path / "out"
    shutil.copytree(tiny_experiment.dir, out_root / "tiny", symlinks=True)
    args = [str(tiny_experiment.spec), f"--out_root={out_root}", "--launcher=submitit_local", "--jobs=2",
            "--slurm_poll=0.2"]
    assert experiment.main(args + ["--detach=True"]) == {}
    runs = [out_root / "tiny" / a / f"seed{s}" for a in ("shuffle", "curriculum") for s in (1, 2)]
    assert all(len(records(d)) == 1 for d in runs)
    prog = [json.loads((d / launchers.PROGRESS).read_text()) if (d / launchers.PROGRESS).exists() else {}
            for d in runs]
    assert not all(p.get("finished") for p in prog)  # returned before the jobs were done
    experiment.main(args + ["--aggregate_only=True"])
    for t in TABLES:
        assert (out_root / "tiny" / "tables" / f"{t}.csv").read_bytes() == \
            (tiny_experiment.dir / "tables" / f"{t}.csv").read_bytes(), t
    assert all(json.loads((d / launchers.PROGRESS).read_text())["finished"] for d in runs)
    experiment.main(args)  # everything finished by a submitit job: nothing submitted
    assert all(len(records(d)) == 1 for d in runs)


# -----------------------------------------------------------------------------
# the flags: one line each, before anything runs

@pytest.mark.parametrize("flags, words", [
    (["--launcher=pbs"], "--launcher=pbs: choose one of local, slurm"),
    (["--detach=True"], "--detach=True needs --launcher=slurm"),
    (["--launcher=slurm", "--slurm_time=soon"], "--slurm_time=soon: give a Slurm time limit"),
    (["--launcher=slurm", "--slurm_mem=lots"], "--slurm_mem=lots: give a size"),
    (["--launcher=slurm", "--slurm_extra=--partition=gpu"], "--slurm_extra sets --partition: use --slurm_partition"),
    (["--launcher=slurm", "--slurm_extra=account=lab"], "'account=lab' is not a long sbatch option"),
    (["--launcher=slurm", "--torchrun=2", "--slurm_gpus_per_job=1"], "--torchrun=2 needs as many GPUs per job"),
    (["--launcher=slurm", "--slurm_cpus_per_job=0"], "cpus must be >= 1"),
])
def test_bad_launcher_flags_one_line(tiny_data, tmp_path, flags, words):
    spec = experiment_spec(tiny_data, tmp_path / "x.json")
    with pytest.raises(UserError, match=re.escape(words)) as e:
        experiment.main([str(spec), f"--out_root={tmp_path / 'out'}"] + flags)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_time_and_extra_options():
    assert [launchers.slurm_minutes(t) for t in ("30", "1:30", "4:00:00", "1-12", "2-00:00:00", "0:0:1")] == \
        [30, 2, 240, 2160, 2880, 1]
    assert launchers.sbatch_extra("--account=lab --qos='a b' --exclusive") == \
        {"account": "lab", "qos": "a b", "exclusive": True}
    cfg = experiment.ExperimentConfig(jobs=3, torchrun=2, slurm_gpus_per_job=2, slurm_mem="8G")
    o = launchers.options_from(cfg, name="x")
    assert (o.jobs, o.gpus_per_job, o.slurm_gpus_per_job, o.slurm_mem, o.name) == (3, 2, 2, "8G", "x")


def test_without_submitit_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserError, match=r"needs submitit: pip install -r requirements-extra.txt"):
        launch([Job("a", tmp_path / "a", [])], "slurm")


def test_wandb_dir_is_honoured(tmp_path, monkeypatch):
    """On a cluster WANDB_DIR points at scratch space: the run's files go there."""
    wandb = pytest.importorskip("wandb", reason="the optional extra (requirements-extra.txt) is not installed")
    from prebias import tracking
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path / "scratch"))):
        monkeypatch.setenv(k, v)
    (tmp_path / "scratch").mkdir()
    wandb.teardown()  # settings an earlier test's wandb.init left in this process (wandb keeps them)
    run = tracking.start(project="p", dir=tmp_path / "run", config={"a": 1})
    run.finish()
    assert list((tmp_path / "scratch" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (tmp_path / "run" / "wandb").exists()


# -----------------------------------------------------------------------------
# a real Slurm

class QueueWatch(threading.Thread):
    """Everything squeue shows while the experiment runs: {job id: set of states}."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.stop = {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            r = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T|%j"], capture_output=True,
                               text=True)
            for line in r.stdout.split():
                i, st, name = line.split("|")
                self.seen.setdefault(i, set()).add((st, name))
            self.stop.wait(0.2)


@pytest.fixture(scope="module")
def slurm_experiment(slurm, tiny_data, tmp_path_factory):
    """The tiny experiment plus a 'broken' arm (a tag file that is not there: train.py
    refuses it; the spec check before any run reads no tag file) as one
    Slurm job array, 2 at once; curriculum/seed2's job is scancelled once it has ckpt_8.
    Then the 2-arm spec again (the tiny experiment's own): only the cut run is submitted."""
    root = tmp_path_factory.mktemp("slurm")
    spec = experiment_spec(tiny_data, root / "tiny.json")
    arms = json.loads(spec.read_text())["arms"]
    spec3 = experiment_spec(tiny_data, root / "tiny3.json", arms={**arms, "broken": {"tags": str(root / "missing_tags.json")}})
    exp = root / "out" / "tiny"
    cmd = [sys.executable, str(ROOT / "experiment.py"), f"--out_root={root / 'out'}", "--name=tiny",
           "--launcher=slurm", "--slurm_poll=0.5", "--slurm_max_parallel=2", "--slurm_time=20"]
    watch = QueueWatch()
    watch.start()
    cut_dir, cancelled = exp / "curriculum" / "seed2", []

    def cancel():
        wait_for_file(cut_dir / "ckpt" / "ckpt_8.pt")
        cancelled.append(records(cut_dir)[-1]["job_id"])
        subprocess.run(["scancel", cancelled[0]], check=True)
    threading.Thread(target=cancel, daemon=True).start()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd + [str(spec3)], capture_output=True, text=True, cwd=root, env=env, timeout=900)
    second = subprocess.run(cmd + [str(spec)], capture_output=True, text=True, cwd=root, env=env, timeout=900)
    watch.stop.set()
    return dict(root=root, dir=exp, first=first, second=second, seen=watch.seen, cancelled=cancelled)


def wait_for_file(p: Path, timeout=600):
    t0 = time.time()
    while not p.exists() and time.time() - t0 < timeout:
        time.sleep(0.05)


def good_runs(x):
    return [x["dir"] / a / f"seed{s}" for a in ("shuffle", "curriculum") for s in (1, 2)]


@pytest.mark.slow  # 4 training runs as Slurm jobs
def test_slurm_experiment_end_to_end(slurm_experiment, tiny_experiment):
    x = slurm_experiment
    assert x["second"].returncode == 0, x["second"].stdout + x["second"].stderr
    for d in good_runs(x):
        ck = sorted(int(p.stem.split("_")[1]) for p in (d / "ckpt").glob("ckpt_*.pt"))
        assert ck == CKPTS, d
        for rec in records(d):  # each job's id and its stdout/stderr, in the run folder
            assert rec["job_id"] in x["seen"] and ("RUNNING", "tiny") in x["seen"][rec["job_id"]], rec
            assert Path(rec["stdout"]).exists() and Path(rec["stderr"]).exists()
    # same seeds, same numbers as the same experiment run with --launcher=local
    for t in TABLES:
        same_table(x["dir"] / "tables" / f"{t}.csv", tiny_experiment.dir / "tables" / f"{t}.csv")
    cols = ["arm", "seed", "final_iter", "commit"]
    assert pd.read_csv(x["dir"] / "tables" / "runs.csv")[cols].equals(
        pd.read_csv(tiny_experiment.dir / "tables" / "runs.csv")[cols])
    scripts = [p.read_text() for p in (x["dir"] / "slurm").glob("*_submission.sh")]
    assert sum("--array=0-5%2" in s for s in scripts) == 1, scripts  # the first submission: 6 runs, 2 at once
    for line in ("--cpus-per-task=1", "--time=20", "--job-name=tiny", "export PYTHONPATH="):
        assert all(line in s for s in scripts), line


@pytest.mark.slow  # 4 training runs as Slurm jobs
def test_slurm_cancelled_run_resumes_alone(slurm_experiment):
    x = slurm_experiment
    d = x["dir"] / "curriculum" / "seed2"
    first, second = x["first"].stdout + x["first"].stderr, x["second"].stdout
    assert x["cancelled"] and re.search(rf"FAILED curriculum/seed2: slurm job {x['cancelled'][0]} was cut before it "
                                        r"finished \(CANCELLED: .*\*\*\* JOB \d+ ON \S+ CANCELLED AT", first), first
    # the rerun submits only the cut run, which resumes from its own checkpoint
    assert re.findall(r"^(\S+): slurm job \S+ \(stdout", second, re.M) == ["curriculum/seed2"], second
    for run in ("shuffle/seed1", "shuffle/seed2", "curriculum/seed1"):
        assert f"{run}: finished by slurm job" in second
    m = re.search(r"curriculum/seed2: resume from step (\d+)", second)
    assert m and int(m.group(1)) >= 8, second
    assert [len(records(r)) for r in good_runs(x)] == [1, 1, 1, 2]
    events = [json.loads(line)["event"] for line in (d / "history.jsonl").read_text().splitlines()]
    assert events == ["start", "resume"]
    # its batches are exactly its schedule's, step by step
    import types

    from prebias.checkpoint import run_config
    from prebias.data import BatchData
    from prebias.stream import build_schedule
    cfg = types.SimpleNamespace(**run_config(d))
    sched = build_schedule(cfg, BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len))
    assert np.array_equal(np.load(d / "batch_ids.npy"), np.stack([sched.step_ids(s) for s in range(80)]))


@pytest.mark.slow  # 4 training runs as Slurm jobs
def test_slurm_failing_arm_is_reported_the_others_finish(slurm_experiment):
    x = slurm_experiment
    out = x["first"].stdout + x["first"].stderr
    assert x["first"].returncode == 1
    for s in (1, 2):
        assert re.search(rf"FAILED broken/seed{s}: train failed \(exit 1; error: \S*missing_tags.json is missing .*\): see "
                         rf"\S*broken/seed{s}/experiment.log", out), out
    assert "error: 3 of 6 runs failed" in out
    for d in good_runs(x)[:3]:  # finished in the first submission, alongside the failures
        prog = json.loads((d / launchers.PROGRESS).read_text())
        assert prog["finished"] and prog["token"] == records(d)[0]["token"]


def test_slurm_detach_and_gather(slurm, tmp_path):
    """--detach submits and returns; gather() finds the jobs by their records, waits for
    them, and reports a failure by its log line."""
    ok = counter_job(tmp_path, "ok", 20, 0.05)
    bad = failing_job(tmp_path)
    opts = LaunchOptions(slurm_poll=0.2, name="t", detach=True, slurm_time="5")
    assert launch([ok, bad], "slurm", opts) == {"ok": None, "bad": None}
    assert not launchers.read_progress(ok.dir).get("finished")  # returned before the end
    res = launchers.gather([Job("ok", ok.dir), Job("bad", bad.dir)], "slurm", opts)
    assert res["ok"] is None and re.fullmatch(r"check failed \(exit 3; a bad line\): see .*", res["bad"])
    assert steps(ok) == list(range(20))


def test_slurm_job_environment_and_refusal(slurm, tmp_path, monkeypatch):
    """A job sees the caller's environment (sbatch passes it on) and OMP_NUM_THREADS =
    --slurm_cpus_per_job when the caller set none; sbatch's refusal is one line."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "from-the-caller")
    show = "import os; print('env', os.environ.get('OMP_NUM_THREADS'), os.environ.get('WANDB_PROJECT'))"
    job = Job("env", tmp_path / "env", [("show", [sys.executable, "-c", show])])
    assert launch([job], "slurm", LaunchOptions(slurm_poll=0.2, name="t", slurm_time="5")) == {"env": None}
    assert "\nenv 1 from-the-caller\n" in (job.dir / "experiment.log").read_text()
    with pytest.raises(UserError, match=r"slurm: the jobs were not submitted \(sbatch: error: .*Invalid partition name") as e:
        launch([Job("p", tmp_path / "p", [])], "slurm", LaunchOptions(slurm_partition="nope", name="t"))
    assert "\n" not in str(e.value)


def test_same_table_allows_float32_rounding_only(tmp_path):
    """The Slurm/local comparison: 1e-7 apart passes (thread counts), 1e-3 or a text change fails."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("arm,metric,n,mean,values\nx,val_loss,2,1.2345678,1.23457 1.23456\n")
    b.write_text("arm,metric,n,mean,values\nx,val_loss,2,1.2345679,1.23457 1.23456\n")
    same_table(a, b)
    for changed in ("x,val_loss,2,1.2355678,1.23457 1.23456", "y,val_loss,2,1.2345678,1.23457 1.23456",
                    "x,val_loss,2,1.2345678,1.23457 1.33456"):
        b.write_text(f"arm,metric,n,mean,values\n{changed}\n")
        with pytest.raises(AssertionError):
            same_table(a, b)
