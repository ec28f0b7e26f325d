"""
The GPU check: what a CUDA machine must show, in one script of under 10 minutes.

$ make gpu-check UPSTREAM=../llama2.c             # on a CUDA machine
$ python bench/gpu_check.py --upstream=../llama2.c --steps=300
$ python bench/gpu_check.py --dry                 # CPU: the same steps at a tiny size (the test suite runs it)

1. speed: the 15M shape (dim 288, 6 layers, 6 heads, vocabulary 4096, batch 64 x 256) in
   bf16 with torch.compile, trained on the bundled sample for --steps steps by this project's
   train.py and, beside it on the same box, by llama2.c's train.py (same data files, shape,
   batch, learning rate): tok/s from each side's median logged step time after step 10, and
   MFU of both against the same peak (train.py's table of cards), the same FLOP count
   (6N + 12 L H Q T a token, llama2.c's estimate_mfu).
2. resume: runs of --resume_steps steps without compile: an uninterrupted one, a second
   uninterrupted one (does the card give the same bits twice?), and one killed (SIGKILL)
   after its middle checkpoint and resumed. Then the same three with
   torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8. Verdict: the
   batch ids must be equal everywhere (provenance does not depend on the arithmetic); the
   weights are compared bitwise, and where they differ the report says whether two
   uninterrupted runs differ as much (the card's nondeterminism, not the resume).
3. torchrun: the uninterrupted run again under `torchrun --standalone --nproc_per_node=1`:
   the same ids, the weights compared.
Exit status 1 when a hard check fails: a process fails, ids differ, or on CPU (--dry) the
resume is not bitwise (train.py promises it there).
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import tinystories  # noqa: E402
import train  # noqa: E402
from bench_upstream import PROJECT_MS, UPSTREAM_MS, project_cmd, run_side, upstream_cmd, upstream_folder  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from prebias import checkpoint  # noqa: E402

# -----------------------------------------------------------------------------
GPU = dict(shape=dict(dim=288, n_layers=6, n_heads=6, vocab_size=4096, batch_size=64, max_seq_len=256),
           dtype="bfloat16", device="cuda", compile=True, n_stories=4000, steps=300, resume_steps=40)
DRY = dict(shape=dict(dim=16, n_layers=1, n_heads=1, vocab_size=512, batch_size=4, max_seq_len=64),
           dtype="bfloat16", device="cpu", compile=False, n_stories=400, steps=14, resume_steps=20)
SKIP = 10
DETERMINISTIC = ("import runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
# -----------------------------------------------------------------------------


def prepare(work: Path, p: dict) -> Path:
    """The bundled sample, a vocabulary of the shape's size, pretokenized (no metrics)."""
    data = work / "data"
    V, T = p["shape"]["vocab_size"], p["shape"]["max_seq_len"]
    tinystories.sample(data, n_stories=p["n_stories"], n_shards=4)
    tinystories.train_vocab(V, data)
    tinystories.pretokenize(V, T, data, metrics="none", tables_dir=work / "tables")
    return data


def flops_per_token(shape: dict) -> float:
    """llama2.c's estimate_mfu count: 6N + 12 L H Q T (N with the tied embedding once)."""
    a = ModelArgs(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                  vocab_size=shape["vocab_size"], max_seq_len=shape["max_seq_len"])
    n = sum(q.numel() for q in Transformer(a).parameters())
    return 6 * n + 12 * a.n_layers * a.n_heads * (a.dim // a.n_heads) * a.max_seq_len


def speed(work, data, p, up, env) -> list[str]:
    """tok/s and MFU of both sides, one process each, on the same data."""
    sh, lines = p["shape"], []
    tokens = sh["batch_size"] * sh["max_seq_len"]
    peak = train.peak_flops(p["device"], p["dtype"])
    fpt = flops_per_token(sh)
    sides = [("project", project_cmd(sh, p["steps"], work / "speed_project", data, p["compile"], p["dtype"],
                                     p["device"]), ROOT, PROJECT_MS)]
    if up:
        sides.append(("llama2.c", upstream_cmd(sh, p["steps"], work / "speed_upstream", p["compile"], p["dtype"],
                                               p["device"]), up, UPSTREAM_MS))
    else:
        lines.append("speed: llama2.c not given (--upstream=<a llama2.c checkout>): this project's side only")
    for name, cmd, cwd, pat in sides:
        ms = statistics.median(run_side(cmd, cwd, pat, env)[SKIP:] or [float("nan")])
        tps = tokens / ms * 1000
        lines.append(f"speed: {name:9s} {ms:8.1f} ms/step  {tps:10.0f} tok/s  MFU {100 * fpt * tps / peak:5.1f}% "
                     f"(peak {peak / 1e12:.3g} TFLOP/s)")
    return lines


def resume_args(p: dict, out: Path, data: Path, max_iters: int) -> list[str]:
    """train.py's arguments of a resume-check run (constant lr: max_iters changes nothing else)."""
    sh, n = p["shape"], p["resume_steps"]
    kw = {**sh, "n_kv_heads": sh["n_heads"], "dtype": p["dtype"], "device": p["device"], "data_dir": data,
          "out_dir": out, "max_iters": max_iters, "eval_interval": n // 2, "log_spaced": False, "eval_iters": 1,
          "decay_lr": False, "warmup_iters": 0, "dropout": 0.1, "model_bin": "none", "peak_flops": 1e12}
    return [f"--{k}={v}" for k, v in kw.items()]


def train_run(args, env, det=False, torchrun=False, wait=True):
    pre = [sys.executable, "-c", DETERMINISTIC] if det else [sys.executable]
    env = {**env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if det else env  # cuBLAS's deterministic workspace
    if torchrun:
        pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = [*pre, str(ROOT / "train.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {r.returncode}): {r.stderr[-2000:]}")


def killed_run(p, out, data, env, det) -> int:
    """Start a run (10x the steps, so it is still going), SIGKILL it once its middle
    checkpoint is on disk, resume it to resume_steps. Returns the step it resumed from."""
    n = p["resume_steps"]
    proc = train_run(resume_args(p, out, data, 10 * n), env, det, wait=False)
    target = checkpoint.ckpt_path(out, n // 2)
    while not target.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = checkpoint.list_checkpoints(out)[-1][0] if checkpoint.list_checkpoints(out) else -1
    if last < n // 2 or last >= n:
        raise RuntimeError(f"the killed run's last checkpoint is step {last}, not in [{n // 2}, {n}): "
                           f"{proc.stderr.read()[-2000:]}")
    train_run([*resume_args(p, out, data, n), "--init_from=resume"], env, det)
    return last


def compare(a: Path, b: Path) -> tuple[bool, bool, float]:
    """(same batch ids, bitwise same weights, max |difference| of any weight) of two runs' last checkpoints."""
    ca = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(a))
    cb = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(b))
    ids = torch.equal(checkpoint.batch_ids_seen(a, ca["iter_num"]), checkpoint.batch_ids_seen(b, cb["iter_num"]))
    ids = ids and ca["iter_num"] == cb["iter_num"]
    diff = max(float((ca["model"][k].float() - cb["model"][k].float()).abs().max()) for k in ca["model"])
    bitwise = all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    return ids, bitwise, diff


def resume_check(work, data, p, env) -> tuple[list[str], bool]:
    lines, ok = [], True
    for det in (False, True):
        tag = "deterministic" if det else "default"
        runs = {k: work / f"resume_{tag}_{k}" for k in ("straight", "again", "killed")}
        for k in ("straight", "again"):
            train_run(resume_args(p, runs[k], data, p["resume_steps"]), env, det)
        frm = killed_run(p, runs["killed"], data, env, det)
        ids_a, bit_a, d_a = compare(runs["straight"], runs["again"])
        ids_k, bit_k, d_k = compare(runs["straight"], runs["killed"])
        ok &= ids_a and ids_k
        verdict = ("bitwise the uninterrupted run" if bit_k else
                   f"NOT bitwise (max |dw| {d_k:.2e}); two uninterrupted runs "
                   f"{'agree bitwise: the resume is at fault' if bit_a else f'differ too (max |dw| {d_a:.2e}): the card'}")
        lines.append(f"resume ({tag}): killed at step >= {frm}, resumed to {p['resume_steps']}: ids "
                     f"{'equal' if ids_k else 'DIFFER'}; weights {verdict}")
        if p["device"] == "cpu" and not det:
            ok &= bit_k  # train.py's promise on CPU
    return lines, ok


def torchrun_check(work, data, p, env) -> tuple[list[str], bool]:
    out = work / "torchrun"
    train_run(resume_args(p, out, data, p["resume_steps"]), env, torchrun=True)
    ids, bit, d = compare(work / "resume_default_straight", out)
    return [f"torchrun --nproc_per_node=1: ids {'equal' if ids else 'DIFFER'}, weights "
            f"{'bitwise' if bit else f'differ by max {d:.2e}'} against the plain process"], ids


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="", help="a checkout of karpathy/llama2.c, timed beside this project")
    ap.add_argument("--steps", type=int, default=0, help="steps of the speed runs (default 300; dry 14)")
    ap.add_argument("--dry", "--smoke", action="store_true", help="CPU, a tiny shape, the same steps")
    ap.add_argument("--keep_dir", default="", help="keep the runs there (default: a temp folder, removed)")
    a = ap.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        ap.error("no CUDA device here: run it on a GPU machine, or --dry for the CPU rehearsal")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    p = dict(DRY if a.dry else GPU)
    p["steps"] = a.steps or p["steps"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(a.keep_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare(work, p)
        up = upstream_folder(Path(a.upstream), work) if a.upstream else None
        dev = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu (dry)"
        print(f"gpu_check on {dev}, torch {torch.__version__}, {p['shape']}, {p['dtype']}", flush=True)
        lines = speed(work, data, p, up, env)
        print("\n".join(lines), flush=True)
        res, ok1 = resume_check(work, data, p, env)
        print("\n".join(res), flush=True)
        tr, ok2 = torchrun_check(work, data, p, env)
        print("\n".join(tr), flush=True)
    print(f"gpu_check {'passed' if ok1 and ok2 else 'FAILED'} in {time.time() - t0:.0f} s")
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
