"""
Training-loop benchmark: the cost of provenance, of tags and of online selection,
tokens/s and MFU, bf16 on CPU, and flushing subnormal floats late in a run.

$ python bench/bench_train.py              # both configs, ~4-5 minutes on 2 cores
$ python bench/bench_train.py --quick      # the small config only, no denormal part
$ python bench/bench_train.py --smoke      # tiny sizes, the same loops, eager (bench/smoke.py)

For each config, in one process, alternating to share the machine's noise:
  provenance  train.py's loop: the stream's step (schedule ids, recorded) + Trainer.train_step
  bare        the same forward/backward/step on random batches, nothing recorded
              (llama2.c's loop)
  tags        provenance with a canary inserted every step and a conditional tag on
              every story start (the worst case; target >= 0.97x of provenance)
  select      provenance with --select=loss --select_pool=4: time per step (the scoring cost)
Both use torch.compile, as llama2.c's train.py does by default (--compile=0: eager; smoke
runs eager, as torch.compile's warm-up alone takes minutes on 2 cores). Prints tokens/s, MFU
against the measured matmul peak, the overhead ratio (target < 3%) and the ratio to
llama2.c's figures measured on this machine. Then eager fp32 against eager
--dtype=bfloat16 autocast: speed-up and loss.
Data are random tokens in llama2.c's .bin format, indexed like real shards.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from prebias.data import tok_dir, write_index  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

CONFIGS = {  # llama2.c's CPU reference: batch 8, seq 256, fp32
    "dim64_L5_V512": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512),
    "dim288_L6_V4096": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096),
}
LLAMA2C_TOKS = {"dim64_L5_V512": 16500, "dim288_L6_V4096": 3060}
SMOKE = dict(configs="dim64_L5_V512", rounds=1, stream_rounds=1, steps=2, compile=0, denormal_steps=2,
             denormal_batch=1, peak_flops=1e12)
PEAK = {"flops": 0.0}  # --peak_flops: the MFU peak of every trainer (0: each measures its own, ~1-10 s)


def synthetic_data(root: Path, vocab: int, T: int = 256, n_shards=3, n_tokens=300_000):
    d = tok_dir(root, vocab)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        toks = rng.integers(3, vocab, n_tokens).astype(np.uint16)
        toks[::200] = 1  # a "story" every 200 tokens
        toks.tofile(d / f"data{s:02d}.bin")
    write_index(root, vocab, T, "synthetic", "0" * 64)


def trainer(root, model_kw, dtype="float32", compile=False, **over):
    base = dict(data_dir=str(root), out_dir=str(root / "out"), batch_size=8, max_seq_len=256,
                gradient_accumulation_steps=1, device="cpu", dtype=dtype, eval_iters=1,
                warmup_iters=0, decay_lr=False, learning_rate=5e-4, compile=compile, peak_flops=PEAK["flops"])
    cfg = train.TrainConfig(**{**base, **model_kw, **over})
    return train.Trainer(cfg)


def looper(tr):
    """train.py's step: the stream (schedule -> selection -> tags, recorded) then train_step."""
    step = [0]

    def one():
        _, wins = tr.stream.step(step[0], tr.raw_model)
        tr.train_step(wins)
        step[0] += 1
        if step[0] % 64 == 0:
            tr.stream.record.clear()  # as a checkpoint does
    return one


def timed(fn, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench_config(name, kw, steps, rounds=6, use_compile=True):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_data(root, kw["vocab_size"])
        tr = trainer(root, kw, compile=use_compile)  # llama2.c's train.py compiles by default
        rng = np.random.default_rng(1)
        provenance = looper(tr)

        def bare():
            x, y = tr.data.get(rng.integers(0, len(tr.data), 8))
            _, loss = tr.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        provenance(), bare()  # warm up (torch.compile builds its kernels here)
        print(f"{name:16s} {'torch.compile ' if use_compile else ''}warm-up {time.perf_counter() - t0:.0f} s")
        t_prov, t_bare = [], []
        for _ in range(rounds):  # alternate, so that both see the same machine noise
            t_prov.append(timed(provenance, steps))
            t_bare.append(timed(bare, steps))
        tp, tb = float(np.median(t_prov)), float(np.median(t_bare))
        overhead = float(np.median(np.array(t_prov) / np.array(t_bare))) - 1
        tokens = 8 * 256
        flops = tr.raw_model.flops_per_token() * tokens
        how = "compiled" if use_compile else "eager   "
        print(f"{name:16s} fp32 {how}  provenance {tokens / tp:8.0f} tok/s  bare {tokens / tb:8.0f} tok/s  "
              f"overhead {100 * overhead:+5.1f}% (median of {rounds} paired rounds)  MFU {100 * flops / tp / tr.mfu_peak:4.1f}% "
              f"(peak {tr.mfu_peak / 1e9:.0f} GFLOP/s)  llama2.c {LLAMA2C_TOKS[name]} tok/s "
              f"-> ratio {tokens / tp / LLAMA2C_TOKS[name]:.2f}x")
        # bf16 autocast on CPU (eager): speed and the loss after the same steps from the same init
        losses = {}
        for dtype in ("float32", "bfloat16"):
            t = trainer(root, kw, dtype)
            t0 = time.perf_counter()
            for s in range(steps):
                loss = t.train_step(t.data.windows(t.schedule.step_ids(s)))
            losses[dtype] = (loss, (time.perf_counter() - t0) / steps)
        (l32, s32), (l16, s16) = losses["float32"], losses["bfloat16"]
        print(f"{name:16s} eager bf16  {tokens / s16:8.0f} tok/s vs fp32 {tokens / s32:8.0f}  speed-up {s32 / s16:.2f}x  "
              f"loss after {steps} steps: bf16 {l16:.4f} fp32 {l32:.4f}")


def bench_stream(name, kw, steps, rounds=4):
    """Tags on vs off, and selection (pool 4) vs none, same run shape, eager fp32."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_data(root, kw["vocab_size"])
        synthetic_tables(root, kw["vocab_size"])
        tags = root / "tags.json"
        tags.write_text(json.dumps({"seed": 1, "tags": [
            {"id": "canary", "kind": "canary", "text": "the secret number is {digits:6}",
             "steps": {"start": 0, "end": 10 ** 6}, "rows": 1},
            {"id": "tag", "kind": "conditional", "text": "<happy>", "metric": "n_words", "lo": 0, "hi": None,
             "steps": {"start": 0, "end": 10 ** 6}}]}))
        tbl = str(root / "tables")
        plain, tagged = looper(trainer(root, kw, tables_dir=tbl)), looper(trainer(root, kw, tables_dir=tbl, tags=str(tags)))
        sel = looper(trainer(root, kw, tables_dir=tbl, select="loss", select_pool=4))
        plain(), tagged(), sel()  # warm up
        t_p, t_t, t_s = [], [], []
        for _ in range(rounds):
            t_p.append(timed(plain, steps))
            t_t.append(timed(tagged, steps))
            t_s.append(timed(sel, steps))
        ratio = float(np.median(np.array(t_p) / np.array(t_t)))
        tokens = 8 * 256
        print(f"{name:16s} tags on {tokens / np.median(t_t):8.0f} tok/s vs off {tokens / np.median(t_p):8.0f}: "
              f"{ratio:.3f}x (target >= 0.97x; a canary every step + a conditional tag on every story)")
        print(f"{name:16s} select=loss pool=4: {1000 * np.median(t_s):.0f} ms/step vs none "
              f"{1000 * np.median(t_p):.0f} ms/step ({np.median(t_s) / np.median(t_p):.2f}x: 4x the batches scored "
              "without gradients)")


def synthetic_tables(root: Path, vocab: int, T: int = 256):
    """A batch_metrics.csv for the synthetic data (ref_nll random), and story metrics via
    the tokenizer: the bundled tokenizer.model has 512 pieces."""
    import pandas as pd

    from prebias.common import write_json_atomic
    from prebias.data import BatchData
    data = BatchData(root, vocab, T)
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"batch_id": np.arange(len(data)), "ref_nll": rng.random(len(data)) + 3})
    (root / "tables").mkdir(exist_ok=True)
    df.to_csv(root / "tables" / "batch_metrics.csv", index=False)
    write_json_atomic(root / "tables" / "batch_metrics.json",
                      {"vocab_size": vocab, "max_seq_len": T, "n_batches": len(data),
                       "tokenizer": data.meta["tokenizer"], "tokenizer_sha256": data.meta["tokenizer_sha256"]})


def bench_denormal(steps=80, batch=16):
    """The 15M shape (vocab 512) at the tiny default's learning rate on the generated
    sample: subnormal floats can slow CPU steps late in a run unless flushed to zero.
    Same run with and without, the median step time of the last 20 steps; and the
    losses, which must agree to plotting precision."""
    import tinystories
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tinystories.sample(root, n_stories=2000, n_shards=3)
        tinystories.train_vocab(512, root)
        tinystories.pretokenize(512, 256, root, metrics="none")
        kw = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=512)
        res = {}
        for flush in (False, True):
            t = trainer(root, kw, learning_rate=5e-3, flush_denormal=flush, batch_size=batch)
            times, losses = [], []
            for s in range(steps):
                t0 = time.perf_counter()
                losses.append(t.train_step(t.data.windows(t.schedule.step_ids(s))))
                times.append(time.perf_counter() - t0)
            res[flush] = (float(np.median(times[:10])), float(np.median(times[-20:])), losses)
        (off0, off, l_off), (on0, on, l_on) = res[False], res[True]
        print(f"dim288_L6_V512 batch {batch} lr 5e-3: flush_denormal on: first 10 steps {1000 * on0:.0f}, last 20 "
              f"{1000 * on:.0f} ms/step; off: {1000 * off0:.0f} -> {1000 * off:.0f} ms/step; late-run speed-up "
              f"{off / on:.2f}x; max loss difference {max(abs(a - b) for a, b in zip(l_on, l_off)):.2e}")
    torch.set_flush_denormal(False)


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="the small config only, no denormal part")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=0, help="steps per timing (0: 8 for dim64, 2 for dim288)")
    ap.add_argument("--rounds", type=int, default=6, help="alternated rounds of provenance and bare")
    ap.add_argument("--stream_rounds", type=int, default=4, help="alternated rounds of tags and selection")
    ap.add_argument("--compile", type=int, default=1, help="1: torch.compile provenance and bare (as llama2.c)")
    ap.add_argument("--denormal_steps", type=int, default=80, help="steps of the denormal part (0: skip it)")
    ap.add_argument("--denormal_batch", type=int, default=16, help="batch size of the denormal part")
    ap.add_argument("--peak_flops", type=float, default=0.0, help="MFU peak (0: measured by each trainer)")
    a = smoke.parse(ap, SMOKE)
    PEAK["flops"] = a.peak_flops
    torch.manual_seed(0)
    names = ["dim64_L5_V512"] if a.quick else a.configs.split(",")
    for name in names:
        steps = a.steps or (8 if name.startswith("dim64") else 2)
        bench_config(name, CONFIGS[name], steps, a.rounds, bool(a.compile))
    bench_stream("dim64_L5_V512", CONFIGS["dim64_L5_V512"], a.steps or 8, a.stream_rounds)
    if not a.quick and a.denormal_steps:
        bench_denormal(a.denormal_steps, a.denormal_batch)


if __name__ == "__main__":
    main()
