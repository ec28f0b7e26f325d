"""model.py and run.c against an independent numpy reference (tests/numpy_reference.py,
float64, written from the equations, reading the .bin itself) on a grouped-query model:
correctness no longer rests on two in-project implementations agreeing."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from export import load_v0
from numpy_reference import Reference
from tokenizer import Tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260K.bin"


@pytest.fixture(scope="module")
def gqa_model(tiny_run):
    """The fixture run's trained model: dim 32, 4 query heads sharing 2 kv heads."""
    path = tiny_run.out_dir / "model.bin"
    ref = Reference(path)
    assert (ref.nh, ref.nkv) == (4, 2)
    return path, ref


def test_model_py_logits_match_the_reference(gqa_model):
    path, ref = gqa_model
    toks = [1, 300, 17, 250, 99, 402, 8, 77, 263, 5, 300, 41]
    want = ref.logits(toks)
    with torch.no_grad():
        got = load_v0(path)(torch.tensor([toks]))[0][0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # and with the KV cache, token by token, as generation runs
    m = load_v0(path)
    new = m.generate([toks[:4]], 12, temperature=0.0, stop_at_bos=False)[0]
    assert new == ref.greedy(toks[:4], 12)


def test_run_c_greedy_ids_match_the_reference(gqa_model, runc_binary, tiny_run, tmp_path):
    path, ref = gqa_model
    enc = Tokenizer(tiny_run.data_dir / "tok512.model")
    tok_bin = enc.export(tmp_path / "tok.bin")
    out = subprocess.run([str(runc_binary), str(path), "-z", str(tok_bin), "-n", "40", "-t", "0", "-d", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = [int(t) for t in out.stdout.split()]
    want = ref.greedy([1], len(ids))
    stop = want.index(1) if 1 in want else len(want)  # run.c stops at BOS
    assert ids == want[:stop]


def test_run_c_on_a_random_gqa_model(runc_binary, tiny_run, tmp_path):
    """Large random weights: well separated logits and a varied greedy path (no repeats)."""
    from export import export_v0
    from model import ModelArgs, Transformer
    torch.manual_seed(3)
    m = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=512, max_seq_len=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    export_v0(m, tmp_path / "rand.bin")
    ref = Reference(tmp_path / "rand.bin")
    enc = Tokenizer(tiny_run.data_dir / "tok512.model")
    out = subprocess.run([str(runc_binary), str(tmp_path / "rand.bin"), "-z", str(enc.export(tmp_path / "t.bin")),
                          "-n", "40", "-t", "0", "-d", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = [int(t) for t in out.stdout.split()]
    want = ref.greedy([1], 40)
    stop = want.index(1) if 1 in want else len(want)
    assert len(set(want[:stop])) > 10 and ids == want[:stop]
    with torch.no_grad():
        got = load_v0(tmp_path / "rand.bin")(torch.tensor([[1] + want[:20]]))[0][0].double().numpy()
    np.testing.assert_allclose(got, ref.logits([1] + want[:20]), atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not FIXTURE.exists(), reason="llama2.c's stories260K fixture is not in ../shared/fixtures")
def test_llama2c_file_matches_the_reference():
    ref = Reference(FIXTURE)
    toks = [1, 403, 407, 261, 378, 426, 260]
    with torch.no_grad():
        got = load_v0(FIXTURE)(torch.tensor([toks]))[0][0].double().numpy()
    np.testing.assert_allclose(got, ref.logits(toks), atol=1e-4, rtol=1e-4)
