"""
Export formats and int8 inference (issue 19's targets): runq's speed against run's, the
cost of int8 on a trained model, and the Hugging Face round trip.

$ python bench/bench_export.py                                # or: make bench (~5-10 min on 2 cores)
$ python bench/bench_export.py --upstream=/tmp/llama2.c       # also a fetched llama2.c's run.c and runq.c
$ python bench/bench_export.py --run=out                      # the int8 cost on an existing run's model
$ python bench/bench_export.py --smoke                        # tiny sizes, the same code paths (bench/smoke.py)

1) Speed at the 15M shape (dim 288, 6 layers, 6 heads, hidden 768, vocab 32,000, seq 256)
   on random weights (speed does not depend on their values): the version-0 file for
   ./run, its version-2 export for ./runq, each built with the Makefile's flags
   (`make print-cmd-<build>`); llama2.c's run.c and runq.c built with the same flags on the
   same files when --upstream gives a fetched copy. Greedy, 256 steps, text to a pipe (a
   piece "[id]" per token, so every program's ids are read back the same way), the
   programs alternated --repeats times, best tok/s of each as it reports it on stderr.
   Target: runq >= 2.5x run in the same run.
2) The cost of int8 on a trained model: validation loss (nats/token) and perplexity of the
   version-2 model as runq computes it (weights dequantised, every matrix product's input
   quantised: export.simulate_runq, which the tests hold to runq's ids) against fp32, on
   the first --val_batches validation batches; the same with the weights alone quantised;
   and the share of greedy tokens that agree over 200 steps (fp32 against int8, from BOS
   and from validation story openings; positions compared one to one, BOS not stopping).
   Target: within 1% relative. Without --run the model is trained here: the bundled sample
   (tinystories.py sample), a 512-piece vocabulary, then train.py's default tiny shape
   (dim 64, 4 layers, 4 heads, 2 kv heads, hidden 192: group size 64) for --train_steps steps.
3) Hugging Face round trip (needs transformers, requirements-extra.txt): the trained model
   (tied classifier) and a random GQA model with its own classifier, exported with
   --version=hf; LlamaForCausalLM.from_pretrained's logits against model.py's (target
   within 1e-4, fp32), greedy 200 tokens identical, and the import bitwise.
"""

import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runc  # noqa: E402
import smoke  # noqa: E402

import export  # noqa: E402
from model import ModelArgs, Transformer, mean_loss  # noqa: E402
from prebias import hf  # noqa: E402
from prebias.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint, run_config  # noqa: E402
from prebias.data import BatchData, load_stories, raw_shards  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"15M": (288, 768, 6, 6, 6, 32000, 256),  # dim, hidden, layers, heads, kv heads, vocab, seq
          "260K": bench_runc.MODELS["260K-shape"]}
SMOKE = dict(shape="260K", repeats=1, steps=16, n_stories=200, train_steps=4, val_batches=4, top1_batches=4,
             greedy=8, train_flags="--batch_size=4 --eval_iters=1")


# -----------------------------------------------------------------------------
# 1) speed

def ids_tokenizer(path, vocab):
    """Piece i is the text "[i]": the printed text of any llama2.c program gives its ids."""
    with open(path, "wb") as f:
        f.write(struct.pack("i", 8))
        for i in range(vocab):
            p = f"[{i}]".encode()
            f.write(struct.pack("fi", 0.0, len(p)) + p)


def build(name, source, outdir):
    """Compile source with the flags of the Makefile's target `name`."""
    flags = subprocess.run(["make", "-s", "-C", str(ROOT), f"print-cmd-{name}"], capture_output=True, text=True,
                           check=True).stdout.split()
    argv = [a for a in flags if not a.endswith(".c")]
    out = Path(outdir) / f"{name}_{Path(source).parent.name}"
    subprocess.run(argv[:1] + ["-o", str(out), str(source)] + argv[1:], check=True, capture_output=True)
    return out, " ".join(a for a in argv if a.startswith(("-O", "-f", "-m")))


def generate(binary, model, tok, steps):
    res = subprocess.run([str(binary), str(model), "-z", str(tok), "-t", "0", "-n", str(steps)], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        sys.exit(f"{binary.name} failed on {model.name}: {res.stderr.strip()}")
    speed = float(next(line.split(":")[1] for line in res.stderr.splitlines() if "tok/s" in line))
    return speed, [int(t) for t in res.stdout.replace("[", " ").replace("]", " ").split()]


def speed(tmp: Path, upstream: Path | None, a):
    v0, v2, tok = tmp / "m15_v0.bin", tmp / "m15_v2.bin", tmp / "ids.bin"
    bench_runc.write_model(v0, *SHAPES[a.shape])
    export.export_bin(export.load_bin(v0), v2, 2)
    ids_tokenizer(tok, SHAPES[a.shape][5])
    progs = {}
    for name in ("run", "runq"):
        progs[name] = (*build(name, ROOT / f"{name}.c", tmp), v0 if name == "run" else v2)
        if upstream:
            progs[f"llama2.c {name}"] = (*build(name, upstream / f"{name}.c", tmp), v0 if name == "run" else v2)
            out = tmp / f"{name}_upstream_O3"  # what llama2.c's own `make run` builds
            subprocess.run(["gcc", "-O3", "-o", str(out), str(upstream / f"{name}.c"), "-lm"], check=True)
            progs[f"llama2.c {name} "] = (out, "-O3 (its make run)", v0 if name == "run" else v2)
    best, ids = {k: 0.0 for k in progs}, {}
    for _ in range(a.repeats):  # alternate, so that the machine's load falls on every program alike
        for k, (binary, _, model) in progs.items():
            s, i = generate(binary, model, tok, a.steps)
            best[k] = max(best[k], s)
            assert ids.setdefault(k, i) == i, f"{k} is not deterministic"
    print(f"\n1) speed at the {a.shape} shape: greedy, {a.steps} steps, best of {a.repeats} alternated runs")
    print(f"{'program':16s} {'file':8s} {'flags':24s} {'tok/s':>9s} {'vs run':>7s}  greedy ids")
    for k, (_, flags, model) in progs.items():
        ref = "runq" if "runq" in k else "run"
        same = "= " + ref if ids[k] == ids[ref] else f"differ from {ref} at {first_diff(ids[k], ids[ref])}"
        print(f"{k.strip():16s} {'v0' if model == v0 else 'v2':8s} {flags:24s} {best[k]:9.1f} {best[k] / best['run']:6.2f}x  "
              f"{same if k != ref else ''}")
    agree = share_agree(ids["runq"], ids["run"])
    print(f"runq / run = {best['runq'] / best['run']:.2f}x (target >= 2.5x); int8 and fp32 greedy ids agree on "
          f"{agree:.0%} of {a.steps} (random weights: a coin-flip model amplifies any difference)")
    return best


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def share_agree(a, b, n=None):
    n = n or max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n


# -----------------------------------------------------------------------------
# 2) the int8 cost on a trained model

def train_model(tmp: Path, a) -> Path:
    data, tables, out = tmp / "data", tmp / "tables", tmp / "out"
    py = [sys.executable]
    steps = [["tinystories.py", "sample", f"--data_dir={data}", f"--n_stories={a.n_stories}"],
             ["tinystories.py", "train_vocab", "--vocab_size=512", f"--data_dir={data}"],
             ["tinystories.py", "pretokenize", "--vocab_size=512", f"--data_dir={data}", f"--tables_dir={tables}",
              "--metrics=none"],
             ["train.py", f"--data_dir={data}", f"--tables_dir={tables}", f"--out_dir={out}",
              f"--max_iters={a.train_steps}", f"--eval_interval={a.train_steps // 2}", "--model_bin=none",
              "--device=cpu", *a.train_flags.split()]]
    t0 = time.perf_counter()
    for s in steps:
        r = subprocess.run(py + [str(ROOT / s[0]), *s[1:]], capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            sys.exit(f"{' '.join(s[:2])} failed: {(r.stdout + r.stderr).strip().splitlines()[-1]}")
    print(f"(trained the tiny default shape for {a.train_steps} steps on the sample in {time.perf_counter() - t0:.0f} s)")
    return out


def int8_cost(tmp: Path, run: Path, a) -> tuple[Transformer, Tokenizer]:
    ck = load_checkpoint(latest_checkpoint(run))
    cfg = run_config(run)
    fp32 = model_from_checkpoint(ck)
    v2 = export.export_bin(fp32, tmp / "trained_v2.bin", 2)
    int8 = export.load_bin(v2)
    weights_only = export.load_bin(v2, activations=False)
    data = BatchData(cfg["data_dir"], cfg["vocab_size"], cfg["max_seq_len"])
    ids = data.val_ids[:a.val_batches]
    torch.manual_seed(0)
    with torch.no_grad():
        loss = {k: mean_loss(m, data, ids, 16, "cpu") for k, m in
                (("fp32", fp32), ("int8 (runq)", int8), ("int8 weights only", weights_only))}
    m = fp32.params
    print(f"\n2) the cost of int8: {run} step {ck['iter_num']} (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, "
          f"{m.n_kv_heads} kv heads, hidden {m.hidden_dim}, vocab {m.vocab_size}; group size "
          f"{int8.q80_group_size}), {len(ids)} validation batches x {cfg['max_seq_len']} tokens")
    print(f"{'model':20s} {'val loss':>9s} {'ppl':>8s} {'vs fp32':>9s}")
    for k, v in loss.items():
        print(f"{k:20s} {v:9.4f} {np.exp(v):8.3f} {100 * (v - loss['fp32']) / loss['fp32']:+8.2f}%")
    x, _ = data.get(ids[:a.top1_batches])
    with torch.no_grad():
        top = {k: m(x)[0].argmax(-1) for k, m in (("fp32", fp32), ("int8", int8), ("weights", weights_only),
                                                  ("fp64", fp64_copy(fp32)))}
    same = {k: f"{(v == top['fp32']).float().mean():.2%}" for k, v in top.items()}
    print(f"next-token argmax on the same text ({len(x)} validation batches) equals fp32's at: int8 (runq) "
          f"{same['int8']}, int8 weights only {same['weights']}, float64 {same['fp64']} (the rounding noise floor)")
    enc = Tokenizer.for_vocab(cfg["vocab_size"], cfg["data_dir"])
    prompts = [[1]] + [enc.encode(s)[:9] for s in load_stories(raw_shards(cfg["data_dir"])[0])[:8]]
    n = min(a.greedy, m.max_seq_len - max(map(len, prompts)) + 1)
    g32 = fp32.generate(prompts, n, temperature=0.0, stop_at_bos=False)
    for name, other in (("int8", int8), ("float64", fp64_copy(fp32))):
        g = other.generate(prompts, n, temperature=0.0, stop_at_bos=False)
        shares = [share_agree(x, y, n) for x, y in zip(g32, g)]
        firsts = [first_diff(x, y) for x, y in zip(g32, g)]
        print(f"greedy, {n} tokens from BOS and {len(prompts) - 1} validation openings: {name} agrees with fp32 on "
              f"{np.mean(shares):.1%} of tokens (per prompt {', '.join(f'{s:.0%}' for s in shares)}); first "
              f"difference at step {', '.join(map(str, firsts))} ({n} = none)")
    return fp32, enc


def fp64_copy(model: Transformer) -> Transformer:
    """The same weights computing in float64: how far float rounding alone moves greedy decoding."""
    m = Transformer(model.params).double()
    m.load_state_dict(model.state_dict())
    m.rope_cos, m.rope_sin = m.rope_cos.double(), m.rope_sin.double()
    return m.eval()


# -----------------------------------------------------------------------------
# 3) Hugging Face

def hf_round_trip(tmp: Path, trained: Transformer, tok_model, greedy: int):
    try:
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        print("\n3) Hugging Face round trip: skipped (pip install -r requirements-extra.txt for transformers)")
        return
    torch.manual_seed(1)
    untied = Transformer(ModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=512, max_seq_len=256,
                                   shared_classifier=False))
    with torch.no_grad():
        for p in untied.parameters():
            p.normal_(0, 0.15 if p.ndim > 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    print("\n3) Hugging Face round trip (fp32)")
    print(f"{'model':34s} {'max |logit diff|':>16s} {f'greedy {greedy} equal':>17s} {'import bitwise':>15s}")
    for name, m in (("trained (tied, GQA 4/2)", trained), ("random (untied, GQA 8/2)", untied)):
        folder = export.export_model(m.eval(), tmp / f"hf_{name.split()[0]}", "hf", tok_model)
        theirs = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        x = torch.randint(0, m.params.vocab_size, (4, m.params.max_seq_len), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            diff = (m(x)[0] - theirs(x).logits).abs().max().item()
            ours = m.generate([[1]], greedy, temperature=0.0, stop_at_bos=False)[0]
            out = theirs.generate(torch.tensor([[1]]), max_new_tokens=greedy, min_new_tokens=greedy, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
        back, _ = hf.load_hf(folder)
        bitwise = all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())
        print(f"{name:34s} {diff:16.2e} {str(out == ours):>17s} {str(bitwise):>15s}")


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--upstream", default="", help="a fetched llama2.c checkout (its run.c and runq.c)")
    ap.add_argument("--run", default="", help="a run folder whose latest checkpoint to measure (default: train one)")
    ap.add_argument("--shape", default="15M", choices=sorted(SHAPES), help="1) the random model's shape")
    ap.add_argument("--repeats", type=int, default=5, help="1) alternated runs of each program")
    ap.add_argument("--steps", type=int, default=256, help="1) greedy tokens per run")
    ap.add_argument("--n_stories", type=int, default=4000, help="2) stories of the sample trained on")
    ap.add_argument("--train_steps", type=int, default=400, help="2) steps of the trained model")
    ap.add_argument("--train_flags", default="", help="2) more train.py flags, space-separated")
    ap.add_argument("--val_batches", type=int, default=256, help="2) validation batches of the loss")
    ap.add_argument("--top1_batches", type=int, default=64, help="2) validation batches of the argmax agreement")
    ap.add_argument("--greedy", type=int, default=200, help="2, 3) greedy tokens compared")
    a = smoke.parse(ap, SMOKE)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        speed(tmp, Path(a.upstream) if a.upstream else None, a)
        run = Path(a.run) if a.run else train_model(tmp, a)
        trained, enc = int8_cost(tmp, run, a)
        hf_round_trip(tmp, trained, enc.model_path, a.greedy)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
