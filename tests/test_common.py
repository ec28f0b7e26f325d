"""prebias/common.py: main_guard, which every command runs under, and the one checked JSON
parse (duplicate keys refused, nesting too deep for the parser said in one line), as every
spec, config and record reader meets it."""

import sys

import pytest

import experiment
from prebias import checkpoint, configs, hf, inputs, schedule
from prebias.common import UserError, json_loads, main_guard, parse_config


def test_a_reader_that_leaves_the_pipe_ends_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main_guard points it at /dev/null: put it back after
    def main():
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(SystemExit) as e:
        main_guard(main)
    assert e.value.code == 141 and capsys.readouterr().err == ""

DEEP = "[" * 100_000 + "]" * 100_000
DUP = '{"phases": [{"strategy": "shuffle"}], "phases": [{"strategy": "sorted", "metric": "fk_grade"}]}'


def test_json_loads_refuses_duplicate_keys_and_deep_nesting():
    with pytest.raises(ValueError, match="duplicate key 'phases'"):
        json_loads(DUP)
    with pytest.raises(ValueError, match="nested deeper than"):
        json_loads(DEEP)
    assert json_loads('{"a": {"a": 1}, "b": [{"a": 2}]}') == {"a": {"a": 1}, "b": [{"a": 2}]}  # one per object
    assert json_loads('[{"x": 1, "x": 2}]', unique=False) == [{"x": 2}]  # raw shards: speed, not specs


def readers(tmp_path):
    """(name, call on a path) of the readers of the project's JSON inputs."""
    def run_config(p):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "config.json").write_text(p.read_text())
        return checkpoint.run_config(tmp_path / "run")

    def hf_config(p):
        (tmp_path / "hf").mkdir(exist_ok=True)
        (tmp_path / "hf" / "config.json").write_text(p.read_text())
        return hf.load_hf(tmp_path / "hf")
    return [("train config", lambda p: parse_config(configs.TrainConfig(), [str(p)])),
            ("experiment spec", experiment.load_spec),
            ("schedule spec", schedule.load_spec),
            ("read_json (tag files, records)", lambda p: inputs.read_json(p, "a record", "fix it")),
            ("run config.json", run_config),
            ("Hugging Face config.json", hf_config)]


@pytest.mark.parametrize("case", ["duplicate", "deep"])
def test_every_json_reader_refuses_in_one_line(tmp_path, case):
    """Seen failing on the old code: duplicate keys kept the last value (two arms of one
    name: one arm) and a deep file was a RecursionError traceback."""
    p = tmp_path / "in.json"
    p.write_text(DUP.replace("phases", "seed") if case == "duplicate" else DEEP)
    for name, read in readers(tmp_path):
        with pytest.raises((UserError, schedule.SpecError)) as e:
            read(p)
        msg = str(e.value)
        assert "\n" not in msg and ("duplicate key 'seed'" in msg if case == "duplicate" else "nested deeper" in msg), \
            (name, msg)


def test_two_arms_of_one_name_are_refused(tmp_path):
    p = tmp_path / "exp.json"
    p.write_text('{"base": {}, "arms": {"a": {}, "a": {"seed": 2}}, "seeds": [1]}')
    with pytest.raises(UserError, match="duplicate key 'a'"):
        experiment.load_spec(p)


FAULTS_SCRIPT = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from prebias.common import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(8):  # a 48 MB activation allocated and freed: glibc settles within a few rounds
    torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # a training step's pattern: the same large tensor allocated and freed again
    torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_stops_refaulting_a_reallocated_activation(tmp_path):
    """train.py on CPU calls keep_freed_memory: a 48 MB block freed and allocated again faults
    its 12,288 pages in again every time by default; once kept, after a few rounds, never."""
    import subprocess
    from pathlib import Path
    script = FAULTS_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]))
    out = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                check=True).stdout.split() for mode in ("default", "keep")}
    assert out["keep"][0] == "True"
    pages = 5 * (48 << 20) // 4096
    assert int(out["default"][1]) >= 0.9 * pages  # every reallocation touched fresh pages
    assert int(out["keep"][1]) < 0.05 * pages
