"""prebias/common.py: main_guard, which every command runs under."""

import sys

import pytest

from prebias.common import main_guard


def test_a_reader_that_leaves_the_pipe_ends_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main_guard points it at /dev/null: put it back after
    def main():
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(SystemExit) as e:
        main_guard(main)
    assert e.value.code == 141 and capsys.readouterr().err == ""
