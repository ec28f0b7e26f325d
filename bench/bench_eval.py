"""
Cost of eval.py per checkpoint, and the speed-up of batched KV-cached generation.

$ python bench/bench_eval.py                 # ~2 minutes on 2 CPU cores
$ python bench/bench_eval.py --device=cuda
$ python bench/bench_eval.py --smoke         # tiny sizes, the same code paths (bench/smoke.py)

In a temp folder: sample data, a 512-token vocabulary, pretokenize at max_seq_len 256,
then two runs written by train.py itself: a tiny model (dim 64, 2 layers; 1 step, so
checkpoints 0 and 1) and a ~15M model (dim 288, 6 layers, 6 heads; step 0 only, random
weights). Prints:
  1) eval.py seconds per checkpoint with its defaults (64 val batches, 8 story prompts +
     "Once upon a time", 200 new tokens, all metrics), for both models;
  2) on the 15M model, model.generate (all prompts in one batch, KV cache) against
     prompt-by-prompt model.generate_nocache (llama2.c's loop, recomputing the whole
     sequence each token), for 9 and 32 prompts x 200 new tokens. The no-cache cost is
     additive over prompts, so it is timed on --nocache_prompts prompts and scaled to
     9 and 32 (the line says so); greedy outputs of both are checked to agree.
Target: >= 10x for 32 prompts.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

M15 = "stories15M shape (dim 288, 6 layers)"  # 6.1M parameters at vocab 512 (15M at 32000)
SMOKE = dict(n_stories=200, eval_flags="--val_batches=2 --n_prompts=1 --max_new_tokens=8", prompts="2,3",
             max_new=8, nocache_prompts=1)


def build(root: Path, device: str, n_stories: int):
    import tinystories
    import train
    data, tables = root / "data", root / "tables"
    tinystories.sample(data, n_stories=n_stories, n_shards=3, seed=1)
    tinystories.train_vocab(512, data)
    tinystories.pretokenize(512, 256, data, workers=2, tables_dir=tables)
    common = dict(data_dir=data, tables_dir=tables, vocab_size=512, max_seq_len=256, batch_size=2,
                  eval_iters=1, model_bin="", device=device, dtype="float32", log_interval=1,
                  peak_flops=1e12)
    tiny = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_iters=1, eval_interval=1)
    m15 = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, max_iters=0, eval_interval=1)
    runs = {"tiny (dim 64, 2 layers)": (root / "tiny", tiny),
            M15: (root / "m15", m15)}
    for out, over in runs.values():
        train.main([f"--{k}={v}" for k, v in {**common, "out_dir": out, **over}.items()])
    return data, runs


def time_eval(out: Path, device: str, flags: list[str]) -> tuple[float, int]:
    import eval as ev
    from prebias.checkpoint import list_checkpoints
    n = len(list_checkpoints(out))
    t0 = time.perf_counter()
    ev.main([f"--out_dir={out}", f"--device={device}", "--redo=True", *flags])
    return (time.perf_counter() - t0) / n, n


def speedup(out: Path, n_prompts: int, k_nocache: int, device: str, max_new: int = 200):
    import eval as ev
    from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint
    from tokenizer import Tokenizer
    model = model_from_checkpoint(load_checkpoint(list_checkpoints(out)[0][1]), device)
    cfg = ev.EvalConfig(out_dir=str(out), n_prompts=n_prompts - 1, max_new_tokens=max_new)
    run = ev.eval_run_config(cfg)
    prompts = [p.tokens for p in ev.build_prompts(cfg, run, Tokenizer.for_vocab(512, run["data_dir"]))]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model.generate(prompts[:2], 4)  # warm up kernels
    sync()
    t0 = time.perf_counter()
    batched = model.generate(prompts, max_new)
    sync()
    t_batched = time.perf_counter() - t0
    k = min(k_nocache, n_prompts)
    t0 = time.perf_counter()
    single = [model.generate_nocache(p, max_new) for p in prompts[:k]]
    sync()
    t_single = (time.perf_counter() - t0) / k * n_prompts
    agree = sum(a == b for a, b in zip(single, batched[:k]))
    n_tok = sum(len(b) for b in batched)
    print(f"{n_prompts:>3} prompts x {max_new} new tokens ({n_tok} generated): batched+KV cache "
          f"{t_batched:6.2f} s | prompt-by-prompt no cache {t_single:7.2f} s (timed on {k} prompt(s), "
          f"scaled x{n_prompts / k:.1f}) | speed-up {t_single / t_batched:5.1f}x | greedy outputs "
          f"agree on {agree}/{k}")
    return t_single / t_batched


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nocache_prompts", type=int, default=2, help="prompts timed without cache")
    ap.add_argument("--n_stories", type=int, default=800, help="stories of the generated sample")
    ap.add_argument("--eval_flags", default="", help="1) eval.py flags (space-separated) beside its defaults")
    ap.add_argument("--prompts", default="9,32", help="2) comma list of prompt counts")
    ap.add_argument("--max_new", type=int, default=200, help="2) new tokens per prompt")
    a = smoke.parse(ap, SMOKE)
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        t0 = time.perf_counter()
        _, runs = build(root, a.device, a.n_stories)
        print(f"\nsetup (data + vocab + pretokenize + 2 train.py runs): {time.perf_counter() - t0:.1f} s")
        res = {name: time_eval(out, a.device, a.eval_flags.split()) for name, (out, _) in runs.items()}
        print(f"\n== eval.py per checkpoint on {a.device} ({a.eval_flags or 'defaults'}: by default 64 val batches "
              "x 256 tokens, 9 prompts x 200 new tokens, all metrics)")
        for name, (sec, n) in res.items():
            print(f"{name:<38} {sec:6.2f} s/checkpoint  (mean of {n})")
        print(f"\n== generation on the 15M model, {a.device}")
        m15 = runs[M15][0]
        for n in map(int, a.prompts.split(",")):
            speedup(m15, n, a.nocache_prompts, a.device, a.max_new)
        print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
