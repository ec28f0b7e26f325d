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


# -----------------------------------------------------------------------------
# experiment specs: every value checked as the stages will read it, before any work

EXP_BAD = [  # (what the spec changes, the one line it must give after '<spec>: ')
    (lambda s: s["eval"].update(n_prompts=-2), r"eval\.n_prompts=-2: must be positive"),
    (lambda s: s["eval"].update(top_p=1.5), r"eval\.top_p=1\.5: must be in \[0, 1\]"),
    (lambda s: s["durability"].update(R="many"), r"durability\.R=many: expected int"),
    (lambda s: s["durability"].update(n_contexts=-1), r"durability\.n_contexts=-1: must be 0 \(none\) or more"),
    (lambda s: s["metrics"].append("nosuch_metric"), r"metrics: 'nosuch_metric' is not a column the runs'"),
    (lambda s: s.update(primary=["out_nosuch"]), r"primary: 'out_nosuch' is not a column"),
    (lambda s: s["base"].update(learning_rate=float("inf")), r"base\.learning_rate=inf: expected a finite number"),
    (lambda s: s["base"].update(beta2=5), r"base\.beta2=5.*must be in \[0, 1\)"),
    (lambda s: s["arms"]["curriculum"].update(dim=30), r"arms\.curriculum\.dim=30, --n_heads=4"),
    (lambda s: s["arms"]["curriculum"].update(schedule="nosuch"), r"arms\.curriculum\.schedule=nosuch: choose one of"),
    (lambda s: s["arms"]["shuffle"].update(schedule_spec="SPEC"),
     r"arms\.shuffle\.schedule_spec: schedule spec .*bad_plan\.json: phases\[0\]\.strategy: 'nosuch'"),
]


@pytest.mark.parametrize("change, line", EXP_BAD, ids=[f"e{i}" for i in range(len(EXP_BAD))])
def test_a_bad_experiment_value_is_one_line_before_any_folder(tiny_data, tmp_path, change, line):
    """Old code: the runs were planned, their folders made and (but for the metrics) trained
    first; the error came from a stage, or from the aggregation, without the spec's field."""
    from conftest import experiment_spec
    path = experiment_spec(tiny_data, tmp_path / "exp.json")
    spec = json.loads(path.read_text())
    spec["base"]["data_dir"] = str(tmp_path / "no_data")  # the old code fails fast in train.py, not after hours
    (tmp_path / "bad_plan.json").write_text(json.dumps({"phases": [{"strategy": "nosuch"}]}))
    change(spec)
    if spec["arms"]["shuffle"].get("schedule_spec") == "SPEC":
        spec["arms"]["shuffle"]["schedule_spec"] = str(tmp_path / "bad_plan.json")
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        experiment.main([str(path), f"--out_root={out}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert re.match(line, msg[len(f"{path}: "):]), msg
    assert not out.exists()  # no experiment folder, no lock, no run folder


def test_the_columns_the_runs_have_are_accepted_as_metrics(tiny_data, tmp_path):
    """Every default metric, its input twin, the sampled twin, the since means and the tag
    measures pass the check (a check that refused them would stop every experiment)."""
    from conftest import experiment_spec
    cols = experiment.DEFAULT_METRICS + [f"in_{m[4:]}_cum" for m in experiment.DEFAULT_METRICS
                                         if m not in ("val_loss", "out_bleu", "out_rouge_l")]  # not batch metrics
    cols += ["out_fk_grade_sampled", "in_noisy_since", "out_prefix_match", "val_ppl", "train_loss", "n_batches_cum",
             "tag_secret_exposure", "tag_my_tag_gap_ctx", "tag_x_exposure_extrap"]
    path = experiment_spec(tiny_data, tmp_path / "exp.json", metrics=cols, primary=["val_loss", "out_ref_nll"])
    spec = experiment.load_spec(path)
    assert spec["metrics"] == cols
    for bad in ("tag_secret", "tag__exposure", "in_fk_grade", "in_bleu_cum", "out_", "arm", "seed"):
        assert not experiment.is_summary_column(bad), bad
