"""pretokenize --vocab_size=0 (llama2.c's vocab_source=llama2): a sentencepiece model the
user supplies (here a stand-in the fixture trained: the tiny data's 512-piece model; Meta's
Llama 2 tokenizer is never shipped or downloaded), shards beside the JSON, the same batch
index and batch metrics as the same tokenizer used as a custom vocabulary, and train.py,
run.c and the later stages finding it by its vocab size."""

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

import tinystories
import train
from conftest import ROOT, SEQ, VOCAB
from export import load_bin
from prebias.checkpoint import latest_checkpoint, load_checkpoint
from prebias.common import UserError
from prebias.data import LLAMA2_RECORD, BatchData, raw_dir, tok_dir
from tokenizer import Tokenizer, tokenizer_model_path


@pytest.fixture(scope="module")
def llama2_data(tiny_data, tmp_path_factory):
    """The tiny data's raw shards in a new folder, pretokenized with vocab_size=0 and the
    stand-in tokenizer."""
    data, _ = tiny_data
    root = tmp_path_factory.mktemp("llama2")
    shutil.copytree(raw_dir(data), raw_dir(root / "data"))
    tinystories.pretokenize(0, SEQ, root / "data", workers=2, tables_dir=root / "tables",
                            tokenizer=str(data / f"tok{VOCAB}.model"))
    return root / "data", root / "tables"


def test_shards_lie_beside_the_json_and_equal_a_custom_vocabularys(llama2_data, tiny_data):
    data, tables = llama2_data
    custom, custom_tables = tiny_data
    raw = raw_dir(data)
    bins = sorted(raw.glob("*.bin"))  # llama2.c's PretokDataset reads exactly these, shard 0 for validation
    assert [b.name for b in bins] == [f"data{i:02d}.bin" for i in range(4)]
    for b in bins:
        assert b.read_bytes() == (tok_dir(custom, VOCAB) / b.name).read_bytes()
    idx = "index_T64/batches.npy"
    assert (raw / idx).read_bytes() == (tok_dir(custom, VOCAB) / idx).read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(tables / "batch_metrics.csv"),
                                  pd.read_csv(custom_tables / "batch_metrics.csv"))
    assert tok_dir(data, VOCAB) == raw and tok_dir(data, 0) == raw
    d = BatchData(data, VOCAB, SEQ)
    assert d.meta["tokenizer_sha256"] == BatchData(custom, VOCAB, SEQ).meta["tokenizer_sha256"]
    assert tokenizer_model_path(VOCAB, data) == raw / "tokenizer.model"
    assert (raw / "tokenizer.model").read_bytes() == (custom / f"tok{VOCAB}.model").read_bytes()


def test_rerun_reuses_the_recorded_tokenizer(llama2_data, monkeypatch):
    data, tables = llama2_data
    before = {p.name: p.read_bytes() for p in raw_dir(data).glob("*.bin")}
    monkeypatch.chdir(ROOT)  # tokenizer.model here is the project's 512-piece default, not Llama 2's
    tinystories.pretokenize(0, SEQ, data, workers=1, tables_dir=tables, metrics="none")
    assert before == {p.name: p.read_bytes() for p in raw_dir(data).glob("*.bin")}


def test_default_tokenizer_must_be_llama2s(tiny_data, tmp_path, monkeypatch):
    data, _ = tiny_data
    shutil.copytree(raw_dir(data), raw_dir(tmp_path / "d"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match="not Llama 2's 32,000"):
        tinystories.pretokenize(0, SEQ, tmp_path / "d", workers=1, metrics="none")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--tokenizer=path/to/tokenizer.model"):
        tinystories.pretokenize(0, SEQ, tmp_path / "d", workers=1, metrics="none")
    assert not (raw_dir(tmp_path / "d") / LLAMA2_RECORD).exists()


def test_a_custom_vocabulary_of_the_same_size_is_refused(llama2_data, tiny_data, tmp_path):
    data, _ = tiny_data
    both = tmp_path / "both"
    shutil.copytree(llama2_data[0], both)
    shutil.copy(data / f"tok{VOCAB}.model", both / f"tok{VOCAB}.model")
    with pytest.raises(UserError, match="both hold 512-token data"):
        BatchData(both, VOCAB, SEQ)
    with pytest.raises(UserError, match="custom 512-piece vocabulary"):
        tinystories.pretokenize(0, SEQ, both, workers=1, metrics="none", tokenizer=str(data / f"tok{VOCAB}.model"))


def test_train_and_run_follow(llama2_data, tiny_data, runc_binary, tmp_path):
    data, tables = llama2_data
    out = tmp_path / "out"
    train.main([f"--data_dir={data}", f"--tables_dir={tables}", f"--out_dir={out}", f"--vocab_size={VOCAB}",
                f"--max_seq_len={SEQ}", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--batch_size=4",
                "--max_iters=6", "--eval_interval=6", "--eval_iters=2", "--learning_rate=3e-3", "--device=cpu",
                "--dtype=float32"])
    ck = load_checkpoint(latest_checkpoint(out))
    assert ck["data"]["tokenizer_sha256"] == BatchData(data, VOCAB, SEQ).meta["tokenizer_sha256"]
    assert ck["batch_ids"].numel() > 0
    tok_bin = Tokenizer.for_vocab(VOCAB, data).export(tmp_path / "tok.bin")
    r = subprocess.run([str(runc_binary), str(out / "model.bin"), "-z", str(tok_bin), "-t", "0", "-n", "30", "-d",
                        "1", "-i", "Once upon a time"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    enc = Tokenizer.for_vocab(VOCAB, data)
    ids = enc.encode("Once upon a time")
    with torch.no_grad():
        new = load_bin(out / "model.bin").generate([ids], 30 - (len(ids) - 1), temperature=0.0)[0]
    assert [int(t) for t in r.stdout.split()] == ids[1:] + new
    assert np.all(np.isfinite([ck["val_loss"]]))
