"""export.py's llama2.c formats (versions 0, 1, 2) against readers written from the format
description (tests/formats_reference.py), run.c on version 1 against version 0, and the
one-line errors of run, runq and export.load_bin on truncated and foreign files."""

import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
from conftest import ROOT
from formats_reference import dequant, parse, q80
from model import ModelArgs, Transformer
from prebias.checkpoint import load_checkpoint
from prebias.common import UserError
from prebias.data import sha256_file

# shapes: GQA with group size 64; group 32 (llama2.c halves 64 for dim 32); 16; and 8. The hidden
# size is 9 groups, so that runq's products over it take its 8-groups-at-a-time path and the rest
SHAPES = {"gs64": dict(dim=64, hidden_dim=576, n_heads=4, n_kv_heads=2),
          "gs32": dict(dim=32, hidden_dim=288, n_heads=4, n_kv_heads=2),
          "gs16": dict(dim=48, hidden_dim=144, n_heads=6, n_kv_heads=3),
          "gs8": dict(dim=40, hidden_dim=72, n_heads=5, n_kv_heads=5)}
GROUP = {"gs64": 64, "gs32": 32, "gs16": 16, "gs8": 8}


def random_model(shape="gs64", shared=True, seed=3, vocab=512, layers=2) -> Transformer:
    """Large random weights: well separated logits and a varied greedy path."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(n_layers=layers, vocab_size=vocab, max_seq_len=64, shared_classifier=shared,
                              **SHAPES[shape]))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return m.eval()


def c_ids(binary, model, tok, *args) -> list[int]:
    res = subprocess.run([str(binary), str(model), "-z", str(tok), "-d", "1", *map(str, args)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [int(t) for t in res.stdout.split()]


def matrices(model: Transformer) -> dict:
    """The model's tensors under formats_reference's names, (L, out, in) for the layers."""
    sd, L = model.state_dict(), model.params.n_layers
    per = {"rms_att": "attention_norm", "rms_ffn": "ffn_norm", "wq": "attention.wq", "wk": "attention.wk",
           "wv": "attention.wv", "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
           "w3": "feed_forward.w3"}
    out = {k: torch.stack([sd[f"layers.{i}.{v}.weight"] for i in range(L)]).numpy() for k, v in per.items()}
    out.update(emb=sd["tok_embeddings.weight"].numpy(), rms_final=sd["norm.weight"].numpy(),
               wcls=sd["output.weight"].numpy())
    return out


# -----------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("shared", [True, False])
def test_version1_holds_the_exact_tensors(tmp_path, shared):
    m = random_model("gs64", shared)
    path = export.export_bin(m, tmp_path / "m1.bin", 1)
    h = parse(path)
    assert (h["version"], h["dim"], h["hidden_dim"], h["n_kv_heads"], h["vocab_size"], h["shared"]) == \
        (1, 64, 576, 2, 512, int(shared))
    for name, want in matrices(m).items():
        assert np.array_equal(h[name], want), name
    back = export.load_bin(path)
    assert back.params.shared_classifier == shared
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("shared", [True, False])
def test_version2_is_q80_of_the_tensors(tmp_path, shape, shared):
    """The int8 values and scales equal a numpy Q8_0 quantiser's (bytes), every weight lies
    within half a step of its dequantised value, and load_bin gives q * scale."""
    m = random_model(shape, shared)
    path = export.export_bin(m, tmp_path / "m2.bin", 2)
    h = parse(path)
    gs = GROUP[shape]
    assert h["group_size"] == gs and h["shared"] == int(shared)
    want = matrices(m)
    for name in ("rms_att", "rms_ffn", "rms_final"):
        assert np.array_equal(h[name], want[name])
    back = matrices(export.load_bin(path))
    for name in ("emb", "wcls", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        pairs = [h[name]] if name in ("emb", "wcls") else h[name]
        ws = [want[name]] if name in ("emb", "wcls") else list(want[name])
        for (q, s), w in zip(pairs, ws):
            rq, rs = q80(w, gs)
            assert np.array_equal(q.reshape(-1), rq) and np.array_equal(s, rs), name
            dq = dequant((q, s))
            step = np.repeat(s, gs).reshape(w.shape)
            assert np.all(np.abs(dq - w) <= step / 2 * (1 + 1e-6) + 1e-12), name
        got = back[name] if name in ("emb", "wcls") else back[name]
        exp = dequant(h[name]) if name in ("emb", "wcls") else np.stack([dequant(p) for p in h[name]])
        assert np.array_equal(got, exp), name


def test_group_size_follows_llama2c_and_divides_hidden_dim():
    a = ModelArgs(dim=288, n_heads=6)  # stories15M: 64 does not divide 288, llama2.c halves to 32
    assert (a.hidden_dim, export.group_size_for(a)) == (768, 32)
    assert export.group_size_for(ModelArgs(dim=128, hidden_dim=352, n_heads=4)) == 32  # llama2.c would keep 64
    assert export.group_size_for(ModelArgs(dim=4096, n_heads=32, multiple_of=256)) == 64  # Llama 2 7B


def test_zero_groups_quantise_to_zero():
    q, s, err = export.quantize_q80(torch.zeros(128), 64)
    assert torch.equal(q, torch.zeros(128, dtype=torch.int8)) and torch.equal(s, torch.zeros(2)) and err == 0


def test_version0_is_unchanged(tmp_path):
    """The legacy layout, as before: header then the tensors in llama2.c's order."""
    m = random_model("gs32", shared=False)
    raw = export.export_bin(m, tmp_path / "m0.bin", 0).read_bytes()
    assert struct.unpack_from("<7i", raw) == (32, 288, 2, 4, 2, -512, 64)
    flat = np.frombuffer(raw, "<f4", offset=28)
    want = matrices(m)
    assert np.array_equal(flat[:512 * 32], want["emb"].reshape(-1))
    assert np.array_equal(flat[-512 * 32:], want["wcls"].reshape(-1))


# -----------------------------------------------------------------------------
# run.c reads version 1 by its header

@pytest.mark.parametrize("shape", ["gs64", "gs16"])
@pytest.mark.parametrize("shared", [True, False])
def test_run_on_version1_equals_run_on_version0(c_builds, tok512_bin, tmp_path, shape, shared):
    m = random_model(shape, shared)
    v0, v1 = export.export_bin(m, tmp_path / "m0.bin", 0), export.export_bin(m, tmp_path / "m1.bin", 1)
    for build in ("run", "runexact"):
        greedy = c_ids(c_builds[build], v0, tok512_bin, "-t", 0, "-n", 48)
        assert len(set(greedy)) > 10
        assert c_ids(c_builds[build], v1, tok512_bin, "-t", 0, "-n", 48) == greedy
        sampled = c_ids(c_builds[build], v0, tok512_bin, "-t", 0.8, "-p", 0.9, "-s", 7, "-n", 48, "-i", "Once upon")
        assert c_ids(c_builds[build], v1, tok512_bin, "-t", 0.8, "-p", 0.9, "-s", 7, "-n", 48, "-i", "Once upon") == sampled


def test_trained_model_version1(c_builds, tiny_run, tok512_bin, tmp_path):
    m = export.load_bin(tiny_run.out_dir / "model.bin")
    v1 = export.export_bin(m, tmp_path / "m1.bin", 1)
    assert c_ids(c_builds["run"], v1, tok512_bin, "-t", 0, "-n", 60) == \
        c_ids(c_builds["run"], tiny_run.out_dir / "model.bin", tok512_bin, "-t", 0, "-n", 60)


# -----------------------------------------------------------------------------
# bad files: one line naming the file, for run, runq and the Python reader alike

def corrupt(raw: bytes, case: str) -> bytes:
    b = bytearray(raw)
    if case == "truncated_1":
        return raw[:-1]
    if case == "truncated_1000":
        return raw[:-1000]
    if case == "header_only":
        return raw[:100]
    if case == "extra_bytes":
        return raw + b"\0" * 8
    if case == "wrong_magic":
        b[0:4] = b"ak43"
    elif case == "wrong_version":
        b[4:8] = struct.pack("<i", 3)
    elif case == "bad_flag":
        b[36] = 2
    elif case == "nonzero_padding":
        b[200] = 1
    elif case == "negative_vocab":
        b[28:32] = struct.pack("<i", -512)
    elif case == "group_size_zero":
        b[37:41] = struct.pack("<i", 0)
    elif case == "group_size_not_dividing":
        b[37:41] = struct.pack("<i", 48)
    elif case == "group_size_huge":
        b[37:41] = struct.pack("<i", 2**31 - 1)
    elif case == "flag_says_unshared":
        b[36] = 0
    return bytes(b)


CASES_V1 = ["truncated_1", "truncated_1000", "header_only", "extra_bytes", "wrong_magic", "wrong_version",
            "bad_flag", "nonzero_padding", "negative_vocab", "flag_says_unshared"]
CASES_V2 = CASES_V1 + ["group_size_zero", "group_size_not_dividing", "group_size_huge"]


def assert_one_line(res, prog, name):
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and name in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("version, case", [(1, c) for c in CASES_V1] + [(2, c) for c in CASES_V2])
def test_bad_versioned_files(c_builds, tok512_bin, tmp_path, version, case):
    raw = export.export_bin(random_model("gs64"), tmp_path / "good.bin", version).read_bytes()
    bad = tmp_path / f"bad_v{version}_{case}.bin"
    bad.write_bytes(corrupt(raw, case))
    prog = "run" if version == 1 else "runq"
    res = subprocess.run([str(c_builds[prog]), str(bad), "-z", str(tok512_bin), "-n", "4"], capture_output=True,
                         text=True, timeout=30)
    assert_one_line(res, prog, bad.name)
    with pytest.raises(UserError) as e:
        export.load_bin(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_each_program_names_the_other(c_builds, tok512_bin, tmp_path):
    m = random_model("gs64")
    v1, v2 = export.export_bin(m, tmp_path / "m1.bin", 1), export.export_bin(m, tmp_path / "m2.bin", 2)
    res = subprocess.run([str(c_builds["run"]), str(v2), "-z", str(tok512_bin)], capture_output=True, text=True)
    assert_one_line(res, "run", "m2.bin")
    assert "./runq" in res.stderr
    res = subprocess.run([str(c_builds["runq"]), str(v1), "-z", str(tok512_bin)], capture_output=True, text=True)
    assert_one_line(res, "runq", "m1.bin")
    assert "--version=2" in res.stderr
    res = subprocess.run([str(c_builds["runq"]), str(tmp_path / "absent.bin"), "-z", str(tok512_bin)], capture_output=True,
                         text=True)
    assert_one_line(res, "runq", "absent.bin")


def test_export_refuses_another_norm_eps(tmp_path):
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300, norm_eps=1e-6))
    with pytest.raises(UserError, match="epsilon"):
        export.export_bin(m, tmp_path / "m.bin", 1)
    assert not (tmp_path / "m.bin").exists()


def test_from_bin_imports_a_llama2c_file_as_a_checkpoint(tiny_run, tmp_path):
    """export.py --from_bin: a llama2.c model file becomes a step-0 checkpoint that records the
    file's sha256 and the tokenizer's, with the file's weights."""
    src, tok = tiny_run.out_dir / "model.bin", tiny_run.data_dir / "tok512.model"
    v1 = export.export_bin(export.load_bin(src), tmp_path / "m1.bin", 1)
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--from_bin={v1}", f"--out_dir={tmp_path / 'imp'}",
                        f"--data_dir={tiny_run.data_dir}", "--max_seq_len=64", f"--tokenizer={tok}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "imp" / "ckpt" / "ckpt_0.pt")
    assert ck["init"] == {"kind": "bin", "from": str(v1.resolve()), "files": {"m1.bin": sha256_file(v1)}}
    assert ck["data"]["tokenizer_sha256"] == sha256_file(tok) and ck["config"]["data_dir"] == str(tiny_run.data_dir)
    for k, v in export.load_bin(src).state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--from_bin={v1}", f"--out_dir={tmp_path / 'imp'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "already holds checkpoints" in r.stderr


@pytest.mark.parametrize("gs", ["0", "-64", "100000"])
def test_a_group_size_out_of_range_is_one_line(tmp_path, gs):
    """--group_size=0 was a ZeroDivisionError and a negative one never ended (seen failing:
    the old code went on to read the run)."""
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), str(tmp_path / "m.bin"), "--latest",
                        f"--out_dir={tmp_path}", "--version=2", f"--group_size={gs}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == f"error: --group_size={gs}: values per Q8_0 group, 1..65536 " \
                                             "(default 64)\n", r.stderr


def test_a_header_declaring_unbounded_positions_is_refused_before_allocating(tmp_path):
    """A version-1 file holds no RoPE table, so its seq_len is bounded by nothing: 2**31 - 1
    built a table of ~2**31 rows before any check (not run on the old code: it would try to
    allocate tens of GiB on a shared machine). Hugging Face's max_position_embeddings alike."""
    import json
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32, max_seq_len=8))
    path = export.export_bin(model, tmp_path / "m.bin", 1)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<i", raw, 32, 2 ** 31 - 1)  # seq_len: magic, version, then the 7th int of the shape
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"has seq_len 2147483647: at most 1048576 positions"):
        export.load_bin(path)
    from prebias import hf
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
        "vocab_size": 32, "intermediate_size": 48, "max_position_embeddings": 10 ** 12}))
    with pytest.raises(UserError, match=r"max_position_embeddings at most 1048576"):
        hf.load_hf(tmp_path / "hf")
