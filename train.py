"""
Pretrain a Llama-2 model on the pretokenized TinyStories batches, recording exactly
which batches every checkpoint has seen.

$ python train.py                                   # tiny default config, CPU-friendly
$ python train.py --max_iters=2000 --out_dir=out/shuffle_s2 --seed=2
$ python train.py config/stories15M.json            # llama2.c's 15M model (GPU)
$ python train.py --init_from=resume                # continue the same schedule exactly
$ python train.py --schedule=sorted --schedule_metric=fk_grade --out_dir=out/curriculum
$ python train.py --show_batches=12                 # ids + text of step 12 of the run
$ torchrun --standalone --nproc_per_node=4 train.py config/stories15M.json

The order of batches is a Schedule (schedule.py). An optimizer step consumes
batch_size * gradient_accumulation_steps batches (gradient_accumulation_steps counts
over all ranks, as in llama2.c: each of W ranks does 1/W of them), so a step sees
the same ids at any world size. Checkpoints are kept at steps 0, 1, 2, 4, 8, ... and
then every eval_interval (checkpoint.py describes their contents).
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import batchmetrics
from checkpoint import (FORMAT_VERSION, ckpt_path, latest_checkpoint, list_checkpoints,
                        load_checkpoint, save_checkpoint)
from common import (UserError, auto_device, auto_dtype, autocast_ctx, git_commit, library_versions,
                    main_guard, parse_config, write_json_atomic)
from model import ModelArgs, Transformer, mean_loss
from schedule import STRATEGIES, Schedule, get_lr, rank_micro_batches
from data import DATA_DIR, TABLES_DIR, BatchData


# -----------------------------------------------------------------------------
# config (every field can be set with --key=value or a .json file)
@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data_dir: str = str(DATA_DIR)
    model_bin: str = "model.bin"  # llama2.c model written at the end ('' to skip)
    eval_interval: int = 100  # checkpoint + eval every this many steps...
    log_spaced: bool = True  # ...and at 0, 1, 2, 4, 8, ... below it (Pythia)
    log_interval: int = 10
    eval_iters: int = 8  # batches of batch_size for each loss estimate
    export_ckpt_bins: bool = False  # also write <out_dir>/ckpt/model_<iter>.bin
    init_from: str = "scratch"  # 'scratch' or 'resume'
    show_batches: int = -1  # >= 0: print the batches of this step and exit
    # wandb (optional)
    wandb_log: bool = False
    wandb_project: str = "llama2_prebiasing"
    wandb_run_name: str = ""
    # data
    batch_size: int = 16
    max_seq_len: int = 256
    vocab_size: int = 512
    # schedule (the order of batches)
    seed: int = 1337
    schedule: str = "shuffle"
    schedule_metric: str = ""  # a column of batch_metrics.csv, for sorted/filter
    schedule_order: str = "asc"
    schedule_lo: float = -math.inf
    schedule_hi: float = math.inf
    tables_dir: str = str(TABLES_DIR)  # where batch_metrics.csv lives
    # model
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    multiple_of: int = 32
    dropout: float = 0.0
    # optimizer
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-3  # right for the tiny default; config/stories15M.json uses 5e-4
    max_iters: int = 500
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    decay_lr: bool = True
    warmup_iters: int = 50
    min_lr: float = 0.0  # 0: learning_rate / 10
    # system
    device: str = "auto"
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto
    compile: bool = False
    peak_flops: float = 0.0  # for MFU; 0: a known GPU's bf16 peak, or measured on CPU


CHOICES = {"init_from": ("scratch", "resume"), "schedule": STRATEGIES,
           "schedule_order": ("asc", "desc"), "dtype": ("auto", "float32", "bfloat16", "float16")}
# fields that define the run: a resume must not change them
RUN_DEFINING = ("batch_size", "max_seq_len", "vocab_size", "seed", "schedule", "schedule_metric",
                "schedule_order", "schedule_lo", "schedule_hi", "dim", "n_layers", "n_heads",
                "n_kv_heads", "multiple_of", "gradient_accumulation_steps")
# -----------------------------------------------------------------------------


def model_args(cfg: TrainConfig) -> ModelArgs:
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of,
                     max_seq_len=cfg.max_seq_len, dropout=cfg.dropout)


def checkpoint_steps(max_iters: int, eval_interval: int, log_spaced: bool = True) -> list[int]:
    """0, 1, 2, 4, ... (< eval_interval), then multiples of eval_interval, and max_iters."""
    steps = {0, max_iters}
    if log_spaced:
        s = 1
        while s < min(eval_interval, max_iters):
            steps.add(s)
            s *= 2
    steps.update(range(eval_interval, max_iters, eval_interval))
    return sorted(steps)


def build_schedule(cfg: TrainConfig, data: BatchData) -> Schedule:
    B = cfg.batch_size * cfg.gradient_accumulation_steps
    metric = None
    if cfg.schedule != "shuffle":
        if not cfg.schedule_metric:
            raise UserError(f"--schedule={cfg.schedule} needs --schedule_metric=<a batch metric>")
        metric = batchmetrics.load_metric_column(cfg.tables_dir, cfg.schedule_metric, data)[data.train_ids]
    try:
        return Schedule(data.train_ids, B, cfg.schedule, cfg.seed, metric, cfg.schedule_metric,
                        cfg.schedule_order, cfg.schedule_lo, cfg.schedule_hi)
    except ValueError as e:
        raise UserError(str(e)) from None


def peak_flops(device: str, dtype: str) -> float:
    """bf16 dense peak of known GPUs; on CPU, a measured matmul rate in the run's dtype."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                          ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)):
            if key in name:
                return peak
        return 312e12
    n, best = 1024, math.inf
    a, b = torch.randn(n, n), torch.randn(n, n)
    with autocast_ctx("cpu", dtype):
        for _ in range(20):  # best of 20: the machine's ceiling, not its noise
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Trainer:
    """The training loop's state: model, optimizer, data, schedule and DDP layout."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank, self.world = 0, 1
        self.device = auto_device(cfg.device)
        if self.ddp:
            import torch.distributed as dist
            dist.init_process_group(backend="nccl" if self.device == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device == "cuda":
                self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(self.device)
        self.master = self.rank == 0
        if cfg.gradient_accumulation_steps % self.world:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
                            f"multiple of the world size {self.world}")
        self.micro_steps = cfg.gradient_accumulation_steps // self.world
        self.dtype = auto_dtype(cfg.dtype, self.device)
        self.ctx = autocast_ctx(self.device, self.dtype)
        self.data = BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len)
        self.schedule = build_schedule(cfg, self.data)
        # fixed evaluation sets: the first val batches, and a seeded sample of train batches
        n_eval = cfg.eval_iters * cfg.batch_size
        self.val_ids = self.data.val_ids[:n_eval]
        rng = np.random.default_rng([cfg.seed, 7])
        self.train_eval_ids = np.sort(rng.choice(self.data.train_ids, min(n_eval, len(self.data.train_ids)),
                                                 replace=False))
        if len(self.val_ids) == 0:
            raise UserError(f"no validation batches (shard 0 of {self.data.dir} is shorter than "
                            f"max_seq_len={cfg.max_seq_len})")
        torch.manual_seed(cfg.seed)
        self.model = Transformer(model_args(cfg)).to(self.device)
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                         (cfg.beta1, cfg.beta2), self.device.split(":")[0])
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == "float16")
        self.iter_num, self.prev_ckpt = 0, -1
        self.pending_ids: list[np.ndarray] = []  # ids per step since the last checkpoint
        if cfg.init_from == "resume":
            self._resume()
        self.raw_model = self.model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[self.device] if self.device.startswith("cuda") else None)
        self.mfu_peak = cfg.peak_flops or peak_flops(self.device, self.dtype)

    def _resume(self):
        ck = load_checkpoint(latest_checkpoint(self.cfg.out_dir), map_location=self.device)
        for k in RUN_DEFINING:
            if ck["config"].get(k) != getattr(self.cfg, k):
                raise UserError(f"checkpoint in {self.cfg.out_dir} was trained with {k}="
                                f"{ck['config'].get(k)!r}, not {getattr(self.cfg, k)!r}: pass the same "
                                "value, or use another --out_dir to start a new run")
        if ck["data"]["tokenizer_sha256"] != self.data.meta["tokenizer_sha256"]:
            raise UserError(f"the checkpoints in {self.cfg.out_dir} were trained on data of another tokenizer "
                            "than the current batch index: re-pretokenize with that tokenizer or start a new --out_dir")
        if ck["schedule"]["fingerprint"] != self.schedule.fingerprint():
            raise UserError(f"the data or schedule changed since the checkpoints in {self.cfg.out_dir} "
                            "were written (fingerprint mismatch); re-pretokenize the same data or start "
                            "a new --out_dir")
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError:
            raise UserError(f"checkpoint in {self.cfg.out_dir} holds another model shape") from None
        self.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu())
        self.iter_num = self.prev_ckpt = ck["iter_num"]
        if self.master:
            print(f"resuming from {self.cfg.out_dir} at step {self.iter_num}")

    # -------------------------------------------------------------------------

    def log(self, line: str):
        """One greppable line, to stdout and to <out_dir>/train.log (rank 0 only)."""
        print(line, flush=True)
        with open(Path(self.cfg.out_dir) / "train.log", "a") as f:
            f.write(line + "\n")

    def estimate_loss(self, ids: np.ndarray) -> float:
        return mean_loss(self.raw_model, self.data, ids, self.cfg.batch_size, self.device, self.ctx)

    def checkpoint(self):
        cfg = self.cfg
        val_loss = self.estimate_loss(self.val_ids)
        train_loss = self.estimate_loss(self.train_eval_ids)
        B = self.schedule.B
        ids = np.stack(self.pending_ids) if self.pending_ids else np.zeros((0, B), dtype=np.int64)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        obj = {
            "format_version": FORMAT_VERSION,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_args": self.raw_model.params.to_dict(),
            "config": dataclasses.asdict(cfg),
            "iter_num": self.iter_num,
            "prev_iter": self.prev_ckpt,
            "batch_ids": torch.from_numpy(ids),
            "schedule": {"strategy": self.schedule.desc, "fingerprint": self.schedule.fingerprint(),
                         "batches_per_step": B},
            "data": {"vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
                     "tokenizer_sha256": self.data.meta["tokenizer_sha256"], "n_batches": len(self.data)},
            "rng": rng,
            "train_loss": train_loss,
            "val_loss": val_loss,
        }
        path = ckpt_path(cfg.out_dir, self.iter_num)
        save_checkpoint(obj, path)
        if cfg.export_ckpt_bins:
            from export import export_v0
            export_v0(self.raw_model, path.with_name(f"model_{self.iter_num}.bin"))
        self.pending_ids, self.prev_ckpt = [], self.iter_num
        self.log(f"step:{self.iter_num}/{cfg.max_iters} train_loss:{train_loss:.4f} val_loss:{val_loss:.4f} "
                 f"ckpt:{path}")
        return val_loss

    def train(self):
        cfg = self.cfg
        ckpt_steps = set(checkpoint_steps(cfg.max_iters, cfg.eval_interval, cfg.log_spaced))
        tokens_per_step = self.schedule.B * cfg.max_seq_len
        flops_per_step = self.raw_model.flops_per_token() * tokens_per_step
        wandb = None
        if cfg.wandb_log and self.master:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_log=True needs wandb: pip install wandb") from None
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg))
        if self.master and self.iter_num in ckpt_steps and not ckpt_path(cfg.out_dir, self.iter_num).exists():
            self.checkpoint()
        t0, n_timed = time.perf_counter(), 0
        while self.iter_num < cfg.max_iters:
            lr = get_lr(self.iter_num, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            step_ids = self.schedule.step_ids(self.iter_num)
            loss = self.train_step(step_ids)
            self.pending_ids.append(step_ids)
            self.iter_num += 1
            n_timed += 1
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {self.iter_num}; the last good checkpoint "
                                f"is kept in {cfg.out_dir}/ckpt: lower --learning_rate and resume")
            if self.iter_num % cfg.log_interval == 0 and self.master:
                dt = (time.perf_counter() - t0) / n_timed
                tps = tokens_per_step / dt
                mfu = flops_per_step / dt / self.mfu_peak
                self.log(f"step:{self.iter_num}/{cfg.max_iters} loss:{loss:.4f} lr:{lr:.2e} "
                         f"ms:{dt * 1000:.1f} tok/s:{tps:.0f} mfu:{100 * mfu:.1f}")
                if wandb:
                    wandb.log({"iter": self.iter_num, "loss": loss, "lr": lr, "tok_per_s": tps, "mfu": mfu})
                t0, n_timed = time.perf_counter(), 0
            if self.iter_num in ckpt_steps and self.master:
                val = self.checkpoint()
                if wandb:
                    wandb.log({"iter": self.iter_num, "val_loss": val})
                t0, n_timed = time.perf_counter(), 0
        if self.master and cfg.model_bin:
            from export import export_v0
            export_v0(self.raw_model, cfg.model_bin)
            print(f"wrote {cfg.model_bin}")
        if wandb:
            wandb.finish()
        if self.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()

    def train_step(self, step_ids: np.ndarray) -> float:
        """One optimizer step over this rank's slice of step_ids; returns the mean loss
        of the step's micro-batches (over all ranks under DDP)."""
        micro = rank_micro_batches(step_ids, self.rank, self.world, self.micro_steps)
        total = torch.zeros((), device=self.device)
        for k, ids in enumerate(micro):
            x, y = self.data.get(ids)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.ddp:  # sync gradients on the last micro-step only
                self.model.require_backward_grad_sync = k == self.micro_steps - 1
            with self.ctx:
                _, loss = self.model(x, y)
                loss = loss / self.micro_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ddp:
            import torch.distributed as dist
            dist.all_reduce(total)  # SUM: gloo has no AVG, so one path for both backends
            total /= self.world
        return float(total)


def write_run_record(cfg: TrainConfig):
    out = Path(cfg.out_dir)
    write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
    write_json_atomic(out / "run.json", {"commit": git_commit(), "versions": library_versions(),
                                         "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def show_batches(cfg: TrainConfig, step: int):
    """Print the ids and decoded text of one step, as Pythia's batch viewer: from the
    checkpoints when they recorded it, else from the schedule."""
    from checkpoint import batch_ids_by_checkpoint
    from tokenizer import Tokenizer
    data = BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len)
    ids, source = None, "schedule"
    if list_checkpoints(cfg.out_dir):
        start = 0
        for it, rec in batch_ids_by_checkpoint(cfg.out_dir).items():
            if start <= step < it:
                ids, source = rec[step - start].numpy(), f"checkpoint ckpt_{it}.pt"
            start = it
    if ids is None:
        ids = build_schedule(cfg, data).step_ids(step)
    enc = Tokenizer.for_vocab(cfg.vocab_size, cfg.data_dir)
    print(f"step {step}: {len(ids)} batches (from the {source})")
    for i in ids:
        r = data.index[i]
        text = enc.decode(data.window(int(i))).replace("\n", " ")
        print(f"batch_id:{i} shard:{r['shard']} offset:{r['offset']} stories:{r['story_first']}-"
              f"{r['story_last']} | {text[:160]}")
    return ids


def load_run_config(argv) -> TrainConfig:
    """Defaults < the run's saved config.json (on resume / show_batches) < argv.
    A resume continues to the saved max_iters unless --max_iters says otherwise (the
    cosine schedule then follows the new max_iters from the resumed step on)."""
    cfg = parse_config(TrainConfig(), argv, CHOICES)
    saved = Path(cfg.out_dir) / "config.json"
    if (cfg.init_from == "resume" or cfg.show_batches >= 0) and saved.exists():
        base = TrainConfig()
        for k, v in json.loads(saved.read_text()).items():
            if hasattr(base, k):
                setattr(base, k, v)
        for k in ("init_from", "show_batches"):
            setattr(base, k, TrainConfig.__dataclass_fields__[k].default)
        cfg = parse_config(base, argv, CHOICES)
    return cfg


def main(argv=None):
    cfg = load_run_config(sys.argv[1:] if argv is None else argv)
    if cfg.show_batches >= 0:
        return show_batches(cfg, cfg.show_batches)
    if cfg.init_from == "scratch" and list_checkpoints(cfg.out_dir):
        raise UserError(f"{cfg.out_dir} already holds checkpoints: use --init_from=resume to continue, "
                        "or another --out_dir")
    trainer = Trainer(cfg)
    if trainer.master:
        write_run_record(cfg)
        n = sum(p.numel() for p in trainer.raw_model.parameters())
        print(f"{n / 1e6:.2f}M parameters, {trainer.device}/{trainer.dtype}, "
              f"{trainer.schedule.B} batches/step ({trainer.schedule.B * cfg.max_seq_len} tokens), "
              f"schedule {trainer.schedule.desc}, {trainer.schedule.n} training batches")
    trainer.train()
    return trainer


if __name__ == "__main__":
    main_guard(main)
