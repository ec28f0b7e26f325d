"""prebias/inputs.py, the checked readers of the files a user or a stage hands over: a
missing file is an error unless the caller says a missing one is fine, and a damaged one
is an error all the same."""

import pytest

from prebias import launchers
from prebias.common import UserError
from prebias.inputs import read_json


def test_read_json_takes_a_missing_file_only_when_the_caller_says_so(tmp_path):
    p = tmp_path / "r.json"
    with pytest.raises(UserError, match=r"r\.json is missing \(a record\): rebuild it$"):
        read_json(p, "a record", "rebuild it")
    assert read_json(p, "a record", "rebuild it", missing={}) == {}
    p.write_text('{"a": 1')
    with pytest.raises(UserError, match=r"r\.json is not valid JSON \(a record: .*\): rebuild it$"):
        read_json(p, "a record", "rebuild it", missing={})


def test_a_damaged_slurm_progress_record_is_one_line_not_a_fresh_start(tmp_path):
    """The launcher's progress file: none before the job starts ({}); a damaged one used to
    read as {} too, so the job ran every stage again."""
    assert launchers.read_progress(tmp_path) == {}
    (tmp_path / launchers.PROGRESS).write_text('{"done": ["train"')
    with pytest.raises(UserError, match=rf"{launchers.PROGRESS} is not valid JSON .*delete it to run the job's stages"):
        launchers.read_progress(tmp_path)
