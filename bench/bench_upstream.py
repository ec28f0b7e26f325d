"""
Training speed side by side with upstream llama2.c's train.py: the same data, shape,
batch, learning rate, fp32, on this machine, in one run with interleaved rounds.

$ make bench-upstream UPSTREAM=../llama2.c          # the three shapes + compile at 15M (~15 min on 2 quiet cores)
$ python bench/bench_upstream.py --upstream=../llama2.c --rounds=3 --steps=40
$ python bench/bench_upstream.py --upstream=../llama2.c --shapes=dim288 --compile_too=False
$ python bench/bench_upstream.py --smoke            # seconds: the tiny shape, 12 steps (upstream too if given)

Both sides are the real commands, each in its own process: this project's train.py and
llama2.c's train.py (run from a scratch folder that links the checkout's files, so the
checkout is never written to). The data are random tokens written once in llama2.c's .bin
format (uint16, data/tok{V}/dataNN.bin: llama2.c's loader reads them as vocab_source=custom)
and indexed for this project. Settings on both sides: device cpu, dtype float32, compile off
(then on, at the 15M shape), gradient_accumulation_steps 1, constant learning rate 5e-4
(decay_lr=False), grad_clip 1.0, weight decay 0.1, betas (0.9, 0.95), log every step.
A round runs every shape once on each side, the side that goes first alternating by round,
so that both see the same machine noise. Each side's ms/step is the median of its logged
step times after step 10 (compiling, warm-up and the step-0 evaluation excluded), pooled
over the rounds; the ratio is upstream's ms/step over the project's (> 1: the project is
faster), with the range of the per-round ratios beside it. The machine's load average is
printed before and after: on a shared machine, compare only numbers from one run.
"""

import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prebias.data import tok_dir, write_index  # noqa: E402
from prebias.stats import mean_interval  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import smoke  # noqa: E402

# -----------------------------------------------------------------------------
# the shapes of issue 27; vocab 512 (the sample's) for the small two, 4096 (config/stories15M.json) for 15M
SHAPES = {
    "dim16": dict(dim=16, n_layers=1, n_heads=1, vocab_size=512, batch_size=4, max_seq_len=64),
    "dim64": dict(dim=64, n_layers=4, n_heads=4, vocab_size=512, batch_size=16, max_seq_len=256),
    "dim288": dict(dim=288, n_layers=6, n_heads=6, vocab_size=4096, batch_size=8, max_seq_len=256),
}
SHARED = dict(learning_rate=5e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=False,
              gradient_accumulation_steps=1, device="cpu", dtype="float32", eval_iters=1, log_interval=1)
SKIP = 10  # steps left out of the median: warm-up, compiling, the step-0 evaluation
UPSTREAM_FILES = ("train.py", "model.py", "tinystories.py", "configurator.py", "export.py", "tokenizer.py")
# -----------------------------------------------------------------------------


def write_data(root: Path, vocab: int, max_seq_len: int, n_shards: int = 3, n_tokens: int = 400_000):
    """Random tokens (BOS every 200) in llama2.c's layout, indexed for this project; shard 0
    is validation on both sides."""
    d = tok_dir(root, vocab)
    if list(d.glob("data*.bin")):
        write_index(root, vocab, max_seq_len, "synthetic", "0" * 64)
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        toks = rng.integers(3, vocab, n_tokens).astype(np.uint16)
        toks[::200] = 1
        toks.tofile(d / f"data{s:02d}.bin")
    write_index(root, vocab, max_seq_len, "synthetic", "0" * 64)


def upstream_folder(upstream: Path, work: Path) -> Path:
    """A scratch folder where llama2.c's train.py runs: links to its files and to the data
    (it reads data/ and configurator.py relative to the working folder, and writes out_dir)."""
    missing = [f for f in UPSTREAM_FILES if not (upstream / f).is_file()]
    if missing:
        sys.exit(f"--upstream={upstream}: no {missing[0]} there: give a checkout of karpathy/llama2.c")
    up = work / "upstream"
    up.mkdir(exist_ok=True)
    for f in UPSTREAM_FILES:
        if not (up / f).exists():
            (up / f).symlink_to((upstream / f).resolve())
    if not (up / "data").exists():
        (up / "data").symlink_to(work / "data")
    return up


def project_cmd(shape: dict, steps: int, out_dir: Path, data: Path, compile_: bool, dtype="float32",
                device="cpu") -> list[str]:
    kw = {**SHARED, **shape, "n_kv_heads": shape["n_heads"], "compile": compile_, "max_iters": steps,
          "warmup_iters": 0, "eval_interval": steps, "log_spaced": False, "model_bin": "none",
          "out_dir": out_dir, "data_dir": data, "dtype": dtype, "device": device,
          "peak_flops": 1e12}  # MFU is not read here: skip the start's matmul-rate measurement
    return [sys.executable, str(ROOT / "train.py"), *(f"--{k}={v}" for k, v in kw.items())]


def upstream_cmd(shape: dict, steps: int, out_dir: Path, compile_: bool, dtype="float32",
                 device="cpu") -> list[str]:
    kw = {**SHARED, **shape, "n_kv_heads": shape["n_heads"], "compile": compile_, "max_iters": steps - 1,
          "warmup_iters": 0, "eval_interval": 10 ** 9, "vocab_source": "custom", "out_dir": out_dir,
          "dtype": dtype, "device": device, "wandb_log": False}
    return [sys.executable, "train.py", *(f"--{k}={v}" for k, v in kw.items())]  # max_iters-1: it runs one more


PROJECT_MS = re.compile(r"^step:\d+/\d+ loss:\S+ lr:\S+ ms:([\d.]+)", re.M)
UPSTREAM_MS = re.compile(r"^\d+ \| loss \S+ \| lr \S+ \| ([\d.]+)ms", re.M)


# runs a script with each line it prints stamped with the process's CPU time so far: on a
# shared machine the CPU time of a step is far steadier than its wall-clock time
CPU_STAMP = """import os, runpy, sys, time
class Stamp:
    def __init__(self, f):
        self.f, self.bol = f, True
    def write(self, s):
        out = []
        for part in s.splitlines(keepends=True):
            out.append(f"[cpu {time.process_time():.6f}] " * self.bol + part)
            self.bol = part.endswith("\\n")
        self.f.write("".join(out))
        self.f.flush()
    def __getattr__(self, k):
        return getattr(self.f, k)
sys.stdout = Stamp(sys.stdout)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_side(cmd: list[str], cwd: Path, pattern: re.Pattern, env: dict, cpu: bool = False):
    """Per-step ms logged by one training process; with cpu, also (wall, cpu): the CPU ms
    of each step (from the stamps of consecutive step lines; nan for the first)."""
    if cpu:
        cmd = [cmd[0], "-c", CPU_STAMP, *cmd[1:]]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:2]))} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    if cpu:
        pattern = re.compile(r"^\[cpu ([\d.]+)\] " + pattern.pattern.lstrip("^"), re.M)
    found = pattern.findall(p.stdout)
    if not found:
        sys.exit(f"{' '.join(map(str, cmd[:2]))}: no step times in its output:\n{p.stdout[-2000:]}")
    if not cpu:
        return [float(m) for m in found]
    t = [float(c) for c, _ in found]
    return [float(m) for _, m in found], [float("nan")] + [1000 * (b - a) for a, b in zip(t, t[1:])]


def measure(cases, rounds, steps, work: Path, up: Path | None, env: dict) -> dict:
    """{case: {"project": [per-round step times], "upstream": [...], "project_cpu": [per-round CPU
    times], "upstream_cpu": [...]}}, interleaved."""
    res = {name: {k: [] for k in ("project", "upstream", "project_cpu", "upstream_cpu")} for name, _, _ in cases}
    for r in range(rounds):
        for name, shape, comp in cases:
            sides = ["project", "upstream"] if up else ["project"]
            for side in (sides if r % 2 == 0 else sides[::-1]):
                out = work / "runs" / f"{side}_{name}_{r}"
                if side == "project":
                    ms, cpu = run_side(project_cmd(shape, steps, out, work / "data", comp), ROOT, PROJECT_MS, env, True)
                else:
                    ms, cpu = run_side(upstream_cmd(shape, steps, out, comp), up, UPSTREAM_MS, env, True)
                k = SKIP if len(ms) > SKIP + 1 else 1
                res[name][side].append(ms[k:])
                res[name][side + "_cpu"].append(cpu[k:])
                print(f"  round {r + 1} {name:16s} {side:8s} {statistics.median(ms[k:]):9.2f} ms/step, "
                      f"{statistics.median(cpu[k:]):9.2f} CPU ms/step", flush=True)
        if up and r < rounds - 1:  # the table so far: a run stopped early still says something
            print(f"after round {r + 1}, CPU ms/step:\n{table(res, cases, '_cpu')}", flush=True)
    return res


def table(res: dict, cases, clock: str = "") -> str:
    """The markdown table of wall-clock (clock "") or CPU (clock "_cpu") ms/step."""
    c = "CPU " if clock else ""
    rows = [f"| shape | project {c}ms/step | upstream {c}ms/step | ratio (upstream / project) | per-round ratios | "
            "95% interval over rounds |", "|---|---|---|---|---|---|"]
    for name, shape, comp in cases:
        proj, ups = res[name]["project" + clock], res[name]["upstream" + clock]
        p = statistics.median([t for r in proj for t in r])
        desc = (f"dim {shape['dim']}, {shape['n_layers']} layer{'s' * (shape['n_layers'] > 1)}, V {shape['vocab_size']}, "
                f"batch {shape['batch_size']} × {shape['max_seq_len']}{', compile' if comp else ''}")
        if not ups:
            rows.append(f"| {desc} | {p:.2f} | (not given) | | | |")
            continue
        u = statistics.median([t for r in ups for t in r])
        per = [statistics.median(b) / statistics.median(a) for a, b in zip(proj, ups)]
        rows.append(f"| {desc} | {p:.2f} | {u:.2f} | **{u / p:.2f}×** | {min(per):.2f}–{max(per):.2f} | "
                    f"{round_interval(per)} |")
    return "\n".join(rows)


def round_interval(ratios: list) -> str:
    """The geometric mean of the per-round ratios with a 95% t interval over rounds (on their
    logs: a ratio and its inverse weigh alike), and whether it decides >= 1.0: a round is one
    paired measurement, so the rounds, not the pooled steps, carry the machine's drift."""
    n, m, _, lo, hi = mean_interval(np.log(ratios))
    if n < 2:
        return "(one round)"
    verdict = "≥ 1.0" if lo >= 0 else "< 1.0" if hi < 0 else "undecided"
    return f"{math.exp(m):.2f} [{math.exp(lo):.2f}, {math.exp(hi):.2f}]: {verdict}"


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (p.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


# smoke: the tiny shape, 1 round of 12 steps, no compile, 1 thread (bench/smoke.py)
SMOKE = dict(shapes="dim16", rounds=1, steps=12, compile_too="False", threads=1)


def parse_args(argv=None):
    ap = smoke.parser(__doc__)
    ap.add_argument("--upstream", default="", help="a checkout of karpathy/llama2.c (its train.py is run)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="steps per process (the first 10 are left out)")
    ap.add_argument("--compile_too", default="True", choices=["True", "False", "only"],
                    help="also time the 15M shape with --compile=True on both sides (only: that alone)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of both sides (OMP_NUM_THREADS); 0 = torch's default (every core). On a "
                         "loaded machine 1 is far steadier: 2 threads stall at every parallel region")
    a = smoke.parse(ap, SMOKE, argv)
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        ap.error(f"--shapes: {bad[0]!r} is not one of {', '.join(SHAPES)}")
    if a.rounds < 1 or a.steps < 2:
        ap.error("--rounds must be >= 1 and --steps >= 2")
    if not a.upstream and not a.smoke:
        ap.error("give --upstream=<a checkout of karpathy/llama2.c> (make bench-upstream UPSTREAM=<it>), or --smoke")
    return a


def main(argv=None):
    a = parse_args(argv)
    names = a.shapes.split(",")
    cases = [(n, SHAPES[n], False) for n in names] if a.compile_too != "only" else []
    if a.compile_too in ("True", "only") and "dim288" in names:
        cases.append(("dim288_compile", SHAPES["dim288"], True))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    load0, commit = os.getloadavg(), git_commit()  # at the start: the code that is timed
    with tempfile.TemporaryDirectory(prefix="bench_upstream_") as tmp:
        work = Path(tmp)
        for n in names:
            write_data(work / "data", SHAPES[n]["vocab_size"], SHAPES[n]["max_seq_len"])
        up = upstream_folder(Path(a.upstream), work) if a.upstream else None
        if up is None:
            print("upstream not given (--upstream=<a llama2.c checkout>): timing the project's side only")
        t0 = time.time()
        res = measure(cases, a.rounds, a.steps, work, up, env)
    load1 = os.getloadavg()
    import torch
    threads = a.threads or torch.get_num_threads()
    print(f"\ncommit {commit}, torch {torch.__version__}, {threads} thread(s) a side, {a.rounds} "
          f"interleaved round(s) of {a.steps} steps, median ms/step after step {SKIP}, {time.time() - t0:.0f} s; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print("wall-clock (each side's own logged step time):")
    print(table(res, cases))
    print("CPU time of each step (the process's, between consecutive step lines):")
    print(table(res, cases, "_cpu"))
    return res


if __name__ == "__main__":
    main()
