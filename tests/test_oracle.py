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


SAMPLED = FIXTURE.with_name("stories260K_llama2c_t08_p09_s7_n256.ids")


@pytest.mark.skipif(not SAMPLED.exists(), reason="llama2.c's sampled ids are not in ../shared/fixtures")
def test_runexact_reproduces_llama2c_samples(tmp_path):
    """`make runexact` does llama2.c's float operations in its order (score / sqrt(hs),
    silu as x * (1 / (1 + e^-x)), ...), so it samples llama2.c's own ids at -t 0.8 -p 0.9."""
    import struct

    from conftest import ROOT
    subprocess.run(["make", "-s", "runexact"], cwd=ROOT, check=True, capture_output=True)
    tok = tmp_path / "ids.bin"  # piece i is the text [i], as the fixture was made
    with open(tok, "wb") as f:
        f.write(struct.pack("i", 8))
        for i in range(512):
            f.write(struct.pack("fi", 0.0, len(f"[{i}]")) + f"[{i}]".encode())
    out = subprocess.run([str(ROOT / "runexact"), str(FIXTURE), "-z", str(tok), "-t", "0.8", "-p", "0.9", "-s", "7",
                          "-n", "256"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [int(t) for t in out.stdout.replace("]", " ").replace("[", " ").split()]
    assert got == [int(t) for t in SAMPLED.read_text().split()]
