"""Shared fixtures: a tiny end-to-end pipeline built once per test session in a temp
folder (sample -> train_vocab -> pretokenize with metrics -> a short training run)."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, SEQ = 512, 64


@dataclass
class TinyRun:
    data_dir: Path
    tables_dir: Path
    out_dir: Path
    vocab_size: int = VOCAB
    max_seq_len: int = SEQ

    def train_args(self, **over) -> list[str]:
        """--key=value arguments of the fixture's run (any can be overridden)."""
        args = dict(data_dir=self.data_dir, out_dir=self.out_dir, tables_dir=self.tables_dir,
                    vocab_size=VOCAB, max_seq_len=SEQ, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    batch_size=4, gradient_accumulation_steps=2, max_iters=24, eval_interval=8,
                    eval_iters=2, log_interval=4, learning_rate=3e-3, warmup_iters=4,
                    model_bin=self.out_dir / "model.bin", device="cpu", dtype="float32")
        args.update(over)
        return [f"--{k}={v}" for k, v in args.items()]


def build_data(root: Path, n_stories=1200, n_shards=4) -> tuple[Path, Path]:
    import tinystories
    data, tables = root / "data", root / "tables"
    tinystories.sample(data, n_stories=n_stories, n_shards=n_shards, seed=7)
    tinystories.train_vocab(VOCAB, data)
    tinystories.pretokenize(VOCAB, SEQ, data, workers=2, tables_dir=tables)
    return data, tables


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_dir, tables_dir) with pretokenized sample data and batch metrics."""
    return build_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> TinyRun:
    """A finished 24-step training run with checkpoints at 0, 1, 2, 4, 8, 16, 24."""
    import train
    data, tables = tiny_data
    run = TinyRun(data, tables, tmp_path_factory.mktemp("run") / "out")
    train.main(run.train_args())
    return run


@pytest.fixture(scope="session")
def runc_binary():
    """run.c built with the Makefile's default (fast) target."""
    subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True, capture_output=True)
    return ROOT / "run"
