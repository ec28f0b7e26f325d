"""
The configs of the stages that other stages launch (train.py, eval.py, durability.py):
one dataclass each, every field a --key=value of that command, with its default and
why. experiment.py checks a spec's settings against these fields and attribute.py
retrains with them, so they live in the library rather than in the commands.

$ python train.py --help        # every TrainConfig key with its default
"""

import math
import re
from dataclasses import dataclass

from model import sampling_problem
from prebias.common import SEED, UserError
from prebias.data import DATA_DIR, HOLDOUT_MODES, TABLES_DIR
from prebias.schedule import flat_strategies
from prebias.selection import SCORES
from prebias.tracking import check_wandb_dir


# -----------------------------------------------------------------------------
# train.py
@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data_dir: str = str(DATA_DIR)
    model_bin: str = ""  # llama2.c model written at the end: '' = model.bin at the root for out_dir=out
    #                      (the seed's path), <out_dir>/model.bin otherwise; 'none' to skip
    eval_interval: int = 100  # checkpoint + eval every this many steps...
    log_spaced: bool = True  # ...and at 0, 1, 2, 4, 8, ... below it (Pythia)
    log_interval: int = 10
    eval_iters: int = 8  # batches of batch_size for each loss estimate
    export_ckpt_bins: bool = False  # also write <out_dir>/ckpt/model_<iter>.bin
    export_version: str = "0"  # what model_bin is: llama2.c version 0, 1 (fp32, ./run), 2 (int8, ./runq;
    #                            model_q80.bin by default) or hf (a Hugging Face folder, <out_dir>/hf)
    keep_optimizer: bool = False  # keep the optimizer state of every checkpoint, not only the latest
    init_from: str = "scratch"  # 'scratch', 'resume', or a ckpt_<iter>.pt to continue pretraining from: its
    #                             weights and shape, a new run and schedule from step 0, its source recorded
    show_batches: int = -1  # >= 0: print the batches of this step and exit (batch_viewer.py)
    # wandb (optional)
    wandb_log: bool = False
    wandb_project: str = "llama2_prebiasing"
    wandb_run_name: str = ""
    wandb_group: str = ""  # experiment.py: the experiment
    wandb_job_type: str = ""  # experiment.py: the arm
    wandb_run_id: str = ""  # a fixed id, so later stages (eval) log into the same run
    # data
    batch_size: int = 16
    max_seq_len: int = 256
    vocab_size: int = 512
    # schedule (the order of batches): a spec file, or the flat flags as a one-phase spec
    seed: int = SEED
    schedule_spec: str = ""  # a JSON spec of phases (schedule.py); overrides the flat flags
    schedule: str = "shuffle"
    schedule_metric: str = ""  # a column of batch_metrics.csv, for sorted/filter
    schedule_order: str = "asc"
    schedule_lo: float = -math.inf
    schedule_hi: float = math.inf
    schedule_exclude: str = ""  # a .npy of batch ids never trained on (the rest keep their order)
    train_mask: str = ""  # a .npy of batch ids whose rows get loss weight 0 wherever they are trained: every
    #                       batch keeps its step (in-place removal, attribute.py); recorded per step
    train_weights: str = ""  # a .npy float array (steps, B): the loss weight of row r of step s (B = batch_size x
    #                          gradient_accumulation_steps, rows as batch_ids.npy has them; 1 = as trained, 0 =
    #                          dropped, any real value), the denominator unchanged; weights != 1 recorded per step
    tables_dir: str = str(TABLES_DIR)  # where batch_metrics.csv lives
    # tags and online selection (stream.py)
    tags: str = ""  # a JSON tag file (tags.py): canaries and conditional tags
    select: str = "none"  # none | uniform | loss | rho | metric
    select_pool: int = 1  # K: each step scores K * its batches and keeps the best
    select_ref: str = ""  # rho: a model.bin/.pt for the irreducible loss ('' = batch metrics' ref_nll)
    select_metric: str = ""  # metric: the batch metric to steer by...
    select_target: float = 0.0  # ...toward this value
    holdout: str = "auto"  # the data's holdout (pretokenize --holdout): auto = left out exactly when the run reads
    #                        the reference fitted on it (rho, a ref_* metric); exclude | keep | only (train on it
    #                        alone: the irreducible-loss model for --select_ref)
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
    flush_denormal: bool = True  # CPU: flush subnormal floats to zero (up to 1.3x faster late in a run)
    peak_flops: float = 0.0  # for MFU; 0: a known GPU's bf16 peak, or measured on CPU


# seeds are below 2**63: torch.manual_seed takes 64 bits, and a seed is an int64 in the
# tables (runs.csv) and in numpy arrays
MAX_SEED = 2 ** 63


# the allowed values of some fields (live views: a strategy or score registered later is
# a valid choice at once)
class InitFrom:
    """--init_from's values: 'scratch', 'resume', or the path of a checkpoint (.pt)."""

    def __contains__(self, value) -> bool:
        return value in ("scratch", "resume") or str(value).endswith(".pt")

    def __iter__(self):
        yield from ("scratch", "resume", "<path/to/ckpt_N.pt>")


TRAIN_CHOICES = {"init_from": InitFrom(), "export_version": ("0", "1", "2", "hf"), "schedule": flat_strategies(),
                 "schedule_order": ("asc", "desc"), "dtype": ("auto", "float32", "bfloat16", "float16"),
                 "select": SCORES.choices(extra=("none",)), "holdout": HOLDOUT_MODES}


# -----------------------------------------------------------------------------
# eval.py
@dataclass
class EvalConfig:
    out_dir: str = "out"  # the run folder (config.json, ckpt/)
    data_dir: str = ""  # '' = the run's config.json data_dir
    tables_dir: str = ""  # where batch_metrics.csv lives; '' = the run's config.json tables_dir
    val_batches: int = 64  # the first this many validation batch ids
    batch_size: int = 16  # batches per forward pass for the validation loss
    n_prompts: int = 8  # held-out story prompts (plus "Once upon a time")
    prompt_tokens: int = 8  # story tokens per prompt, after BOS
    max_new_tokens: int = 200
    temperature: float = 0.0  # > 0: also a sampled generation per prompt
    top_p: float = 0.9  # nucleus for the sampled generation (0 or 1: plain sampling)
    seed: int = SEED  # sampling seed (prompt i uses seed + i, as model.generate)
    redo: bool = False  # re-evaluate checkpoints already in the tables
    device: str = "auto"
    wandb_log: bool = False  # log the newly evaluated checkpoints to wandb (into the training run's
    #                          id when train.py had --wandb_run_id, as experiment.py sets it)


# -----------------------------------------------------------------------------
# durability.py
@dataclass
class DurabilityConfig:
    out_dir: str = "out"
    R: int = 1000  # random candidates per canary (exposure, the gap to never-seen secrets)
    n_contexts: int = 8  # canaries: recorded insertions whose trained windows are measured too (0: none)
    R_context: int = 64  # candidates put in the secret's place in each of those windows
    exact_budget: int = 0  # canaries: exact rank among every secret of the format, by branch and bound over
    #                        at most this many prefixes per depth (0: off; ~65536 covers a memorised 6-digit one)
    seed: int = SEED  # candidates' seed
    batch_size: int = 256  # sequences per forward pass
    n_prompts: int = 16  # conditional tags: validation story openings
    n_references: int = 16  # conditional tags: untrained random strings whose spread sets the effect's se
    prompt_tokens: int = 8  # tokens of each opening (after BOS)
    max_new_tokens: int = 48
    device: str = "auto"
    redo: bool = False


# -----------------------------------------------------------------------------
# each stage's value checks: pure functions of the config, run by the stage itself and
# by experiment.py on a spec's settings before any run starts

TRAIN_POSITIVE = ("eval_interval", "log_interval", "eval_iters", "batch_size", "max_seq_len", "vocab_size", "dim",
                  "n_layers", "n_heads", "n_kv_heads", "multiple_of", "gradient_accumulation_steps", "select_pool")


MAX_SCHEDULE_ROWS = 2_000_000_000  # batch ids a run's schedule may hold (16 GiB of int64)


def check_train(cfg: TrainConfig):
    """train.py's nonsense values (one UserError line); train.py then checks the memory."""
    if not cfg.out_dir.strip():  # '' is the working folder: the repository's model.bin was overwritten
        raise UserError(f"--out_dir={cfg.out_dir!r}: give a folder (the default is out)")
    if cfg.wandb_log:
        check_wandb_dir()
    for k in TRAIN_POSITIVE:
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be at least 1")
    if cfg.max_iters < 0:
        raise UserError(f"--max_iters={cfg.max_iters}: must be >= 0")
    for k in ("learning_rate", "weight_decay", "grad_clip", "min_lr", "warmup_iters"):
        if not getattr(cfg, k) >= 0:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be >= 0")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout={cfg.dropout}: must be in [0, 1)")
    for k in ("beta1", "beta2"):  # AdamW's moments: a beta of 1 or more never forgets, below 0 is no average
        if not 0 <= getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be in [0, 1)")
    if cfg.seed < 0:
        raise UserError(f"--seed={cfg.seed}: must be >= 0 (numpy's generators take no negative seed)")
    if cfg.seed >= MAX_SEED:
        raise UserError(f"--seed={cfg.seed}: must be below 2**63 (torch's generator takes 64 bits, the tables int64)")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise UserError(f"--device={cfg.device}: choose auto, cpu, cuda, cuda:<index> or mps")
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise UserError(f"--dim={cfg.dim}, --n_heads={cfg.n_heads}, --n_kv_heads={cfg.n_kv_heads}: dim must be a "
                        "multiple of n_heads and n_heads of n_kv_heads")
    if (cfg.select == "none") != (cfg.select_pool == 1) and cfg.select != "uniform":
        raise UserError(f"--select={cfg.select} --select_pool={cfg.select_pool}: selection needs a pool "
                        "larger than 1 (e.g. --select_pool=4), and a pool needs a --select method")
    if cfg.select != "none" and SCORES[cfg.select].needs_metric and not cfg.select_metric:
        raise UserError(f"--select={cfg.select} needs --select_metric=<a batch metric> (and --select_target)")
    rows = cfg.max_iters * cfg.batch_size * cfg.gradient_accumulation_steps
    if rows > MAX_SCHEDULE_ROWS:  # the schedule holds one int64 batch id per row of every step, in memory
        raise UserError(f"--max_iters={cfg.max_iters} x --batch_size={cfg.batch_size} x "
                        f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} = {rows:.3g} batch ids in the "
                        f"schedule, more than {MAX_SCHEDULE_ROWS:.0e} ({MAX_SCHEDULE_ROWS * 8 / 2**30:.0f} GiB): "
                        "lower one of them")


def check_eval(cfg: EvalConfig):
    """eval.py's nonsense values (one UserError line)."""
    for k in ("n_prompts", "max_new_tokens", "batch_size"):
        if getattr(cfg, k) < (0 if k == "n_prompts" else 1):
            raise UserError(f"--{k}={getattr(cfg, k)}: must be positive")
    if bad := sampling_problem(cfg.temperature, 0, cfg.top_p):  # checked even at temperature 0 (greedy only)
        raise UserError(bad)


DURABILITY_LIMITS = {"R": 10 ** 6, "R_context": 10 ** 5, "n_prompts": 10 ** 4, "n_references": 10 ** 4, "n_contexts": 10 ** 4,
                     "max_new_tokens": 10 ** 5, "batch_size": 10 ** 5, "exact_budget": 2 ** 24}


def check_durability(cfg: DurabilityConfig):
    """durability.py's nonsense values (one UserError line)."""
    for k in ("R", "batch_size", "n_prompts", "prompt_tokens", "max_new_tokens", "R_context"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be at least 1")
    for k in ("n_contexts", "n_references", "exact_budget"):
        if getattr(cfg, k) < 0:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be 0 (none) or more")
    for k, most in DURABILITY_LIMITS.items():  # sizes that would fill the memory before the first line is printed
        if getattr(cfg, k) > most:
            raise UserError(f"--{k}={getattr(cfg, k)}: at most {most:,} (candidates are scored and held in memory; "
                            "--exact_budget counts the whole space exactly)")
