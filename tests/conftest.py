"""Shared fixtures: a tiny end-to-end pipeline built once per test session in a temp
folder (sample -> train_vocab -> pretokenize with metrics -> a short training run)."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, SEQ = 512, 64

# `make test` runs the suite in 2 pytest-xdist workers (its subprocess-heavy half waits on
# process starts, not on the cores): each worker, and every process it starts, uses one thread,
# as a retrain or a Slurm job of one CPU does, so 2 workers do not fight over 2 cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: an end-to-end test of several processes (make test runs it, "
                                       "make test-fast does not)")


def pytest_collection_modifyitems(config, items):
    for item in items:  # the tiny experiment (4 runs of train, eval and durability processes) is slow
        if "tiny_experiment" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
def c_builds():
    """run, runexact and runq (int8) built with the Makefile."""
    res = subprocess.run(["make", "-s", "run", "runexact", "runq"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    return {b: ROOT / b for b in ("run", "runexact", "runq")}


@pytest.fixture(scope="session")
def tok512_bin(tiny_data, tmp_path_factory):
    """The fixture data's tokenizer as run.c's tokenizer.bin."""
    from tokenizer import Tokenizer
    return Tokenizer(tiny_data[0] / f"tok{VOCAB}.model").export(tmp_path_factory.mktemp("tokbin") / "tok512.bin")


@pytest.fixture(scope="session")
def runc_binary():
    """run.c built with the Makefile's default (fast) target."""
    subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True, capture_output=True)
    return ROOT / "run"


@dataclass
class TinyExperiment:
    spec: Path
    out_root: Path
    dir: Path
    outputs: list  # stdout of each experiment.py call: [killed, resumed, rerun]
    wandb: bool


def experiment_spec(tiny_data, path: Path, **over) -> Path:
    """A 2-arm x 2-seed experiment on the fixture data, with a canary from step 10 (so
    durability.py runs too)."""
    data, tables = tiny_data
    tags = path.parent / "canary.json"
    tags.write_text(json.dumps({"seed": 1, "tags": [
        {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}",
         "steps": {"start": 10, "n": 10, "every": 4}, "rows": 2, "position": "random"}]}))
    spec = {"question": "Does sorting batches by readability change the tiny model?",
            "base": {"data_dir": str(data), "tables_dir": str(tables), "vocab_size": VOCAB, "max_seq_len": SEQ,
                     "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "batch_size": 4, "max_iters": 80,
                     "eval_interval": 40, "eval_iters": 2, "log_interval": 20, "learning_rate": 3e-3,
                     "warmup_iters": 4, "device": "cpu", "dtype": "float32", "tags": str(tags)},
            "arms": {"shuffle": {}, "curriculum": {"schedule": "sorted", "schedule_metric": "fk_grade"}},
            "seeds": [1, 2],
            "eval": {"n_prompts": 2, "max_new_tokens": 12, "val_batches": 4, "device": "cpu"},
            "durability": {"R": 50, "n_prompts": 2, "device": "cpu"},
            "metrics": ["val_loss", "out_ref_nll", "out_fk_grade", "out_ttr"]}
    spec.update(over)
    path.write_text(json.dumps(spec, indent=1))
    return path


@pytest.fixture(scope="session")
def tiny_experiment(tiny_data, tmp_path_factory) -> TinyExperiment:
    """The experiment run one job at a time and killed (SIGKILL to its process group) once
    its second run has ckpt_8 (the first run is finished by then), then run again with
    --jobs=2 to the end. With wandb installed it logs for real in WANDB_MODE=offline."""
    import importlib.util
    import os
    import signal
    import time
    root = tmp_path_factory.mktemp("exp")
    spec = experiment_spec(tiny_data, root / "tiny.json")
    use_wandb = importlib.util.find_spec("wandb") is not None
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    cmd = [sys.executable, str(ROOT / "experiment.py"), str(spec), f"--out_root={root / 'out'}"] + \
        (["--wandb_log=True"] if use_wandb else [])
    exp = root / "out" / "tiny"
    cut = exp / "shuffle" / "seed2" / "ckpt" / "ckpt_8.pt"
    p = subprocess.Popen(cmd + ["--jobs=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True, cwd=root)
    t0 = time.time()
    while not cut.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    killed = p.communicate()[0]
    r = subprocess.run(cmd + ["--jobs=2"], capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return TinyExperiment(spec, root / "out", exp, [killed, r.stdout], use_wandb)


# -----------------------------------------------------------------------------
# helpers of the tests that give a command bad input, on copies of the fixtures

EVAL = ["--n_prompts=1", "--max_new_tokens=4", "--val_batches=2", "--device=cpu"]  # a quick eval.py


def refused(fn, *words):
    """The UserError line of fn(), checked to be one line holding every word."""
    from prebias.common import UserError
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def run_with_checkpoints(tiny_run, dest, keep=(0, 1, 2)):
    """A copy of the fixture run with only the checkpoints of `keep` (a valid chain)."""
    import shutil
    from prebias import checkpoint
    shutil.copytree(tiny_run.out_dir, dest)
    for it, p in checkpoint.list_checkpoints(dest):
        if it not in keep:
            p.unlink()
    return dest


def copy_data(tiny_data, tmp_path):
    """A copy of the fixture's data folder (to damage), and a tables folder beside it."""
    import shutil
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data[0], data_dir)
    return data_dir, tmp_path / "tables"


def pretok(data_dir, tables, **kw):
    """tinystories.py pretokenize on the fixture's sizes, one worker."""
    import tinystories
    return tinystories.pretokenize(vocab_size=VOCAB, max_seq_len=SEQ, data_dir=data_dir, workers=1,
                                   tables_dir=tables, **kw)
