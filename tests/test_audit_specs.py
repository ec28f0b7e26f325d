"""Issue 21, specs: a schedule spec's error names the spec file, the field and the fix; an
exclude list's names the flag as passed and the file; an experiment spec's bad settings
are refused before the lock and before any run folder exists."""

import json
import re

import numpy as np
import pytest

import experiment
import train
from conftest import TinyRun
from prebias.common import UserError

SHORT = dict(max_iters=2, eval_interval=2)


# -----------------------------------------------------------------------------
# schedule specs: every error line names the file, the field, and where the fix goes

def _npy(tmp_path, name, arr):
    np.save(tmp_path / name, arr)
    return str(tmp_path / name)


SPECS = [  # (spec, the field and problem the line must name)
    ({"phases": [{"strategy": "mixture", "metric": "fk_grade", "quantiles": [0, 0.5, 1],
                  "weights_start": [float("nan"), 1], "weights_end": [1, 1]}]},
     r"phases\[0\]\.weights_start\[0\]: nan must be a number in \[0, inf\]"),
    ({"phases": [{"strategy": "mixture", "metric": "fk_grade", "quantiles": [0, 0.7, 0.5], "weights": [1, 1]}]},
     r"phases\[0\]\.quantiles: edges must increase"),
    ({"phases": []}, r"needs a non-empty list 'phases'"),
    ([{"strategy": "shuffle"}], r"needs a non-empty list 'phases'"),
    ({"phases": [{"strategy": "nosuch"}]}, r"phases\[0\]\.strategy: 'nosuch' is not one of"),
    ({"phases": [{"strategy": "mixture", "metric": "fk_grade", "quantiles": [0, 0.5, 1], "weights": [-1, 1]}]},
     r"phases\[0\]\.weights\[0\]: -1 must be a number"),
    ({"phases": [{"strategy": "competence", "metric": "fk_grade", "ramp": 1e308}]}, r"phases\[0\]\.ramp"),
    ({"phases": [{"strategy": "shuffle", "fraction": 2.0}, {"strategy": "shuffle"}]},
     r"phases\[0\]\.fraction: 2\.0 must be a number in \(0, 1\]"),
    ({"phases": [{"strategy": "replay", "ids": "FLOATS"}]}, r"phases\[0\]\.ids: .* must hold a 2-D integer array"),
    ({"phases": [{"strategy": "replay", "ids": "/etc/passwd"}]},
     r"phases\[0\]\.ids: cannot read /etc/passwd \(ValueError\); it must be a \.npy"),
]


@pytest.mark.parametrize("spec, field", SPECS, ids=[f"s{i}" for i in range(len(SPECS))])
def test_a_schedule_spec_error_names_the_file_the_field_and_the_fix(tiny_data, tmp_path, spec, field):
    """Old code: 'schedule spec: phases[0]...' with no file and no fix."""
    if isinstance(spec, dict) and spec["phases"] and spec["phases"][0].get("ids") == "FLOATS":
        spec["phases"][0]["ids"] = _npy(tmp_path, "floats.npy", np.zeros((2, 8)))
    path = tmp_path / "s1.json"
    path.write_text(json.dumps(spec))
    run = TinyRun(*tiny_data, tmp_path / "out")
    with pytest.raises(UserError) as e:
        train.main(run.train_args(schedule_spec=path, **SHORT))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"schedule spec {path}: "), msg
    assert re.search(field, msg), msg
    assert msg.endswith(f"fix it in {path} (config/schedules/ has a working spec of each strategy)"), msg
    assert not run.out_dir.exists()


def test_a_spec_file_that_is_not_json_names_the_file(tiny_data, tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{phases: ")
    run = TinyRun(*tiny_data, tmp_path / "out")
    with pytest.raises(UserError, match=rf"^schedule spec {re.escape(str(path))}: cannot read it \(JSONDecodeError"):
        train.main(run.train_args(schedule_spec=path, **SHORT))


@pytest.mark.parametrize("with_spec", [False, True])
def test_an_exclude_error_names_the_flag_as_passed_and_the_file(tiny_data, tmp_path, with_spec):
    """Old code: '--schedule.exclude: none of its 1 ids...' (or 'schedule spec ....exclude'),
    never '--schedule_exclude' and never the file."""
    excl = _npy(tmp_path, "excl.npy", np.array([10 ** 12]))
    over = {}
    if with_spec:
        (tmp_path / "plan.json").write_text(json.dumps({"phases": [{"strategy": "shuffle"}]}))
        over["schedule_spec"] = tmp_path / "plan.json"
    run = TinyRun(*tiny_data, tmp_path / "out")
    with pytest.raises(UserError, match=rf"^--schedule_exclude={re.escape(excl)}: none of its 1 ids is a training"):
        train.main(run.train_args(schedule_exclude=excl, **SHORT, **over))
    bad = tmp_path / "notnpy.npy"
    bad.write_text("hello")
    with pytest.raises(UserError, match=rf"^--schedule_exclude={re.escape(str(bad))}: cannot read"):
        train.main(run.train_args(schedule_exclude=bad, **SHORT, **over))


def test_an_exclude_in_the_spec_names_the_spec_and_the_file(tiny_data, tmp_path):
    excl = _npy(tmp_path, "excl.npy", np.array([10 ** 12]))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"phases": [{"strategy": "shuffle"}], "exclude": excl}))
    run = TinyRun(*tiny_data, tmp_path / "out")
    with pytest.raises(UserError, match=rf"^schedule spec {re.escape(str(path))}: exclude={re.escape(excl)}: none of"):
        train.main(run.train_args(schedule_spec=path, **SHORT))
