"""
Sample from a trained model with PyTorch, as llama2.c's sample.py: a checkpoint or any
llama2.c model file (version 0, 1, or 2, which computes as runq does).

$ python sample.py --start="Once upon a time" --num_samples=3     # the newest checkpoint of out/
$ python sample.py --checkpoint=out/ckpt/ckpt_400.pt --temperature=0.8 --top_k=300
$ python sample.py --checkpoint=model.bin --tokenizer=data/tok512.model --temperature=0   # greedy = ./run -t 0
$ python sample.py --checkpoint=model_q80.bin --tokenizer=data/tok512.model               # int8, as ./runq
$ python sample.py --start=FILE:prompt.txt --max_new_tokens=200 --top_k=300 --seed=7

Sampling is model.generate's (run.c's sampler and xorshift generator): sample k draws from
the generator seeded with seed + k, so with --top_k=0 sample k is exactly
`./run model.bin -t <temperature> -p <top_p> -s <seed + k>` (top_p 0 = plain sampling, as
-p 0). Generation stops at BOS (the next story), as run.c does, or after max_new_tokens.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from export import load_bin, tokenizer_of
from model import Transformer, sampling_problem
from prebias.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint
from prebias.common import SEED, UserError, auto_device, autocast_ctx, main_guard, parse_config
from tokenizer import Tokenizer, tokenizer_model_path


# -----------------------------------------------------------------------------
@dataclass
class SampleConfig:
    checkpoint: str = ""  # a ckpt_<iter>.pt or a llama2.c model file; '' = the newest checkpoint of out/
    start: str = ""  # the prompt (after BOS); "FILE:prompt.txt" reads it from a file
    num_samples: int = 1  # samples drawn (one batched generation)
    max_new_tokens: int = 100  # tokens generated per sample (at most the model's max_seq_len)
    temperature: float = 1.0  # 0 = greedy; < 1 sharper, > 1 flatter
    top_k: int = 300  # keep only the top_k most likely tokens (0 = all)
    top_p: float = 0.0  # nucleus as run.c's -p (0 = off)
    tokenizer: str = ""  # the sentencepiece .model; default: the checkpoint's run's (checked by sha256)
    seed: int = SEED  # sample k uses seed + k
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16


CHOICES = {"dtype": ("float32", "bfloat16", "float16")}
# -----------------------------------------------------------------------------


def load_model(cfg: SampleConfig) -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer: a checkpoint's run's (sha256-checked), or for a model
    file --tokenizer, else the data folder's tokenizer of its vocab size."""
    path = Path(cfg.checkpoint or latest_checkpoint("out"))
    if not path.exists():
        raise UserError(f"--checkpoint={path}: no such file (a ckpt_<iter>.pt or a model.bin)")
    if path.suffix == ".pt":
        ck = load_checkpoint(path)
        return model_from_checkpoint(ck), Tokenizer(tokenizer_of(ck, cfg.tokenizer))
    model = load_bin(path)
    return model, Tokenizer(cfg.tokenizer or tokenizer_model_path(model.params.vocab_size))


def prompt_ids(cfg: SampleConfig, enc: Tokenizer) -> list[int]:
    start = cfg.start
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--start={cfg.start}: {e.strerror}") from None
        except UnicodeDecodeError as e:  # a binary file
            raise UserError(f"--start={cfg.start}: not UTF-8 text (byte {e.start}): give a text file") from None
    return enc.encode(start, bos=True)


def draw(model: Transformer, ids: list[int], cfg: SampleConfig) -> list[list[int]]:
    """num_samples continuations of ids (new tokens only), sample k seeded with seed + k."""
    device = auto_device(cfg.device)
    model.to(device)
    with autocast_ctx(device, cfg.dtype):
        return model.generate([ids] * cfg.num_samples, cfg.max_new_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot print a character shows '?', not a traceback
        sys.stdout.reconfigure(errors="replace")
    cfg = parse_config(SampleConfig(), sys.argv[1:] if argv is None else argv, CHOICES)
    for k in ("num_samples", "max_new_tokens"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)}: must be at least 1")
    if bad := sampling_problem(cfg.temperature, cfg.top_k, cfg.top_p):
        raise UserError(bad)
    model, enc = load_model(cfg)
    if cfg.top_k > model.params.vocab_size:
        cfg.top_k = model.params.vocab_size
    ids = prompt_ids(cfg, enc)
    if len(ids) > model.params.max_seq_len:  # generate would cut it and print a token of the cut prompt after it
        raise UserError(f"--start: the prompt is {len(ids)} tokens (with BOS), longer than the model's context of "
                        f"{model.params.max_seq_len}: shorten it")
    room = model.params.max_seq_len + 1 - len(ids)  # model.generate stops at the context's end
    if cfg.max_new_tokens > room:
        print(f"note: --max_new_tokens={cfg.max_new_tokens} is cut to {max(room, 0)}: the prompt ({len(ids)} tokens) "
              f"and the samples fit the model's context of {model.params.max_seq_len}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    for new in draw(model, ids, cfg):
        print(enc.decode(ids + new))
        print("---------------")


if __name__ == "__main__":
    main_guard(main)
