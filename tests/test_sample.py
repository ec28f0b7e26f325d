"""sample.py (llama2.c's): the ids model.generate draws for a seed, from a checkpoint or a
model file of any version, and the same samples as ./run at the seed of each sample."""

import os
import subprocess

import pytest

import export
import sample
from conftest import ROOT, SEQ, refused
from prebias import checkpoint
from prebias.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint
from prebias.common import UserError
from tokenizer import Tokenizer

PROMPT = "Once upon a time"


def printed(capsys) -> list[str]:
    out = capsys.readouterr().out
    blocks = out.split("---------------\n")
    assert blocks[-1] == ""
    return [b[:-1] for b in blocks[:-1]]  # each text ends with print's newline


def test_sample_reproduces_model_generate(tiny_run, capsys):
    ckpt = latest_checkpoint(tiny_run.out_dir)
    sample.main([f"--checkpoint={ckpt}", f"--start={PROMPT}", "--num_samples=3", "--max_new_tokens=30",
                 "--temperature=0.8", "--top_k=50", "--seed=7", "--device=cpu"])
    texts = printed(capsys)
    model = model_from_checkpoint(load_checkpoint(ckpt))
    enc = Tokenizer(tiny_run.data_dir / "tok512.model")
    ids = enc.encode(PROMPT)
    new = model.generate([ids] * 3, 30, temperature=0.8, top_k=50, seed=7)
    assert texts == [enc.decode(ids + n) for n in new]
    assert len(set(texts)) == 3 and all(t.startswith(PROMPT) for t in texts)
    sample.main([f"--checkpoint={ckpt}", f"--start={PROMPT}", "--num_samples=3", "--max_new_tokens=30",
                 "--temperature=0.8", "--top_k=50", "--seed=8", "--device=cpu"])
    other = printed(capsys)
    assert other[:2] == texts[1:]  # sample k uses seed + k


def test_sample_k_is_run_at_seed_plus_k(c_builds, tiny_run, capsys, tmp_path):
    enc = Tokenizer(tiny_run.data_dir / "tok512.model")
    tok512_bin = enc.export(tmp_path / "tok.bin")
    model_bin = tiny_run.out_dir / "model.bin"
    sample.main([f"--checkpoint={model_bin}", f"--tokenizer={tiny_run.data_dir / 'tok512.model'}",
                 f"--start={PROMPT}", "--num_samples=2", "--max_new_tokens=40", "--temperature=0.9", "--top_k=0",
                 "--top_p=0.9", "--seed=11", "--device=cpu"])
    texts = printed(capsys)
    ids = enc.encode(PROMPT)
    for k, text in enumerate(texts):
        r = subprocess.run([str(c_builds["run"]), str(model_bin), "-z", str(tok512_bin), "-t", "0.9", "-p", "0.9",
                            "-s", str(11 + k), "-n", str(len(ids) - 1 + 40), "-i", PROMPT, "-d", "1"],
                           capture_output=True, text=True, timeout=60)
        run_ids = [int(t) for t in r.stdout.split()]  # the prompt after BOS, then the samples
        assert run_ids[:len(ids) - 1] == ids[1:]
        assert text == enc.decode(ids + run_ids[len(ids) - 1:])


def test_sample_from_an_int8_file_is_runqs_greedy(c_builds, tiny_run, capsys, tmp_path):
    enc = Tokenizer(tiny_run.data_dir / "tok512.model")
    q = export.export_bin(export.load_bin(tiny_run.out_dir / "model.bin"), tmp_path / "q.bin", 2)
    sample.main([f"--checkpoint={q}", f"--tokenizer={tiny_run.data_dir / 'tok512.model'}", "--temperature=0",
                 "--max_new_tokens=40", "--device=cpu"])
    (text,) = printed(capsys)
    r = subprocess.run([str(c_builds["runq"]), str(q), "-z", str(enc.export(tmp_path / "t.bin")), "-t", "0", "-n", "40",
                        "-d", "1"], capture_output=True, text=True, timeout=60)
    assert text == enc.decode([1] + [int(t) for t in r.stdout.split()])


def test_sample_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sample.main([f"--checkpoint={tmp_path / 'none.pt'}"])
    with pytest.raises(UserError, match="choose one of"):
        sample.main([f"--checkpoint={tiny_run.out_dir / 'model.bin'}", "--dtype=int4"])
    with pytest.raises(UserError, match="not the one the checkpoint was trained with"):
        sample.main([f"--checkpoint={latest_checkpoint(tiny_run.out_dir)}", f"--tokenizer={ROOT / 'tokenizer.model'}"])


# -----------------------------------------------------------------------------
# the context's limit and the sampling flags

def test_generation_cut_by_the_context_is_said(tiny_run, capsys):
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    sample.main([f"--checkpoint={ck}", "--max_new_tokens=1000000", "--device=cpu", "--temperature=0"])
    assert f"is cut to {SEQ + 1 - 1}" in capsys.readouterr().err  # the prompt: BOS alone


@pytest.mark.parametrize("flag", ["--temperature=-1", "--top_p=2", "--top_p=-0.5", "--top_k=-1"])
def test_sample_flags_out_of_range_are_refused(tiny_run, flag, capsys):
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    refused(lambda: sample.main([f"--checkpoint={ck}", "--max_new_tokens=4", "--device=cpu", flag]),
            flag.split("=")[0] + "=")
    assert capsys.readouterr().out == ""


def test_prompt_files_and_terminals_that_fail_are_one_line_or_replaced(tiny_run, tmp_path):
    """A binary prompt file was a UnicodeDecodeError traceback; a prompt longer than the
    context was cut, and a token of the cut prompt printed after the full one; a terminal
    that cannot print a character was a UnicodeEncodeError. Seen failing on the old code."""
    import sys
    ckpt = latest_checkpoint(tiny_run.out_dir)
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(UserError, match=r"--start=FILE:.*bin.txt: not UTF-8 text \(byte 0\): give a text file"):
        sample.main([f"--checkpoint={ckpt}", f"--start=FILE:{tmp_path / 'bin.txt'}", "--device=cpu"])
    with pytest.raises(UserError, match=r"the prompt is \d+ tokens \(with BOS\), longer than the model's context of 64"):
        sample.main([f"--checkpoint={ckpt}", "--start=" + "Once upon a time " * 40, "--device=cpu"])
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={ckpt}", "--start=Zoë saw a café",
                        "--max_new_tokens=4", "--device=cpu"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and r.stdout.startswith("Zo? saw a caf?"), r.stderr[-1000:]
