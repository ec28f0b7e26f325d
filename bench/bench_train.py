"""
Training-loop benchmark: the cost of provenance, tokens/s and MFU, and bf16 on CPU.

$ python bench/bench_train.py              # both configs, ~2-3 minutes on 2 cores
$ python bench/bench_train.py --quick      # the small config only

For each config, in one process, alternating to share the machine's noise:
  provenance  Trainer.train_step on the schedule's ids, ids recorded per step (train.py's loop)
  bare        the same forward/backward/step on random batches, nothing recorded
              (llama2.c's loop)
Both use torch.compile, as llama2.c's train.py does by default. Prints tokens/s, MFU
against the measured matmul peak, the overhead ratio (target < 3%) and the ratio to
llama2.c's figures measured on this machine. Then eager fp32 against eager
--dtype=bfloat16 autocast: speed-up and loss.
Data are random tokens in llama2.c's .bin format, indexed like real shards.
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import tok_dir, write_index  # noqa: E402
import train  # noqa: E402

CONFIGS = {  # llama2.c's CPU reference: batch 8, seq 256, fp32
    "dim64_L5_V512": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512),
    "dim288_L6_V4096": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096),
}
LLAMA2C_TOKS = {"dim64_L5_V512": 16500, "dim288_L6_V4096": 3060}


def synthetic_data(root: Path, vocab: int, T: int = 256, n_shards=3, n_tokens=300_000):
    d = tok_dir(root, vocab)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        toks = rng.integers(3, vocab, n_tokens).astype(np.uint16)
        toks[::200] = 1  # a "story" every 200 tokens
        toks.tofile(d / f"data{s:02d}.bin")
    write_index(root, vocab, T, "synthetic", "0" * 64)


def trainer(root, model_kw, dtype="float32", compile=False):
    cfg = train.TrainConfig(data_dir=str(root), out_dir=str(root / "out"), batch_size=8, max_seq_len=256,
                            gradient_accumulation_steps=1, device="cpu", dtype=dtype, eval_iters=1,
                            warmup_iters=0, decay_lr=False, learning_rate=5e-4, compile=compile, **model_kw)
    return train.Trainer(cfg)


def timed(fn, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench_config(name, kw, steps, rounds=6):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_data(root, kw["vocab_size"])
        tr = trainer(root, kw, compile=True)  # llama2.c's train.py compiles by default
        rng = np.random.default_rng(1)
        step = [0]

        def provenance():
            ids = tr.schedule.step_ids(step[0])
            tr.train_step(ids)
            tr.pending_ids.append(ids)
            step[0] += 1

        def bare():
            x, y = tr.data.get(rng.integers(0, len(tr.data), 8))
            _, loss = tr.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        provenance(), bare()  # warm up (torch.compile builds its kernels here)
        print(f"{name:16s} torch.compile warm-up {time.perf_counter() - t0:.0f} s")
        t_prov, t_bare = [], []
        for _ in range(rounds):  # alternate, so that both see the same machine noise
            t_prov.append(timed(provenance, steps))
            t_bare.append(timed(bare, steps))
        tp, tb = float(np.median(t_prov)), float(np.median(t_bare))
        overhead = float(np.median(np.array(t_prov) / np.array(t_bare))) - 1
        tokens = 8 * 256
        flops = tr.raw_model.flops_per_token() * tokens
        print(f"{name:16s} fp32 compiled  provenance {tokens / tp:8.0f} tok/s  bare {tokens / tb:8.0f} tok/s  "
              f"overhead {100 * overhead:+5.1f}% (median of {rounds} paired rounds)  MFU {100 * flops / tp / tr.mfu_peak:4.1f}% "
              f"(peak {tr.mfu_peak / 1e9:.0f} GFLOP/s)  llama2.c {LLAMA2C_TOKS[name]} tok/s "
              f"-> ratio {tokens / tp / LLAMA2C_TOKS[name]:.2f}x")
        # bf16 autocast on CPU (eager): speed and the loss after the same steps from the same init
        losses = {}
        for dtype in ("float32", "bfloat16"):
            t = trainer(root, kw, dtype)
            t0 = time.perf_counter()
            for s in range(steps):
                loss = t.train_step(t.schedule.step_ids(s))
            losses[dtype] = (loss, (time.perf_counter() - t0) / steps)
        (l32, s32), (l16, s16) = losses["float32"], losses["bfloat16"]
        print(f"{name:16s} eager bf16  {tokens / s16:8.0f} tok/s vs fp32 {tokens / s32:8.0f}  speed-up {s32 / s16:.2f}x  "
              f"loss after {steps} steps: bf16 {l16:.4f} fp32 {l32:.4f}")


def main():
    torch.manual_seed(0)
    names = ["dim64_L5_V512"] if "--quick" in sys.argv else list(CONFIGS)
    for name in names:
        bench_config(name, CONFIGS[name], steps=8 if name.startswith("dim64") else 2)


if __name__ == "__main__":
    main()
