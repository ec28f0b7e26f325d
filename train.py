"""
Pretrain a Llama-2 model on the pretokenized TinyStories batches, recording exactly
what every checkpoint has seen.

$ python train.py                                   # tiny default config, CPU-friendly
$ python train.py --max_iters=2000 --out_dir=out/shuffle_s2 --seed=2
$ python train.py config/stories15M.json            # llama2.c's 15M model (GPU)
$ python train.py --init_from=resume                # continue the same schedule exactly
$ python train.py --init_from=out/hf_import/ckpt/ckpt_0.pt --out_dir=out/cont   # continued pretraining
$ python train.py --export_version=2                # the final model as int8 model_q80.bin (./runq)
$ python train.py --schedule=sorted --schedule_metric=fk_grade --out_dir=out/curriculum
$ python train.py --schedule_spec=config/schedules/competence.json --out_dir=out/competence
$ python train.py --tags=config/tags/canary.json --out_dir=out/canary
$ python train.py --select=rho --select_pool=4 --out_dir=out/rho
$ python train.py --holdout=only --max_iters=100 --out_dir=out/ref   # an irreducible-loss model on the holdout
$ python train.py --select=rho --select_pool=4 --select_ref=out/ref/ckpt/ckpt_100.pt --out_dir=out/rho_ref
$ python train.py --show_batches=12                 # ids + text of step 12 (batch_viewer.py)
$ python train.py --train_mask=ids.npy --out_dir=out/masked   # those batches' rows weigh 0, all else in place
$ python train.py --train_weights=w.npy --out_dir=out/weighted   # row r of step s weighs w[s, r] (steps, B)
$ torchrun --standalone --nproc_per_node=4 train.py config/stories15M.json

What a step trains on is one stream (stream.py): the schedule's ids (schedule.py: a
spec of phases, or the flat --schedule flags) -> optional online selection -> optional
tag insertion. An optimizer step consumes batch_size * gradient_accumulation_steps
batches (gradient_accumulation_steps counts over all ranks, as in llama2.c: each of W
ranks does 1/W of them), so a step sees the same ids at any world size. Checkpoints
are kept at steps 0, 1, 2, 4, 8, ... and then every eval_interval (checkpoint.py
describes their contents); <out_dir>/batch_ids.npy keeps the ids as plain numpy.

A run owns its out_dir for its whole life (out_dir/.lock); config.json and run.json
record how it started, history.jsonl each start and resume with what changed.
--init_from=<ckpt> starts a new run from another checkpoint's weights and shape (one of
this toolkit's, or one export.py imported from Hugging Face or a llama2.c .bin): every
checkpoint of the run records where they came from (path, sha256, step, and that
checkpoint's own source), and its batch ids are the ones trained here. Each
checkpoint also records the run's compute so far (prebias/compute.py: FLOPs of training,
of selection's scoring and of the irreducible-loss model, and wall-clock) and its
holdout (which training batches were held out, and whether the run left them out).
"""

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from export import export_model
from model import ModelArgs, Transformer, mean_loss
from prebias import common, tracking
from prebias.checkpoint import (IDENTITY, build_checkpoint, check_resume, ckpt_dir, ckpt_path, latest_checkpoint,
                                list_checkpoints, load_checkpoint, load_optimizer, optimizer_path, save_checkpoint,
                                save_optimizer, source_record, stream_records)
from prebias.common import (FolderLock, UserError, atomic_path, auto_device, auto_dtype, autocast_ctx, git_commit,
                            library_versions, main_guard, parse_config, write_json_atomic)
from prebias.compute import ComputeRecord
from prebias.configs import TRAIN_CHOICES as CHOICES
from prebias.configs import TrainConfig, check_train
from prebias.data import BatchData
from prebias.paths import CONFIG, RECORD_FILES, RUN, RunPaths
from prebias.schedule import get_lr, rank_micro_batches
from prebias.stream import build_stream, save_holdout_ids, stream_fingerprint, stream_provenance
from tokenizer import tokenizer_model_path

# -----------------------------------------------------------------------------
# config: TrainConfig (prebias/configs.py) holds every key with its default and why;
# --key=value or a .json file sets them, python train.py --help lists them
# fields that define the run: a resume must not change them (the schedule spec, tags and
# exclusions are checked by content, through the stream's fingerprint)
RUN_DEFINING = ("batch_size", "max_seq_len", "vocab_size", "seed", "dim", "n_layers", "n_heads",
                "n_kv_heads", "multiple_of", "gradient_accumulation_steps", "select", "select_pool",
                "select_ref", "select_metric", "select_target")
# -----------------------------------------------------------------------------


def validate(cfg: TrainConfig):
    """Nonsense values get one line before anything is written: the values alone
    (configs.check_train, which experiment.py runs on a spec too), then the memory."""
    check_train(cfg)
    check_fits_memory(cfg)


def param_count(a: ModelArgs) -> int:
    """The model's parameters (model.py's Transformer), counted without building it."""
    kv = a.n_kv_heads * (a.dim // a.n_heads)
    layer = 2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.hidden_dim + 2 * a.dim
    return a.vocab_size * a.dim * (1 if a.shared_classifier else 2) + a.n_layers * layer + a.dim


def check_fits_memory(cfg: TrainConfig):
    """A model whose float32 weights, gradients and AdamW moments (16 bytes a parameter)
    exceed the device's whole memory is refused before anything is allocated or written."""
    n = param_count(model_args(cfg))
    device = auto_device(cfg.device)
    if device.startswith("cuda") and torch.cuda.is_available():
        total, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, device
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine"
    else:
        return
    if 16 * n > total:
        shape = " ".join(f"--{k}={getattr(cfg, k)}" for k in ("dim", "n_layers", "vocab_size"))
        raise UserError(f"{shape} make a model of {n:.3g} parameters: training it needs about {16 * n / 2**30:.3g} "
                        f"GiB (weights, gradients and AdamW moments in float32), more than the "
                        f"{total / 2**30:.3g} GiB of {where}: use a smaller --dim, --n_layers or --vocab_size")


def export_name(version: str, iter_num: int | None = None) -> str:
    """model.bin (versions 0, 1), model_q80.bin (2) or hf (a folder), with _<iter> per checkpoint."""
    base = {"2": "model_q80", "hf": "hf"}.get(version, "model")
    return base + ("" if iter_num is None else f"_{iter_num}") + ("" if version == "hf" else ".bin")


def default_model_bin(cfg: TrainConfig) -> str:
    if cfg.model_bin:
        return "" if cfg.model_bin == "none" else cfg.model_bin
    name = export_name(cfg.export_version)
    return name if Path(cfg.out_dir) == Path("out") and cfg.export_version != "hf" else str(Path(cfg.out_dir) / name)


def given_keys(argv) -> set[str]:
    """The config keys argv sets (--key=value, or the keys of a .json config file)."""
    keys = set()
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            keys.add(arg[2:].split("=", 1)[0])
        elif arg.endswith(".json"):  # parse_config has read it already
            keys.update(common.json_loads(Path(arg).read_text()))
    return keys


def init_source(cfg: TrainConfig, given=()) -> tuple[dict, dict] | None:
    """--init_from=<ckpt>: (its checkpoint, the source record); the run takes its shape
    (vocab_size included: it decides the data), so config.json says what is trained. A
    shape key in `given` (set by the command line) that says otherwise is refused."""
    if cfg.init_from in ("scratch", "resume"):
        return None
    ck = load_checkpoint(cfg.init_from)
    a = ck["model_args"]
    if cfg.max_seq_len > a["max_seq_len"]:
        raise UserError(f"--max_seq_len={cfg.max_seq_len} is longer than the {a['max_seq_len']} positions of "
                        f"{cfg.init_from}: use --max_seq_len={a['max_seq_len']} or less")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        if k in given and getattr(cfg, k) != a[k]:
            raise UserError(f"--{k}={getattr(cfg, k)} but {cfg.init_from} has {k}={a[k]}: drop --{k} (a run "
                            "continued from a checkpoint takes its shape)")
        setattr(cfg, k, a[k])
    return ck, source_record(cfg.init_from, ck)


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


# -----------------------------------------------------------------------------

def peak_flops(device: str, dtype: str) -> float:
    """bf16 dense peak of known GPUs; on CPU, a measured matmul rate in the run's dtype.
    Its random matrices come from a generator of their own: nothing outside training
    may draw from the training RNG (resume exactness)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                          ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)):
            if key in name:
                return peak
        return 312e12
    n, best = 1024, math.inf
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    with autocast_ctx("cpu", dtype):
        for _ in range(20):  # best of 20: the machine's ceiling, not its noise
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def remove_stale_temps(out_dir):
    """Temp files of a save that a kill interrupted, of the files train.py writes only."""
    common.remove_stale_temps(out_dir, r"(config|run|batch_ids|pool_ids|insertions|masked_rows|weighted_rows)\.(json|npy|npz)"
                                       r"|model\.bin")
    common.remove_stale_temps(ckpt_dir(out_dir), r"(ckpt|optimizer)_\d+\.pt|model_\d+\.bin")


class Trainer:
    """The training loop's state: model, optimizer, data, stream and DDP layout."""

    def __init__(self, cfg: TrainConfig, init: tuple[dict, dict] | None = None):
        self.cfg = cfg
        self.init = init[1] if init else {}  # where the step-0 weights came from (checkpoint.py: init)
        self.notes = []  # warnings of the start, for train.log once the run's record is written
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
        if self.device == "cpu":
            torch.set_flush_denormal(cfg.flush_denormal)
            common.keep_freed_memory()  # no fresh pages for each step's activations (~5% of a 15M step)
        self.data = BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len)
        self.stream = build_stream(cfg, self.data, self.device, self.ctx)
        self.schedule = self.stream.schedule
        # fixed evaluation sets: the first val batches, and a seeded sample of train batches
        n_eval = cfg.eval_iters * cfg.batch_size
        self.val_ids = self.data.val_ids[:n_eval]
        rng = np.random.default_rng([cfg.seed, 7])
        pool = self.schedule.run_ids  # the training batches (less the holdout where the run leaves it out)
        self.train_eval_ids = np.sort(rng.choice(pool, min(n_eval, len(pool)), replace=False))
        if len(self.val_ids) == 0:
            raise UserError(f"no validation batches (shard 0 of {self.data.dir} is shorter than "
                            f"max_seq_len={cfg.max_seq_len})")
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self._model_args(init)).to(self.device)
        if init:
            self._start_from(init[0])
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                         (cfg.beta1, cfg.beta2), self.device.split(":")[0])
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == "float16")
        self.iter_num, self.prev_ckpt, saved_compute = 0, -1, None
        self.mfu_peak = cfg.peak_flops or peak_flops(self.device, self.dtype)  # before resume restores the RNG
        if cfg.init_from == "resume":
            saved_compute = self._resume()
        irr = self.stream.selector.irreducible if self.stream.selector else None
        self.compute = ComputeRecord(self.model, irr.model if irr else None, irr.fit_flops if irr else 0.0,
                                     irr.fit_s if irr else 0.0, saved_compute, self.iter_num)
        self.raw_model = self.model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[self.device] if self.device.startswith("cuda") else None)

    def _model_args(self, init) -> ModelArgs:
        """The config's shape; the shape of the weights the run continues from (an init or
        resumed checkpoint: it may hold a hidden_dim or a separate classifier, which the
        config has no key for), with this run's max_seq_len and dropout."""
        ck = init[0] if init else None
        if self.cfg.init_from == "resume" and list_checkpoints(self.cfg.out_dir):
            ck = load_checkpoint(latest_checkpoint(self.cfg.out_dir))
        if ck is None:
            return model_args(self.cfg)
        return ModelArgs.from_dict({**ck["model_args"], "max_seq_len": self.cfg.max_seq_len,
                                    "dropout": self.cfg.dropout})

    def _start_from(self, ck: dict):
        """--init_from=<ckpt>: its weights, on data of the tokenizer it was trained with."""
        want = ck.get("data", {}).get("tokenizer_sha256", "")
        if want and want != self.data.meta["tokenizer_sha256"]:
            raise UserError(f"{self.cfg.init_from} was trained with another tokenizer than the data in "
                            f"{self.data.dir}: pretokenize with its tokenizer (for a Hugging Face import, "
                            "pretokenize --vocab_size=0 --tokenizer=<folder>/tokenizer.model)")
        self.model.load_state_dict(ck["model"])

    def _resume(self):
        ck = load_checkpoint(latest_checkpoint(self.cfg.out_dir), map_location=self.device)
        if ck["schedule"].get("imported"):
            raise UserError(f"{self.cfg.out_dir} holds an imported model, not a training run: train from it with "
                            f"--init_from={ckpt_path(self.cfg.out_dir, ck['iter_num'])} --out_dir=<a new folder>")
        self.init = ck.get("init", {})
        check_resume(ck, dataclasses.asdict(self.cfg), RUN_DEFINING, self.data.meta["tokenizer_sha256"],
                     stream_fingerprint(self.stream, legacy="holdout" not in ck["schedule"]), self.cfg.out_dir)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError:
            raise UserError(f"checkpoint in {self.cfg.out_dir} holds another model shape") from None
        opt = optimizer_path(self.cfg.out_dir, ck["iter_num"])
        if not opt.exists():
            raise UserError(f"{opt} is missing: the optimizer state of the latest checkpoint is needed to resume "
                            "exactly; restore it or start a new --out_dir")
        state, note = load_optimizer(opt, ck, self.optimizer)  # only the file saved with ck, of the model's shapes
        try:
            self.optimizer.load_state_dict(state)
        except Exception as e:  # another optimizer's state (key or group errors)
            raise UserError(f"{opt} cannot be read as this run's optimizer state ({type(e).__name__}): it is damaged "
                            "or belongs to another run; restore it, or resume from an earlier checkpoint whose "
                            "optimizer file you keep (--keep_optimizer=True keeps them all)") from None
        if note:
            self.notes.append(note)
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu())
        self.iter_num = self.prev_ckpt = ck["iter_num"]
        if self.master:
            print(f"resuming from {self.cfg.out_dir} at step {self.iter_num}")
        return ck.get("compute")

    # -------------------------------------------------------------------------

    def log(self, line: str):
        """One greppable line, to stdout and to <out_dir>/train.log (rank 0 only)."""
        print(line, flush=True)
        with open(RunPaths(self.cfg.out_dir).log, "a") as f:
            f.write(line + "\n")

    def estimate_loss(self, ids: np.ndarray) -> float:
        return mean_loss(self.raw_model, self.data, ids, self.cfg.batch_size, self.device, self.ctx)

    def checkpoint(self):
        cfg = self.cfg
        t0 = time.perf_counter()
        val_loss = self.estimate_loss(self.val_ids)
        train_loss = self.estimate_loss(self.train_eval_ids)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        self.compute.add_checkpoint_time(time.perf_counter() - t0)  # the loss estimates above
        obj = build_checkpoint(
            model=self.raw_model.state_dict(), model_args=self.raw_model.params.to_dict(),
            config=dataclasses.asdict(cfg), iter_num=self.iter_num, prev_iter=self.prev_ckpt,
            record=self.stream.record.arrays(),
            schedule={**self.schedule.record(), "fingerprint": stream_fingerprint(self.stream),
                      "desc": self.schedule.desc, **stream_provenance(self.stream)},
            data_meta={"vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
                       "tokenizer_sha256": self.data.meta["tokenizer_sha256"], "n_batches": len(self.data)},
            rng=rng, train_loss=train_loss, val_loss=val_loss, init=self.init, compute=self.compute.as_dict())
        # the optimizer first: a kill between the two saves leaves the previous pair intact
        save_optimizer(self.optimizer.state_dict(), optimizer_path(cfg.out_dir, self.iter_num), obj)
        path = ckpt_path(cfg.out_dir, self.iter_num)
        save_checkpoint(obj, path)
        if not cfg.keep_optimizer:
            for it, _ in list_checkpoints(cfg.out_dir):
                if it != self.iter_num:
                    optimizer_path(cfg.out_dir, it).unlink(missing_ok=True)
        write_ids_file(cfg.out_dir)
        if cfg.export_ckpt_bins:
            self.export(path.with_name(export_name(cfg.export_version, self.iter_num)), path)
        self.stream.record.clear()
        self.prev_ckpt = self.iter_num
        self.log(f"step:{self.iter_num}/{cfg.max_iters} train_loss:{train_loss:.4f} val_loss:{val_loss:.4f} "
                 f"ckpt:{path}")
        return val_loss

    def train(self):
        cfg = self.cfg
        ckpt_steps = set(checkpoint_steps(cfg.max_iters, cfg.eval_interval, cfg.log_spaced))
        tokens_per_step = self.schedule.B * cfg.max_seq_len
        flops_per_step = self.raw_model.flops_per_token() * tokens_per_step
        wandb = tracking.start(project=cfg.wandb_project, dir=cfg.out_dir, config=dataclasses.asdict(cfg),
                               name=cfg.wandb_run_name, group=cfg.wandb_group, job_type=cfg.wandb_job_type,
                               run_id=cfg.wandb_run_id) if cfg.wandb_log and self.master else None
        if self.master and self.iter_num in ckpt_steps and not ckpt_path(cfg.out_dir, self.iter_num).exists():
            self.checkpoint()
        elif self.master and self.iter_num:  # a resume: the numpy record may lack the last checkpoint (a kill
            write_ids_file(cfg.out_dir)     # after it), even when the run is complete and nothing more trains
        t0, n_timed = time.perf_counter(), 0
        while self.iter_num < cfg.max_iters:
            lr = get_lr(self.iter_num, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t_step = time.perf_counter()
            ids, windows = self.stream.step(self.iter_num, self.raw_model, self.rank, self.world)
            t_sel = time.perf_counter()
            weights = self.stream.row_weights(self.iter_num, ids)  # (B,) --train_weights/--train_mask, or None
            loss = self.train_step(windows) if weights is None else self.train_step(windows, weights)
            scored, ref_scored = self.stream.selector.take_counts() if self.stream.selector else (0, 0)
            self.compute.step(self.schedule.B, scored, ref_scored * self.world, t_sel - t_step,
                              time.perf_counter() - t_sel)
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
                         f"ms:{dt * 1000:.2f} tok/s:{tps:.0f} mfu:{100 * mfu:.1f}")
                if wandb:
                    wandb.log({"iter": self.iter_num, "loss": loss, "lr": lr, "tok_per_s": tps, "mfu": mfu},
                              step=self.iter_num)
                t0, n_timed = time.perf_counter(), 0
            if self.iter_num in ckpt_steps and self.master:
                val = self.checkpoint()
                if wandb:
                    wandb.log({"iter": self.iter_num, "val_loss": val}, step=self.iter_num)
                t0, n_timed = time.perf_counter(), 0
        model_bin = default_model_bin(cfg)
        if self.master and model_bin:
            self.export(model_bin, ckpt_path(cfg.out_dir, self.iter_num))
            print(f"wrote {model_bin}")
        if wandb:
            wandb.finish()
        if self.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()

    def export(self, path, ckpt):
        """The model as --export_version says (a Hugging Face folder gets the run's tokenizer
        and, in its metadata, the checkpoint it was written from)."""
        v = self.cfg.export_version
        tok = tokenizer_model_path(self.cfg.vocab_size, self.cfg.data_dir) if v == "hf" else None
        export_model(self.raw_model, path, v, tok, {"kind": "run", "checkpoint": str(Path(ckpt).resolve()),
                                                    "iter_num": self.iter_num, "init": self.init})

    def train_step(self, windows: np.ndarray, weights: np.ndarray | None = None) -> float:
        """One optimizer step over this rank's slice of the step's windows (B, T+1);
        returns the mean loss of the step's micro-batches (over all ranks under DDP).
        weights (B,) float: each row's loss weight (--train_weights; 0 where --train_mask
        masks), the denominator unchanged (sum of the rows' weighted token losses / (B x T)),
        so a weight scales that row's gradient term alone; None (every row weighs 1) takes
        the plain path, bitwise the run without weights."""
        micro = rank_micro_batches(windows, self.rank, self.world, self.micro_steps)  # (micro, bs, T+1)
        row_w = None if weights is None else rank_micro_batches(weights, self.rank, self.world, self.micro_steps)
        total = torch.zeros((), device=self.device)
        for k, w in enumerate(micro):
            w = torch.from_numpy(np.ascontiguousarray(w))
            x, y = w[:, :-1].to(self.device, non_blocking=True), w[:, 1:].to(self.device, non_blocking=True)
            if self.ddp:  # sync gradients on the last micro-step only
                self.model.require_backward_grad_sync = k == self.micro_steps - 1
            with self.ctx:
                if row_w is None:
                    _, loss = self.model(x, y)
                else:
                    loss = weighted_loss(self.model(x)[0], y, torch.from_numpy(row_w[k]).to(self.device))
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


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The mean token loss with row i weighted w[i] (bs,) and the denominator unchanged
    (all bs x T tokens): reweighting (or removing, w = 0) a row leaves the others' terms."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (bs, T)
    return (ce * w[:, None].to(ce.dtype)).sum() / ce.numel()


def write_ids_file(out_dir):
    """<out_dir>/batch_ids.npy: every trained step's ids (steps, B) as plain numpy, from
    the checkpoints (Pythia keeps its order as data); pool_ids.npy, insertions.npz,
    masked_rows.npy ([step, row] trained with weight 0) and weighted_rows.npy ([step, row,
    weight], float64) too where selection, tags, a --train_mask or --train_weights ran.
    batch_ids.npy goes last: when its steps are the latest checkpoint's, the others were
    written from the same checkpoints (a kill in between leaves it stale, which its reader
    and a resume see); insertions.npz also says its steps (n_steps)."""
    rec, paths = stream_records(out_dir), RunPaths(out_dir)
    if rec["pool_ids"].size:
        with atomic_path(paths.pool_ids) as tmp, open(tmp, "wb") as f:
            np.save(f, rec["pool_ids"], allow_pickle=False)
    if len(rec["masked_rows"]):
        with atomic_path(paths.masked_rows) as tmp, open(tmp, "wb") as f:
            np.save(f, rec["masked_rows"], allow_pickle=False)
    if len(rec["weighted_rows"]):
        with atomic_path(paths.weighted_rows) as tmp, open(tmp, "wb") as f:
            np.save(f, rec["weighted_rows"], allow_pickle=False)
    if len(rec["insertions"]):
        with atomic_path(paths.insertions) as tmp, open(tmp, "wb") as f:
            np.savez(f, insertions=rec["insertions"], insert_tokens=rec["insert_tokens"],
                     replaced_tokens=rec["replaced_tokens"], columns=np.array("step,row,pos,tag,n_tokens,mode"),
                     n_steps=np.int64(len(rec["batch_ids"])))
    with atomic_path(paths.batch_ids) as tmp, open(tmp, "wb") as f:
        np.save(f, rec["batch_ids"], allow_pickle=False)


def _record_damage(path: Path, keys=()) -> str:
    """What is wrong with a JSON record of the run ('' when nothing is)."""
    try:
        obj = common.json_loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not valid JSON ({type(e).__name__})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    missing = [k for k in keys if k not in obj]
    return f"lacking {missing[0]!r}" if missing else ""


def check_record_files(out_dir) -> None:
    """The files a run appends to or rewrites must be plain files where they exist: a
    folder or a link in their place fails (or writes elsewhere) after the run has begun."""
    for name in RECORD_FILES:
        p = Path(out_dir) / name
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise UserError(f"{p} is {'a link' if p.is_symlink() else 'not a plain file'}: the run writes its record "
                            "there; move it away (a resume rebuilds what it can) or use another --out_dir")


def rebuilt_records(out_dir) -> dict:
    """On resume: {name: content} for config.json and run.json when missing or damaged,
    rebuilt from what recorded the same thing at the same moment (so the record stays
    true): config.json from the first checkpoint's config (step 0 saved the config the
    run started with), run.json from history.jsonl's start line (the same fields). A
    record with nothing to rebuild it from is refused with one line."""
    paths, rebuilt = RunPaths(out_dir), {}
    why = _record_damage(paths.config, IDENTITY)
    if why:
        it, first = list_checkpoints(out_dir)[0]
        ck = load_checkpoint(first)
        if ck["prev_iter"] != -1:
            raise UserError(f"{paths.config} is {why} and {first} is not the run's first checkpoint, so the "
                            "config it started with is lost: restore config.json from a copy, or start a new --out_dir")
        rebuilt[CONFIG] = dict(ck["config"])
    why = _record_damage(paths.run, ("commit", "argv", "time"))
    if why:
        start = None
        if paths.history.exists():
            for line in paths.history.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if isinstance(entry := json.loads(line), dict) and entry.get("event") == "start":
                        start = entry
                        break
        if start is None:
            raise UserError(f"{paths.run} is {why} and history.jsonl has no start line to rebuild it from "
                            "(its commit, versions and command are in no checkpoint): restore run.json from a copy, "
                            "or start a new --out_dir")
        rebuilt[RUN] = {k: v for k, v in start.items() if k not in ("event", "changed", "rebuilt")}
    return rebuilt


def write_run_record(cfg: TrainConfig, resumed_from: dict | None, init: dict | None = None, rebuilt=None):
    """config.json and run.json once, at the start; history.jsonl gets a line per start
    and resume, with what a resume changed (the originals are never overwritten; a
    damaged one is rewritten from `rebuilt`, rebuilt_records, and the line says so)."""
    paths = RunPaths(cfg.out_dir)
    now = dataclasses.asdict(cfg)
    run = {"commit": git_commit(), "versions": library_versions(), "argv": sys.argv,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"init": init} if init else {})}
    if resumed_from is None:
        write_json_atomic(paths.config, now)
        write_json_atomic(paths.run, run)
    for name, obj in (rebuilt or {}).items():
        write_json_atomic(paths.dir / name, obj)
    changed = {k: [v, now.get(k)] for k, v in (resumed_from or {}).items()
               if k not in ("init_from", "show_batches") and v != now.get(k)}
    entry = {**run, "event": "resume" if resumed_from is not None else "start", "changed": changed,
             **({"rebuilt": sorted(rebuilt)} if rebuilt else {})}
    with open(paths.history, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    return changed


def load_run_config(argv) -> tuple[TrainConfig, dict | None]:
    """(config, the config it resumes from or None). Defaults < the run's config as it
    stands (its latest checkpoint, on resume / show_batches) < argv. A resume continues
    to the saved max_iters unless --max_iters says otherwise (the cosine schedule then
    follows the new max_iters from the resumed step on)."""
    cfg = parse_config(TrainConfig(), argv, CHOICES)
    if not (cfg.init_from == "resume" or cfg.show_batches >= 0) or not list_checkpoints(cfg.out_dir):
        return cfg, None
    saved = dict(load_checkpoint(latest_checkpoint(cfg.out_dir))["config"])
    base = TrainConfig(holdout="keep")  # a run from before the holdout existed trained on every batch
    for k, v in saved.items():
        if hasattr(base, k):
            setattr(base, k, v)
    for k in ("init_from", "show_batches"):
        setattr(base, k, TrainConfig.__dataclass_fields__[k].default)
    return parse_config(base, argv, CHOICES), saved


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, saved = load_run_config(argv)
    init = init_source(cfg, given_keys(argv)) if cfg.show_batches < 0 else None
    validate(cfg)
    if cfg.show_batches >= 0:  # the batch viewer's shortcut
        return subprocess.run([sys.executable, str(Path(__file__).with_name("batch_viewer.py")),
                               f"--out_dir={cfg.out_dir}", f"--step={cfg.show_batches}"]).returncode
    if cfg.init_from == "resume" and saved is None:
        raise UserError(f"nothing to resume in {cfg.out_dir} (no checkpoints): drop --init_from=resume")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = FolderLock(cfg.out_dir, "--out_dir") if rank0 else None
    try:
        if cfg.init_from != "resume" and list_checkpoints(cfg.out_dir):
            raise UserError(f"{cfg.out_dir} already holds checkpoints: use --init_from=resume to continue, "
                            "or another --out_dir")
        if rank0:
            remove_stale_temps(cfg.out_dir)
            check_record_files(cfg.out_dir)
        trainer = Trainer(cfg, init)  # data, stream and model are checked before anything is written
        rebuilt = rebuilt_records(cfg.out_dir) if saved is not None and trainer.master else {}  # reads only
        if trainer.master:
            changed = write_run_record(cfg, saved, trainer.init, rebuilt)
            for name in rebuilt:
                trainer.log(f"resume: {name} was missing or damaged: rebuilt from the run's own record")
            save_holdout_ids(cfg.out_dir, trainer.stream)
            for k, (old, new) in changed.items():
                trainer.log(f"resume: {k} {old!r} -> {new!r}")
            for note in trainer.notes:
                trainer.log(note)
            n = sum(p.numel() for p in trainer.raw_model.parameters())
            print(f"{n / 1e6:.2f}M parameters, {trainer.device}/{trainer.dtype}, "
                  f"{trainer.schedule.B} batches/step ({trainer.schedule.B * cfg.max_seq_len} tokens), "
                  f"schedule {trainer.schedule.desc}, {trainer.schedule.n} training batches")
        trainer.train()
    finally:
        if lock:
            lock.release()
    return trainer


if __name__ == "__main__":
    main_guard(main)
