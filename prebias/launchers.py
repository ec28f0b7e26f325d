"""
Launchers: how a batch of independent jobs runs (an experiment's arm x seed runs, the
retrains of attribution). A job is a folder and a list of stages, each one command,
run in order; a failing stage ends its job and is reported with the last line of its
log, the other jobs go on. One registered unit per launcher:

    local           N jobs at once as processes on this machine: on CPU the cores are
                    split between them (OMP_NUM_THREADS), with GPUs each job gets its own
                    (CUDA_VISIBLE_DEVICES; --torchrun=K: K each)
    slurm           every job one Slurm job, all of them one job array, through submitit
                    (pip install -r requirements-extra.txt): --slurm_* set what each job
                    asks for; a job cut by its time limit or a preemption is requeued and
                    goes on from its stage (the stage's resume command); --detach=True
                    submits and returns, gather() waits for them later
    submitit_local  the slurm launcher's path with submitit's LocalExecutor (processes
                    here, --jobs at a time): to try it where there is no Slurm

Every job appends its commands and their output to <dir>/<log> (experiment.log by
default), so a run folder says how it was made. Under slurm it also keeps
slurm_jobs.jsonl (one line per submission: job id, stdout and stderr paths) and
slurm_progress.json (the stages its job finished); submitit's own files (sbatch script,
pickles, logs) go to LaunchOptions.folder, by default <the jobs' common folder>/slurm/.

$ python -c "from prebias.launchers import LAUNCHERS; print(list(LAUNCHERS))"
"""

import dataclasses
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prebias.common import ROOT, Registry, UserError, write_json_atomic
from prebias.inputs import read_json

LAUNCHERS = Registry("launcher")  # name -> fn(jobs, opts, say) -> {job name: None | why it failed}


@dataclass
class Job:
    name: str  # e.g. "curriculum/seed1": how messages and failures name it
    dir: Path  # its folder: the log (and the launcher's records) go here
    stages: list = field(default_factory=list)  # [(stage name, argv list)], run in order
    log: str = "experiment.log"
    resume: dict = field(default_factory=dict)  # stage name -> argv that continues it after a cut (slurm requeue)


@dataclass
class LaunchOptions:
    jobs: int = 1  # jobs at once (local, submitit_local)
    gpus_per_job: int = 1  # GPUs a job takes where there are GPUs (torchrun's processes)
    detach: bool = False  # slurm: submit and return at once; gather() waits for the jobs later
    name: str = "prebias"  # the Slurm job name (experiment.py: the experiment's name)
    folder: str = ""  # submitit's files; '' = <the jobs' common folder>/slurm
    slurm_partition: str = ""  # '' = the cluster's default partition
    slurm_time: str = "4:00:00"  # each job's time limit (Slurm's formats: MM, HH:MM:SS, D-HH:MM...)
    slurm_gpus_per_job: int = 0  # GPUs per job (--gpus-per-node); 0 = a CPU job
    slurm_cpus_per_job: int = 1  # CPU cores per job (--cpus-per-task; OMP_NUM_THREADS when unset)
    slurm_mem: str = ""  # memory per job, e.g. 32G (--mem); '' = the partition's default
    slurm_max_parallel: int = 0  # jobs running at once (the array's %N); 0 = no limit
    slurm_extra: str = ""  # more sbatch options, e.g. "--account=lab --qos=normal --constraint=a100"
    slurm_poll: float = 30.0  # seconds between two looks at the queue (squeue) while waiting


OPTION_FIELDS = ("jobs", "detach") + tuple(f.name for f in dataclasses.fields(LaunchOptions)
                                           if f.name.startswith("slurm_"))


def options_from(cfg, **over) -> LaunchOptions:
    """LaunchOptions from any config that has jobs (and torchrun, detach, slurm_*)
    fields, checked before anything runs: how experiment.py and attribute.py hand their
    launcher flags over, as launch(jobs, cfg.launcher, options_from(cfg))."""
    kw = {k: getattr(cfg, k) for k in OPTION_FIELDS if hasattr(cfg, k)}
    torchrun = int(getattr(cfg, "torchrun", 0) or 0)
    opts = LaunchOptions(**{"gpus_per_job": max(1, torchrun), **kw, **over})
    if opts.slurm_gpus_per_job and torchrun > opts.slurm_gpus_per_job:
        raise UserError(f"--torchrun={torchrun} needs as many GPUs per job: --slurm_gpus_per_job="
                        f"{opts.slurm_gpus_per_job}")
    for k in ("slurm_gpus_per_job", "slurm_max_parallel"):
        if getattr(opts, k) < 0:
            raise UserError(f"--{k}={getattr(opts, k)}: must be >= 0")
    if opts.slurm_cpus_per_job < 1 or opts.slurm_poll <= 0:
        raise UserError(f"--slurm_cpus_per_job={opts.slurm_cpus_per_job} --slurm_poll={opts.slurm_poll}: cpus "
                        "must be >= 1, poll > 0 seconds")
    if opts.slurm_mem and not re.fullmatch(r"\d+[KMGTkmgt]?", opts.slurm_mem):
        raise UserError(f"--slurm_mem={opts.slurm_mem}: give a size as Slurm's --mem takes it, e.g. 32G or 500M")
    slurm_minutes(opts.slurm_time)
    sbatch_extra(opts.slurm_extra)
    return opts


def slurm_minutes(t: str) -> int:
    """A Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(t).strip())
    if not m:
        raise UserError(f"--slurm_time={t}: give a Slurm time limit, e.g. 30 (minutes), 4:00:00 or 2-00:00:00")
    d, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1):  # D-H[:M[:S]]
        secs = d * 86400 + a * 3600 + b * 60 + c
    elif m.group(4):  # H:M:S
        secs = a * 3600 + b * 60 + c
    else:  # M[:S]
        secs = a * 60 + b
    return max(1, math.ceil(secs / 60))


RESERVED_SBATCH = {"partition": "use --slurm_partition", "time": "use --slurm_time", "t": "use --slurm_time",
                   "mem": "use --slurm_mem", "cpus-per-task": "use --slurm_cpus_per_job",
                   "c": "use --slurm_cpus_per_job", "gpus-per-node": "use --slurm_gpus_per_job",
                   "array": "use --slurm_max_parallel", "output": "submitit names the job's logs",
                   "error": "submitit names the job's logs", "job-name": "it is the experiment's name",
                   "signal": "submitit's USR2 before the time limit is what requeues a cut job"}


def sbatch_extra(extra: str) -> dict:
    """--slurm_extra's sbatch options as submitit's additional_parameters {key: value | True}."""
    out = {}
    for tok in shlex.split(extra or ""):
        key, eq, val = tok[2:].partition("=")
        if not tok.startswith("--") or not key:
            raise UserError(f"--slurm_extra: {tok!r} is not a long sbatch option; give them as --key=value, "
                            "e.g. --slurm_extra='--account=lab --qos=normal'")
        if key in RESERVED_SBATCH:
            raise UserError(f"--slurm_extra sets --{key}: {RESERVED_SBATCH[key]}")
        out[key] = val if eq else True
    return out


def run_stages(job: Job, env: dict, say=print) -> str | None:
    """Run a job's stages in order, appending to its log; None when all went well, else
    the failing stage and the last line of its log."""
    job.dir.mkdir(parents=True, exist_ok=True)
    for stage, cmd in job.stages:
        why = run_stage(job, stage, cmd, env, say)
        if why:
            return why
    return None


def run_stage(job: Job, stage: str, cmd: list, env: dict, say=print) -> str | None:
    """One stage: its command and output appended to the job's log; None, or why it failed."""
    rc = run_command(job, stage, cmd, env, say)
    return failure(stage, rc, job.dir / job.log) if rc else None


def run_command(job: Job, stage: str, cmd: list, env: dict, say=print) -> int:
    log_path = job.dir / job.log
    say(f"{job.name}: {stage} ...")
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        log.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.getcwd()).returncode
    if rc == 0:
        say(f"{job.name}: {stage} done in {time.time() - t0:.0f} s")
    return rc


def failure(stage: str, rc, log_path: Path) -> str:
    """Why a stage failed, on one line: its own error line whole (it names the file and the
    fix), or the start of whatever it printed last (a traceback's last line)."""
    tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
    last = (tail[0] if tail[0].startswith("error:") else tail[0][:200]) if tail else "no output"
    return f"{stage} failed (exit {rc}; {last}): see {log_path}"


def launch(jobs: list[Job], launcher: str = "local", opts: LaunchOptions | None = None, say=None) -> dict:
    """Run every job with the named launcher; {job name: None | why it failed}."""
    lock = threading.Lock()

    def said(msg):
        with lock:
            print(msg, flush=True)
    return LAUNCHERS.lookup(launcher, "--launcher")(jobs, opts or LaunchOptions(), say or said)


def gather(jobs: list[Job], launcher: str = "local", opts: LaunchOptions | None = None, say=print) -> dict:
    """Wait for the jobs that an earlier launch left running (--detach=True, or a waiting
    experiment that was stopped) and say how each ended: {job name: None | why}, for the
    jobs that launcher has a record of (none for local: its jobs end with it)."""
    fn = getattr(LAUNCHERS.lookup(launcher, "--launcher"), "gather", None)
    return fn(jobs, opts or LaunchOptions(), say) if fn else {}


def raise_failures(results: dict, what: str = "runs"):
    """Print each failure; one UserError line when any job failed."""
    failed = [(name, why) for name, why in results.items() if why]
    for name, why in failed:
        print(f"FAILED {name}: {why}", file=sys.stderr)
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} {what} failed (listed above); fix and rerun: finished "
                        "ones are skipped")


# -----------------------------------------------------------------------------
# local: processes on this machine

class Slots:
    """Which device slot a job takes: GPUs (CUDA_VISIBLE_DEVICES), or a share of the CPU
    cores (OMP_NUM_THREADS, unless the caller set one, as on Slurm: two experiments side by
    side, each told OMP_NUM_THREADS=1, ran each run on every core: 4 threads on 2 cores, a crash
    sweep's kill and rerun 2-7 min instead of ~45 s)."""

    def __init__(self, jobs: int, per: int):
        import torch
        self.n_gpus = torch.cuda.device_count()
        self.per = max(1, per)
        self.free = queue.Queue()
        for i in range(jobs):
            self.free.put(i)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    def env(self, slot: int) -> dict:
        env = dict(os.environ)
        if self.n_gpus:
            first = (slot * self.per) % self.n_gpus
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + j) % self.n_gpus) for j in range(self.per))
        elif "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


@LAUNCHERS.register("local")
def local(jobs: list[Job], opts: LaunchOptions, say) -> dict:
    slots = Slots(opts.jobs, opts.gpus_per_job)

    def one(job):
        slot = slots.free.get()
        try:
            return job.name, run_stages(job, slots.env(slot), say)
        finally:
            slots.free.put(slot)
    with ThreadPoolExecutor(max(1, opts.jobs)) as pool:
        return dict(pool.map(one, jobs))


# -----------------------------------------------------------------------------
# slurm (and submitit_local): every job one submitit job

RECORD = "slurm_jobs.jsonl"  # a job's folder: one line per submission (job id, stdout, stderr, ...)
PROGRESS = "slurm_progress.json"  # a job's folder: the stages its Slurm job finished (written by that job)
MAX_REQUEUES = 10  # a job cut by its time limit is requeued up to this many times (preemptions: always)
# the states in which a job will not run again (squeue's; FINISHED, INTERRUPTED, ENDED: submitit_local's)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "FINISHED", "INTERRUPTED", "ENDED"}


def read_progress(job_dir) -> dict:
    """The job folder's PROGRESS record; {} before its Slurm job first starts."""
    return read_json(Path(job_dir) / PROGRESS, "a Slurm job's progress record (the job writes it)",
                     "delete it to run the job's stages again", missing={})


def need_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher=slurm needs submitit: pip install -r requirements-extra.txt") from None
    return submitit


class SlurmTask:
    """What one submitit job runs: its Job's stages in order, as run_stages does. A job
    cut by its time limit or a preemption is requeued with this same task (submitit calls
    checkpoint() on Slurm's warning signal; Slurm's own requeue starts it as it was); it
    then skips the stages it finished (PROGRESS) and runs the one it was cut in with that
    stage's resume command (train.py --init_from=resume)."""

    def __init__(self, job: Job):
        self.job, self.token = job, uuid.uuid4().hex  # the token tells a restart from a new submission

    def __call__(self) -> str | None:
        job, path = self.job, self.job.dir / PROGRESS
        job.dir.mkdir(parents=True, exist_ok=True)
        prog = read_progress(job.dir)
        if prog.get("token") != self.token:  # the first start of this submission
            prog = {"token": self.token, "stages": [[s, [str(c) for c in cmd]] for s, cmd in job.stages],
                    "done": [], "running": None, "finished": False}
        env = dict(os.environ)  # the caller's (sbatch passes it on) and Slurm's (CUDA_VISIBLE_DEVICES, ...)
        if "OMP_NUM_THREADS" not in env and "SLURM_CPUS_PER_TASK" in env:
            env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
        for stage, cmd in job.stages:
            if stage in prog["done"]:
                continue
            if prog["running"] == stage:
                cmd = job.resume.get(stage, cmd)
                print(f"{job.name}: {stage} was cut: continuing it", flush=True)
            prog["running"] = stage
            write_json_atomic(path, prog)
            rc = run_command(job, stage, cmd, env, lambda m: print(m, flush=True))
            if rc < 0:  # killed by a signal: Slurm cancelled, timed out or preempted the job. No result:
                # the queue's state says how it ended, and a requeued job must not look finished
                print(f"{job.name}: {stage} was killed by {signal_name(-rc)}", file=sys.stderr, flush=True)
                sys.exit(1)
            if rc:
                return failure(stage, rc, job.dir / job.log)
            prog["done"].append(stage)
            prog["running"] = None
            write_json_atomic(path, prog)
        prog["finished"] = True
        write_json_atomic(path, prog)
        return None

    def checkpoint(self):
        """submitit's hook on a time limit or a preemption: requeue this same task."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def finished_before(job: Job) -> bool:
    """Every stage of the job, with this very command, was finished by an earlier Slurm job
    in its folder (a run trained and evaluated there is not submitted again)."""
    prog = read_progress(job.dir)
    done = {s: cmd for s, cmd in prog.get("stages", [])} if prog.get("finished") else {}
    return bool(done) and all(done.get(s) == [str(c) for c in cmd] for s, cmd in job.stages)


def last_record(job: Job) -> dict:
    try:
        lines = (job.dir / RECORD).read_text().strip().splitlines()
    except OSError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def pythonpath_line() -> str:
    """The job imports prebias (to unpickle its task) wherever the caller ran from."""
    return f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"


class SlurmQueue:
    """sbatch through submitit's SlurmExecutor; the jobs' states from squeue (which needs
    no accounting database, unlike submitit's own sacct watcher)."""
    name, limit = "slurm", None  # the array's %N limits the jobs at once, on the cluster

    def __init__(self, opts: LaunchOptions):
        self.submitit = need_submitit()

    def executor(self, folder: Path, opts: LaunchOptions, n: int):
        try:
            ex = self.submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        except RuntimeError:
            raise UserError("--launcher=slurm: no Slurm here (no srun on PATH): run it on the cluster's login "
                            "node, or start a one-node Slurm on this machine with sudo .ci/slurm-up") from None
        params = dict(job_name=opts.name, time=slurm_minutes(opts.slurm_time), cpus_per_task=opts.slurm_cpus_per_job,
                      array_parallelism=opts.slurm_max_parallel or max(1, n), setup=[pythonpath_line()],
                      additional_parameters=sbatch_extra(opts.slurm_extra))
        for key, val in (("partition", opts.slurm_partition), ("gpus_per_node", opts.slurm_gpus_per_job),
                         ("mem", opts.slurm_mem)):
            if val:
                params[key] = val
        ex.update_parameters(**params)
        return ex

    def states(self, subs) -> dict | None:
        """{job id: its state, None once it left the queue}; None when squeue did not answer."""
        try:
            r = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T"], capture_output=True,
                               text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = str(e)
            return None
        if r.returncode:
            self.error = (r.stderr.strip().splitlines() or ["no message"])[-1]
            return None
        seen = dict(line.split("|", 1) for line in r.stdout.split() if "|" in line)
        return {s.job_id: seen.get(s.job_id) for s in subs}

    def reattach(self, rec: dict):
        return self.submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])


class LocalQueue(SlurmQueue):
    """The same path with submitit's LocalExecutor: processes on this machine, at most
    --slurm_max_parallel (or --jobs) at once (it would start them all at once by itself)."""
    name = "submitit_local"

    def __init__(self, opts: LaunchOptions):
        self.submitit = need_submitit()
        self.limit = opts.slurm_max_parallel or opts.jobs

    def executor(self, folder: Path, opts: LaunchOptions, n: int):
        ex = self.submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        ex.update_parameters(timeout_min=slurm_minutes(opts.slurm_time), gpus_per_node=opts.slurm_gpus_per_job,
                             setup=[pythonpath_line()])
        return ex

    def states(self, subs) -> dict:
        out = {}
        for s in subs:
            st = s.state  # RUNNING, FINISHED, INTERRUPTED; another session's job: no process to ask
            if st.startswith("NO PROCESS"):
                st = "RUNNING" if pid_alive(int(s.job_id)) else "ENDED"
            out[s.job_id] = st
        return out

    def reattach(self, rec: dict):
        return self.submitit.LocalJob(folder=rec["folder"], job_id=rec["job_id"])


def pid_alive(pid: int) -> bool:
    """A process that has not ended (a zombie, ended but not yet reaped, has)."""
    if not Path("/proc/self/stat").exists():  # no procfs (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
    except IndexError:
        return True


@dataclass
class Submitted:
    job: Job
    sub: object  # the submitit job
    rec: dict  # its line in RECORD
    state: str | None = "SUBMITTED"
    ended_at: float = 0.0  # when the queue first showed it ended (0: it has not)


def submit(todo: list[Job], q, opts: LaunchOptions, folder: Path, say) -> list[Submitted]:
    """One submitit job per Job (an array when several), each recorded in its folder."""
    if not todo:
        return []
    ex = q.executor(folder, opts, len(todo))
    tasks = [SlurmTask(j) for j in todo]
    try:
        with ex.batch():
            subs = [ex.submit(t) for t in tasks]
    except Exception as e:  # sbatch refused (a bad partition, a time over the limit...): in its own words
        lines = [x for x in str(e).splitlines() if "error" in x.lower()] or str(e).splitlines() or [type(e).__name__]
        raise UserError(f"{q.name}: the jobs were not submitted ({lines[-1].strip()[:300]}): check the --slurm_* "
                        "flags") from None
    out = []
    for j, t, s in zip(todo, tasks, subs):
        rec = {"job_id": s.job_id, "launcher": q.name, "name": opts.name, "folder": str(folder),
               "stdout": str(s.paths.stdout), "stderr": str(s.paths.stderr), "token": t.token,
               "stages": [st for st, _ in j.stages], "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        j.dir.mkdir(parents=True, exist_ok=True)
        with open(j.dir / RECORD, "a") as f:
            f.write(json.dumps(rec) + "\n")
        say(f"{j.name}: {q.name} job {s.job_id} (stdout {s.paths.stdout})")
        out.append(Submitted(j, s, rec))
    return out


def log_line(path) -> str:
    """Slurm's own word on how a job ended ('*** JOB 12 ON node CANCELLED AT ... ***'), or the last line."""
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    job = [x for x in lines if "*** JOB" in x]  # 'DUE TO TIME LIMIT', 'DUE TO PREEMPTION': the job's end
    return (job or [x for x in lines if "***" in x] or lines or [""])[-1].strip()[:300]


def ended(r: Submitted, q) -> str | None:
    """How a job that left the queue ended: its task's answer (None or the failing stage's
    log line) when it wrote one, else why it was cut."""
    name, stderr = f"{q.name} job {r.sub.job_id}", r.rec["stderr"]
    if r.sub.paths.result_pickle.exists():
        try:
            return r.sub.result()
        except Exception as e:  # the task itself failed (could not start, out of requeues...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"{name} failed ({log_line(stderr) or first[:300]}): see {stderr}"
    why = f"{r.state or 'left the queue'}: {log_line(stderr)}" if log_line(stderr) else r.state or "left the queue"
    return f"{name} was cut before it finished ({why}); a rerun resumes it from its last checkpoint: see {stderr}"


def wait(running: list[Submitted], todo: list[Job], q, opts: LaunchOptions, folder: Path, say) -> dict:
    """Submit what the queue's limit allows, look at the queue every slurm_poll seconds,
    and collect each job's outcome as it ends; {job name: None | why}."""
    results, grace = {}, min(30.0, 3 * opts.slurm_poll)  # a result file may reach a shared disk late
    try:
        while running or todo:
            n = len(todo) if q.limit is None else max(0, q.limit - len(running))
            running, todo = running + submit(todo[:n], q, opts, folder, say), todo[n:]
            states = q.states([r.sub for r in running])
            if states is None:
                say(f"squeue did not answer ({q.error}); trying again in {opts.slurm_poll:g} s")
            for r in list(running) if states else []:
                st = states[r.sub.job_id]
                if st != r.state:
                    say(f"{r.job.name}: {q.name} job {r.sub.job_id} {st or 'left the queue'}")
                    r.state = st
                alive = st is not None and st not in ENDED and not r.sub.paths.result_pickle.exists()
                r.ended_at = 0.0 if alive else (r.ended_at or time.time())
                if not alive and (r.sub.paths.result_pickle.exists() or time.time() - r.ended_at >= grace):
                    results[r.job.name] = ended(r, q)
                    say(f"{r.job.name}: {'done' if results[r.job.name] is None else 'FAILED'}")
                    running.remove(r)
            if running or todo:
                time.sleep(opts.slurm_poll)
    except KeyboardInterrupt:
        ids = " ".join(r.sub.job_id for r in running)
        say(f"stopped waiting; the jobs go on ({ids}): run the same command again to wait for them (nothing is "
            f"submitted twice), or cancel them with scancel {ids}")
        raise
    return results


def submitit_launch(jobs: list[Job], opts: LaunchOptions, say, q) -> dict:
    """Skip the jobs an earlier Slurm job finished, wait for those still in the queue
    (never a second job on one folder), submit the rest; wait unless opts.detach."""
    folder = (Path(opts.folder) if opts.folder else
              Path(os.path.commonpath([str(Path(j.dir).resolve()) for j in jobs])) / "slurm").resolve()
    recs = {j.name: last_record(j) for j in jobs}
    found = {j.name: Submitted(j, q.reattach(recs[j.name]), recs[j.name]) for j in jobs
             if recs[j.name].get("launcher") == q.name and not finished_before(j)}
    states = q.states([r.sub for r in found.values()]) if found else {}
    if states is None:
        raise UserError(f"squeue did not answer ({q.error}): is Slurm up? (sinfo)")
    results, todo, running = {}, [], []
    for j in jobs:
        r = found.get(j.name)
        st = states.get(r.sub.job_id) if r else None
        if finished_before(j):
            say(f"{j.name}: finished by {recs[j.name]['launcher']} job {recs[j.name]['job_id']}, skipped")
            results[j.name] = None
        elif r and st is not None and st not in ENDED and not r.sub.paths.result_pickle.exists():
            say(f"{j.name}: its {q.name} job {r.sub.job_id} is {st}: waiting for it, not submitting another")
            running.append(r)
        else:
            todo.append(j)
    if opts.detach:
        submit(todo, q, opts, folder, say)
        return {**results, **{j.name: None for j in todo + [r.job for r in running]}}
    return {**results, **wait(running, todo, q, opts, folder, say)}


def submitit_gather(jobs: list[Job], opts: LaunchOptions, say, q) -> dict:
    """Wait for each job's last recorded submission; {name: None | why} for those with one."""
    results, running = {}, []
    for j in jobs:
        rec = last_record(j)
        if rec.get("launcher") != q.name:
            continue
        prog = read_progress(j.dir)
        if prog.get("token") == rec["token"] and prog.get("finished"):
            results[j.name] = None
        else:
            running.append(Submitted(j, q.reattach(rec), rec))
    return {**results, **wait(running, [], q, opts, Path(opts.folder or "."), say)}


@LAUNCHERS.register("slurm")
def slurm(jobs: list[Job], opts: LaunchOptions, say) -> dict:
    return submitit_launch(jobs, opts, say, SlurmQueue(opts))


@LAUNCHERS.register("submitit_local")
def submitit_local(jobs: list[Job], opts: LaunchOptions, say) -> dict:
    return submitit_launch(jobs, opts, say, LocalQueue(opts))


slurm.gather = lambda jobs, opts, say: submitit_gather(jobs, opts, say, SlurmQueue(opts))
submitit_local.gather = lambda jobs, opts, say: submitit_gather(jobs, opts, say, LocalQueue(opts))
