"""Every stage script, run as a user runs it, turns bad input into one line on stderr
naming the file and the fix, exit code 1, and no traceback."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("argv, needle", [
    (["tinystories.py", "pretokenize", "--data_dir={tmp}"], "tinystories.py download"),
    (["tinystories.py", "train_vocab", "--data_dir={tmp}"], "tinystories.py download"),
    (["train.py", "--data_dir={tmp}", "--out_dir={tmp}/out"], "no batch index in"),
    (["train.py", "--dmi=64"], "unknown config key 'dmi'"),
    (["export.py", "{tmp}/m.bin", "--latest", "--out_dir={tmp}/nothing"], "no checkpoints in"),
    (["eval.py", "--out_dir={tmp}/nothing"], "{tmp}/nothing"),
    (["visualize_attn.py", "--out_dir={tmp}/nothing"], "{tmp}/nothing"),
    (["visualize_sat_output.py", "--out_dir={tmp}/nothing"], "{tmp}/nothing"),
    (["tokenizer.py", "-t", "{tmp}/none.model"], "none.model not found"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 1, out.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    assert needle.format(tmp=tmp_path) in err[0]
