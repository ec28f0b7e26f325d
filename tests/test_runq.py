"""runq.c (make runq): int8 inference on version-2 files. Its greedy ids against an
independent numpy int8 forward pass (tests/formats_reference.py: exact integer group sums,
runq's rounding), against export.load_bin's PyTorch simulation of it, and the command line
it shares with run.c."""

import subprocess

import pytest

import export
from formats_reference import Int8Reference
from test_export_formats import c_ids, random_model


def until_bos(ids):
    return ids[:ids.index(1)] if 1 in ids else ids


@pytest.mark.parametrize("shape", ["gs64", "gs32", "gs16", "gs8"])
@pytest.mark.parametrize("shared", [True, False])
def test_runq_equals_the_numpy_int8_reference(c_builds, tok512_bin, tmp_path, shape, shared):
    """Group sizes 64 and 32 take runq's unrolled AVX2 path (where compiled in), 16 its generic
    one, 8 the scalar one: all the same ids as the reference."""
    path = export.export_bin(random_model(shape, shared), tmp_path / "m.bin", 2)
    got = c_ids(c_builds["runq"], path, tok512_bin, "-t", 0, "-n", 40)
    want = until_bos(Int8Reference(path).greedy([1], 40))
    assert len(set(want)) > 10
    assert got == want


def test_runq_on_the_trained_model(c_builds, tok512_bin, tiny_run, tmp_path):
    m = export.load_bin(tiny_run.out_dir / "model.bin")
    path = export.export_bin(m, tmp_path / "q.bin", 2)
    prompt = [1, 403, 407, 261, 378]
    ref = Int8Reference(path)
    got = c_ids(c_builds["runq"], path, tok512_bin, "-t", 0, "-n", 48)
    assert got == until_bos(ref.greedy([1], 48))
    # and the PyTorch simulation of runq (sample.py and the int8 benchmark use it)
    sim = export.load_bin(path).generate([prompt], 30, temperature=0.0, stop_at_bos=False)[0]
    assert sim == ref.greedy(prompt, 30)


def test_runq_shares_runs_command_line(c_builds, tok512_bin, tmp_path):
    path = export.export_bin(random_model("gs64"), tmp_path / "m.bin", 2)
    s1 = c_ids(c_builds["runq"], path, tok512_bin, "-t", 1.0, "-p", 0.9, "-s", 42, "-n", 32)
    assert s1 == c_ids(c_builds["runq"], path, tok512_bin, "-t", 1.0, "-p", 0.9, "-s", 42, "-n", 32)
    assert s1 != c_ids(c_builds["runq"], path, tok512_bin, "-t", 1.0, "-p", 0.9, "-s", 7, "-n", 32)
    text = subprocess.run([str(c_builds["runq"]), str(path), "-z", str(tok512_bin), "-t", "0.8", "-s", "1", "-n", "32",
                           "-i", "Once upon a time"], capture_output=True, text=True, timeout=30)
    assert text.returncode == 0 and text.stdout.startswith("Once upon a time") and "tok/s" in text.stderr
    for args, said in ((["-t", "abc"], "-t expects a number, got 'abc'"), (["-d", "2"], "-d expects 0 or 1"),
                       (["-m", "chat"], "unsupported mode 'chat'")):
        res = subprocess.run([str(c_builds["runq"]), str(path), "-z", str(tok512_bin), *args], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 1 and res.stderr.startswith(f"runq: error: {said}") and res.stdout == ""
    res = subprocess.run([str(c_builds["runq"]), str(path), "-z", str(tmp_path / "none.bin")], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1 and "runq: error: cannot open tokenizer file" in res.stderr


def test_runq_quantises_a_zero_group_to_zeros(c_builds, tok512_bin, tmp_path):
    """A layer of zeros makes an all-zero activation group: runq quantises it to zeros
    (llama2.c's runq would divide by zero) and the ids still equal the reference's."""
    import torch
    m = random_model("gs32")
    with torch.no_grad():
        m.layers[1].feed_forward.w1.weight.zero_()  # hb = silu(0) * w3 x = 0: w2's input is all zero
    path = export.export_bin(m, tmp_path / "z.bin", 2)
    assert c_ids(c_builds["runq"], path, tok512_bin, "-t", 0, "-n", 30) == until_bos(Int8Reference(path).greedy([1], 30))
