"""
Tests of the C inference program run.c, on files written here with numpy.

Files the tests make (all in tmp_path):
  * a tiny random model in llama2.c's version-0 layout (dim 32, hidden 64,
    2 layers, 4 heads, 2 kv heads -> grouped-query attention, vocab 64, seq_len 32);
  * a 64-piece tokenizer.bin laid out like sentencepiece's byte-fallback vocab,
    cut to 64 entries: 0 "<unk>", 1 "\\n<s>\\n", 2 "\\n</s>\\n", then ids 3..63 are the
    byte pieces "<0x00>".."<0x3C>" (byte b is id b+3). It has no multi-byte pieces,
    so every character encodes to its byte token, and bytes above 0x3C (whose id
    would be >= 64) become <unk>;
  * a 512-piece tokenizer for the stories260K fixture: the three specials, 256 byte
    pieces (ids 3..258), the 95 printable ASCII characters (259..353), then merged
    pieces, with score -id so that lower ids merge first.

The build fixture compiles `run` (default fast build) and `runexact` (plain -O3)
with the Makefile in the repository root.
"""

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(__file__).resolve().parents[2] / "shared/fixtures/stories260K.bin"

TINY = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


# -----------------------------------------------------------------------------
# file writers

def model_bytes(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                shared=True, seed=0):
    """A random model in llama2.c's version-0 layout (header + fp32 arrays)."""
    rng = np.random.default_rng(seed)
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads

    def mat(rows, cols, layers=None):
        shape = (rows, cols) if layers is None else (layers, rows, cols)
        return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(cols))

    def norm(*shape):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    L = n_layers
    arrays = [
        0.2 * rng.standard_normal((vocab_size, dim), dtype=np.float32),  # token embedding
        norm(L, dim),                                              # rms_att
        mat(dim, dim, L), mat(kv_dim, dim, L), mat(kv_dim, dim, L), mat(dim, dim, L),
        norm(L, dim),                                              # rms_ffn
        mat(hidden_dim, dim, L), mat(dim, hidden_dim, L), mat(hidden_dim, dim, L),
        norm(dim),                                                 # rms_final
        np.zeros(seq_len * head_size, dtype=np.float32),           # legacy RoPE tables
    ]
    if not shared:
        arrays.append(mat(vocab_size, dim))
    header = struct.pack("7i", dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                         vocab_size if shared else -vocab_size, seq_len)
    return header + b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays)


def tokenizer_bytes(pieces, scores=None, max_len=None):
    scores = scores if scores is not None else [-float(i) for i in range(len(pieces))]
    out = [struct.pack("i", max_len if max_len is not None else max(len(p) for p in pieces))]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("fi", s, len(p)) + p)
    return b"".join(out)


SPECIALS = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]


def tiny_pieces():
    return SPECIALS + [b"<0x%02X>" % b for b in range(61)]


MERGES = [b"he", b"ll", b"hell", b"hello", b" hello", b" w", b"or", b"ld", b"orld", b" world"]


def pieces_512():
    pieces = SPECIALS + [b"<0x%02X>" % b for b in range(256)]
    pieces += [bytes([c]) for c in range(32, 127)]
    letters = b"etaoinshrdlucmfw"
    pairs = [bytes([a, b]) for a in letters for b in letters]
    for p in MERGES + pairs:
        if len(pieces) == 512:
            break
        if p not in pieces:
            pieces.append(p)
    assert len(pieces) == 512
    return pieces


# -----------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="session")
def binaries():
    res = subprocess.run(["make", "-s", "run", "runexact"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return {"run": ROOT / "run", "runexact": ROOT / "runexact"}


@pytest.fixture
def tiny(tmp_path):
    model = tmp_path / "tiny.bin"
    model.write_bytes(model_bytes(**TINY))
    tok = tmp_path / "tok64.bin"
    tok.write_bytes(tokenizer_bytes(tiny_pieces()))
    return model, tok


def run_c(binary, model, tok, *args, timeout=30):
    cmd = [str(binary), str(model), "-z", str(tok), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ids_of(binary, model, tok, *args):
    res = run_c(binary, model, tok, "-d", 1, *args)
    assert res.returncode == 0, res.stderr
    assert "tok/s" in res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1
    return [int(x) for x in lines[0].split()]


def assert_one_line_error(res, name):
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert name in lines[0]
    assert "hint" in lines[0]
    assert res.stdout == ""


# -----------------------------------------------------------------------------
# generation

def test_greedy_deterministic_and_same_as_exact_build(binaries, tiny):
    model, tok = tiny
    a = ids_of(binaries["run"], model, tok, "-t", 0, "-n", 20)
    b = ids_of(binaries["run"], model, tok, "-t", 0, "-n", 20)
    exact = ids_of(binaries["runexact"], model, tok, "-t", 0, "-n", 20)
    assert 0 < len(a) <= 20
    assert all(0 <= i < TINY["vocab_size"] for i in a)
    assert a == b == exact


def test_separate_classifier(binaries, tmp_path, tiny):
    _, tok = tiny
    model = tmp_path / "unshared.bin"
    model.write_bytes(model_bytes(**TINY, shared=False, seed=3))
    a = ids_of(binaries["run"], model, tok, "-t", 0, "-n", 20)
    assert a == ids_of(binaries["runexact"], model, tok, "-t", 0, "-n", 20)
    assert all(0 <= i < TINY["vocab_size"] for i in a)


def test_sampling_reproducible_by_seed(binaries, tiny):
    model, tok = tiny
    for topp in (0.9, 1.0):
        s1 = ids_of(binaries["run"], model, tok, "-t", 1.0, "-p", topp, "-s", 42, "-n", 32)
        s1b = ids_of(binaries["run"], model, tok, "-t", 1.0, "-p", topp, "-s", 42, "-n", 32)
        s2 = ids_of(binaries["run"], model, tok, "-t", 1.0, "-p", topp, "-s", 7, "-n", 32)
        assert s1 == s1b
        assert s1 != s2
        assert all(0 <= i < TINY["vocab_size"] for i in s1 + s2)


def test_prompt_tokens_come_first(binaries, tiny):
    model, tok = tiny
    # dummy-prefix space, then one byte token per character; '=' (0x3D) is past the vocab -> unk
    ids = ids_of(binaries["run"], model, tok, "-t", 0, "-n", 10, "-i", "12 3=")
    assert ids[:6] == [0x20 + 3, 0x31 + 3, 0x32 + 3, 0x20 + 3, 0x33 + 3, 0]
    # steps beyond seq_len are clamped to seq_len
    assert len(ids_of(binaries["run"], model, tok, "-t", 0, "-n", 1000)) <= TINY["seq_len"]


def test_merges_and_byte_fallback(binaries, tmp_path):
    cfg = dict(TINY, vocab_size=512)
    model = tmp_path / "m512.bin"
    model.write_bytes(model_bytes(**cfg))
    tok = tmp_path / "tok512.bin"
    pieces = pieces_512()
    tok.write_bytes(tokenizer_bytes(pieces))
    ids = ids_of(binaries["run"], model, tok, "-t", 0, "-n", 12, "-i", "hello world\u00e9")
    expect = [pieces.index(b" hello"), pieces.index(b" world"), 0xC3 + 3, 0xA9 + 3]
    assert ids[:4] == expect


def test_text_mode_prints_clean_text(binaries, tiny):
    model, tok = tiny
    res = run_c(binaries["run"], model, tok, "-t", 0.8, "-s", 1, "-n", 32, "-i", "0123")
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("\n")
    assert all(c.isprintable() or c.isspace() for c in res.stdout)
    assert "tok/s" in res.stderr


@pytest.mark.skipif(not STORIES.exists(), reason="shared/fixtures/stories260K.bin is absent")
def test_stories260k_greedy(binaries, tmp_path):
    tok = tmp_path / "tok512.bin"
    tok.write_bytes(tokenizer_bytes(pieces_512()))
    a = ids_of(binaries["run"], STORIES, tok, "-t", 0, "-n", 200)
    assert a == ids_of(binaries["run"], STORIES, tok, "-t", 0, "-n", 200)
    assert a == ids_of(binaries["runexact"], STORIES, tok, "-t", 0, "-n", 200)
    assert 0 < len(a) <= 200
    assert all(0 <= i < 512 for i in a)


# -----------------------------------------------------------------------------
# bad input: one line on stderr naming the file, exit code 1, no crash

def test_missing_model(binaries, tmp_path, tiny):
    _, tok = tiny
    res = run_c(binaries["run"], tmp_path / "nothere_model.bin", tok, "-n", 4)
    assert_one_line_error(res, "nothere_model.bin")


def test_model_is_a_directory(binaries, tmp_path, tiny):
    _, tok = tiny
    d = tmp_path / "dir_model.bin"
    d.mkdir()
    assert_one_line_error(run_c(binaries["run"], d, tok, "-n", 4), "dir_model.bin")


@pytest.mark.parametrize("cut", [1, 4, 1000, "header", "empty"])
def test_truncated_model(binaries, tmp_path, tiny, cut):
    _, tok = tiny
    data = model_bytes(**TINY)
    data = {"header": data[:20], "empty": b""}.get(cut, data[:-cut] if isinstance(cut, int) else data)
    model = tmp_path / "trunc_model.bin"
    model.write_bytes(data)
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), "trunc_model.bin")


@pytest.mark.parametrize("extra", [1, 4, 64])
def test_model_with_extra_bytes(binaries, tmp_path, tiny, extra):
    _, tok = tiny
    model = tmp_path / "extra_model.bin"
    model.write_bytes(model_bytes(**TINY) + b"\0" * extra)
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), "extra_model.bin")


def test_classifier_sign_mismatch(binaries, tmp_path, tiny):
    _, tok = tiny
    data = bytearray(model_bytes(**TINY, shared=False))
    data[20:24] = struct.pack("i", TINY["vocab_size"])  # claims shared, has a classifier
    model = tmp_path / "sign_model.bin"
    model.write_bytes(bytes(data))
    res = run_c(binaries["run"], model, tok, "-n", 4)
    assert_one_line_error(res, "sign_model.bin")
    assert "classifier" in res.stderr


BAD_HEADERS = {
    "zero_dim": dict(dim=0),
    "negative_layers": dict(n_layers=-2),
    "zero_vocab": dict(vocab_size=0),
    "int_min_vocab": dict(vocab_size=-2**31),
    "heads_not_dividing_dim": dict(n_heads=5),
    "kv_heads_not_dividing_heads": dict(n_kv_heads=3),
    "odd_head_size": dict(dim=36, n_heads=4, n_kv_heads=4),
    "kv_heads_above_heads": dict(n_kv_heads=8),
    "overflowing_sizes": dict(dim=2**30, hidden_dim=2**31 - 1, n_layers=2**31 - 1,
                              n_heads=2, n_kv_heads=1, seq_len=2**31 - 1),
    "huge_seq_len": dict(seq_len=2**31 - 1),
    "huge_vocab": dict(vocab_size=2**31 - 1),
    "versioned_magic": dict(dim=0x616B3432),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_header(binaries, tmp_path, tiny, name):
    _, tok = tiny
    data = bytearray(model_bytes(**TINY))
    cfg = dict(TINY, **BAD_HEADERS[name])
    data[:28] = struct.pack("7i", *cfg.values())
    model = tmp_path / f"hdr_{name}.bin"
    model.write_bytes(bytes(data))
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), model.name)


def test_missing_tokenizer(binaries, tmp_path, tiny):
    model, _ = tiny
    res = run_c(binaries["run"], model, tmp_path / "nothere_tok.bin", "-n", 4)
    assert_one_line_error(res, "nothere_tok.bin")


@pytest.mark.parametrize("cut", [1, 5, 50, "header"])
def test_truncated_tokenizer(binaries, tmp_path, tiny, cut):
    model, _ = tiny
    data = tokenizer_bytes(tiny_pieces())
    data = data[:2] if cut == "header" else data[:-cut]
    tok = tmp_path / "trunc_tok.bin"
    tok.write_bytes(data)
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), "trunc_tok.bin")


def test_tokenizer_with_too_few_tokens(binaries, tmp_path, tiny):
    model, _ = tiny
    tok = tmp_path / "short_tok.bin"
    tok.write_bytes(tokenizer_bytes(tiny_pieces()[:40]))
    res = run_c(binaries["run"], model, tok, "-n", 4)
    assert_one_line_error(res, "short_tok.bin")
    assert "40" in res.stderr and "64" in res.stderr


@pytest.mark.parametrize("length", [-1, -2**31, 2**31 - 1, 7])
def test_tokenizer_bad_length(binaries, tmp_path, tiny, length):
    model, _ = tiny
    pieces = tiny_pieces()
    data = bytearray(tokenizer_bytes(pieces))
    # the length field of record 5 (max_token_length is 6, so 7 is too long as well)
    off = 4 + sum(8 + len(p) for p in pieces[:5]) + 4
    data[off:off + 4] = struct.pack("i", length)
    tok = tmp_path / "badlen_tok.bin"
    tok.write_bytes(bytes(data))
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), "badlen_tok.bin")


@pytest.mark.parametrize("max_len", [0, -5, 2**31 - 1])
def test_tokenizer_bad_max_length(binaries, tmp_path, tiny, max_len):
    model, _ = tiny
    tok = tmp_path / "maxlen_tok.bin"
    tok.write_bytes(tokenizer_bytes(tiny_pieces(), max_len=max_len))
    assert_one_line_error(run_c(binaries["run"], model, tok, "-n", 4), "maxlen_tok.bin")


@pytest.mark.parametrize("args", [["-m", "chat"], ["-t", "abc"], ["-n"], ["-x", "1"], ["-d", "2"]])
def test_usage_errors(binaries, tiny, args):
    model, tok = tiny
    res = run_c(binaries["run"], model, tok, *args)
    assert res.returncode == 1
    assert res.stderr.startswith("run: error:")
    assert res.stdout == ""


@pytest.mark.parametrize("build", ["run", "runexact"])
@pytest.mark.parametrize("args", [["-t", "nan"], ["-t", "inf"], ["-t", "-inf"], ["-p", "nan"], ["-p", "NaN"]])
def test_non_finite_numbers_are_refused_by_every_build(binaries, tiny, build, args):
    """make run is built with -ffast-math, which folds isfinite() to true: the check
    must survive it."""
    model, tok = tiny
    res = run_c(binaries[build], model, tok, *args)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == f"run: error: {args[0]} expects a number, got '{args[1]}'" or \
        res.stderr.startswith(f"run: error: {args[0]} expects a number, got '{args[1]}'")


@pytest.mark.parametrize("build", ["run", "runexact"])
@pytest.mark.parametrize("args, said, same_as", [
    (["-t", "-1"], "-t -1 is negative; using 0 (greedy)", ["-t", "0"]),
    (["-t", "0.8", "-p", "2", "-s", "3"], "-p 2 is outside [0, 1]; using 0.9", ["-t", "0.8", "-p", "0.9", "-s", "3"]),
    (["-t", "0", "-n", "-5"], "-n -5 is negative; using seq_len", ["-t", "0", "-n", "0"]),
])
def test_llama2c_fix_ups_are_kept_but_said(binaries, tiny, build, args, said, same_as):
    model, tok = tiny
    res = run_c(binaries[build], model, tok, "-d", 1, *args)
    assert res.returncode == 0 and res.stderr.startswith(f"run: warning: {said}")
    assert res.stdout == run_c(binaries[build], model, tok, "-d", 1, *same_as).stdout


def test_tokenizer_of_a_larger_vocabulary(binaries, tmp_path, tiny):
    """A tokenizer with more pieces than the model's vocab_size is another vocabulary's
    (llama2.c reads its first pieces and prints the wrong text): refused."""
    model, _ = tiny
    tok = tmp_path / "big.bin"
    tok.write_bytes(tokenizer_bytes(tiny_pieces() + [b"x%d" % i for i in range(10)]))
    res = run_c(binaries["run"], model, tok, "-n", 4)
    assert_one_line_error(res, "holds more than the model's 64 tokens")


def test_prompt_longer_than_the_steps_is_said(binaries, tiny):
    model, tok = tiny
    res = run_c(binaries["run"], model, tok, "-n", 5, "-i", "abcdefghij", "-d", 1)
    assert res.returncode == 0
    assert "the prompt is 12 tokens (BOS included) but -n 5 steps" in res.stderr  # BOS, the leading space, 10 letters
    res = run_c(binaries["run"], model, tok, "-n", 30, "-i", "abc", "-d", 1)
    assert "prompt is" not in res.stderr
