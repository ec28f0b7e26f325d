"""
Launchers: how a batch of independent jobs runs (an experiment's arm x seed runs, the
retrains of attribution). A job is a folder and a list of stages, each one command,
run in order; a failing stage ends its job and is reported with the last line of its
log, the other jobs go on. One registered unit per launcher:

    local   N jobs at once as processes on this machine: on CPU the cores are split
            between them (OMP_NUM_THREADS), with GPUs each job gets its own
            (CUDA_VISIBLE_DEVICES; --torchrun=K: K each)

Every job appends its commands and their output to <dir>/<log> (experiment.log by
default), so a run folder says how it was made.

$ python -c "from prebias.launchers import LAUNCHERS; print(list(LAUNCHERS))"
"""

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prebias.common import Registry, UserError

LAUNCHERS = Registry("launcher")  # name -> fn(jobs, opts, say) -> {job name: None | why it failed}


@dataclass
class Job:
    name: str  # e.g. "curriculum/seed1": how messages and failures name it
    dir: Path  # its folder: the log (and the launcher's records) go here
    stages: list = field(default_factory=list)  # [(stage name, argv list)], run in order
    log: str = "experiment.log"


@dataclass
class LaunchOptions:
    jobs: int = 1  # jobs at once
    gpus_per_job: int = 1  # GPUs a job takes where there are GPUs (torchrun's processes)


def run_stages(job: Job, env: dict, say=print) -> str | None:
    """Run a job's stages in order, appending to its log; None when all went well, else
    the failing stage and the last line of its log."""
    job.dir.mkdir(parents=True, exist_ok=True)
    log_path = job.dir / job.log
    for stage, cmd in job.stages:
        say(f"{job.name}: {stage} ...")
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            rc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=os.getcwd()).returncode
        if rc != 0:
            return failure(stage, rc, log_path)
        say(f"{job.name}: {stage} done in {time.time() - t0:.0f} s")
    return None


def failure(stage: str, rc, log_path: Path) -> str:
    tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
    return f"{stage} failed (exit {rc}; {tail[0][:200] if tail else 'no output'}): see {log_path}"


def launch(jobs: list[Job], launcher: str = "local", opts: LaunchOptions | None = None, say=None) -> dict:
    """Run every job with the named launcher; {job name: None | why it failed}."""
    lock = threading.Lock()

    def said(msg):
        with lock:
            print(msg, flush=True)
    return LAUNCHERS.lookup(launcher, "--launcher")(jobs, opts or LaunchOptions(), say or said)


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
    cores (OMP_NUM_THREADS)."""

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
        else:
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
