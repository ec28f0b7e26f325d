"""
Speed of the run.c builds on random-weight models, and whether their greedy ids agree.

$ python bench/bench_runc.py            # or: make bench
$ python bench/bench_runc.py --smoke    # tiny sizes, the same code paths (bench/smoke.py)

Writes llama2.c version-0 model files with numpy into a temp folder (a stories260K-
shaped one and a ~15M one; plus the shared stories260K fixture when it exists),
compiles every build of the Makefile there (with the flags `make print-cmd-<build>`
reports), runs each on each model with `-t 0 -n 256 -d 1`, and prints tok/s as run
reports it on stderr (best and worst of --repeats runs: a low worst figure for runomp
means its threads were stalled by other load), the best speed relative to
runexact's best, and whether the generated ids equal runexact's.
To add another benchmark, add a script next to this one and a line to `make bench`
(and follow bench/smoke.py's convention: tests/test_bench.py runs it at smoke size).
"""

import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared/fixtures/stories260K.bin"
BUILDS = ["runexact", "runfast", "runomp", "run"]  # runexact first: the reference

MODELS = {
    # name: (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
    "260K-shape": (64, 172, 5, 8, 4, 512, 512),
    "15M-shape": (288, 768, 6, 6, 6, 32000, 256),
}
SMOKE = dict(steps=16, repeats=1, models="260K-shape")


def write_model(path, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, seed=0):
    """Random weights in the version-0 layout, shared classifier; streamed to disk."""
    rng = np.random.default_rng(seed)
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads
    L = n_layers
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len))

        def put(shape, scale):
            f.write((rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype("<f4").tobytes())

        put((vocab_size, dim), 0.2)                      # token embedding
        f.write(np.ones((L, dim), "<f4").tobytes())      # rms_att
        put((L, dim, dim), dim ** -0.5)                  # wq
        put((L, kv_dim, dim), dim ** -0.5)               # wk
        put((L, kv_dim, dim), dim ** -0.5)               # wv
        put((L, dim, dim), dim ** -0.5)                  # wo
        f.write(np.ones((L, dim), "<f4").tobytes())      # rms_ffn
        put((L, hidden_dim, dim), dim ** -0.5)           # w1
        put((L, dim, hidden_dim), hidden_dim ** -0.5)    # w2
        put((L, hidden_dim, dim), dim ** -0.5)           # w3
        f.write(np.ones(dim, "<f4").tobytes())           # rms_final
        f.write(np.zeros(seq_len * head_size, "<f4").tobytes())  # legacy RoPE tables


def write_tokenizer(path, vocab_size):
    """Specials, 256 byte pieces (byte b is id b+3), then distinct filler pieces."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    pieces = pieces[:vocab_size]
    pieces += [b" w%d" % i for i in range(vocab_size - len(pieces))]
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("fi", -float(i), len(p)) + p)


def build(name, outdir):
    cmd = subprocess.run(["make", "-s", "-C", str(ROOT), f"print-cmd-{name}"], capture_output=True,
                         text=True, check=True).stdout.strip()
    argv = shlex.split(cmd)
    out = Path(outdir) / name
    src = argv.index("run.c")
    argv[src] = str(ROOT / "run.c")
    argv[src:src] = ["-o", str(out)]
    subprocess.run(argv, check=True)
    return out, " ".join(a for a in argv if a.startswith("-O") or a.startswith("-f") or a.startswith("-m"))


def generate(binary, model, tok, steps, repeats):
    speeds, ids = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([str(binary), str(model), "-z", str(tok), "-t", "0", "-n", str(steps), "-d", "1"],
                             capture_output=True, text=True, timeout=120)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"{binary.name} failed on {model.name}: {res.stderr.strip()}")
        run_ids = [int(x) for x in res.stdout.split()]
        assert ids is None or run_ids == ids, "a build is not deterministic"
        ids = run_ids
        speed = next((float(line.split(":")[1]) for line in res.stderr.splitlines() if "tok/s" in line),
                     len(ids) / wall)
        speeds.append(speed)
    return max(speeds), min(speeds), ids


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--steps", type=int, default=256, help="greedy tokens per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each build on each model")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    a = smoke.parse(ap, SMOKE)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_runc_") as tmp:
        tmp = Path(tmp)
        models = []
        for name in a.models.split(","):
            cfg = MODELS[name]
            path = tmp / f"{name}.bin"
            write_model(path, *cfg)
            tok = tmp / f"tok{cfg[5]}.bin"
            if not tok.exists():
                write_tokenizer(tok, cfg[5])
            models.append((name, path, tok))
        if FIXTURE.exists():
            tok = tmp / "tok512.bin"
            models.insert(1, ("stories260K", FIXTURE, tok))

        binaries = {}
        for b in BUILDS:
            binaries[b], flags = build(b, tmp)
            print(f"built {b:9s} {flags}")
        threads = os.environ.get("OMP_NUM_THREADS", f"all ({os.cpu_count()} cpus)")
        print(f"\ngreedy, {a.steps} steps, ids mode; OpenMP threads: {threads}; {a.repeats} runs each\n")
        print(f"{'build':10s} {'model':12s} {'best tok/s':>10s} {'worst':>9s} {'vs exact':>9s}  ids == runexact")
        for name, path, tok in models:
            ref_speed, ref_ids = None, None
            for b in BUILDS:
                speed, worst, ids = generate(binaries[b], path, tok, a.steps, a.repeats)
                if b == "runexact":
                    ref_speed, ref_ids = speed, ids
                assert ids and all(0 <= i < abs(struct.unpack("7i", path.read_bytes()[:28])[5]) for i in ids)
                same = "yes" if ids == ref_ids else "NO (first diff at %d)" % next(
                    (i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), min(len(ids), len(ref_ids)))
                print(f"{b:10s} {name:12s} {speed:10.1f} {worst:9.1f} {speed / ref_speed:8.2f}x  {same}")
            print()
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
