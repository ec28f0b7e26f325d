"""schedule.py: every strategy against hand-derived ids, phases, exclusion, the spec's
validation and the structured fingerprint."""

import json
import re

import numpy as np
import pytest

import train
from conftest import TinyRun
from prebias import schedule as S
from prebias import stream
from prebias.common import UserError
from prebias.data import BatchData

IDS = np.arange(10, 20)
METRIC = np.array([5, 3, 9, 1, np.nan, 7, 2, 8, 6, 4], dtype=float)  # by id: 13 < 16 < 11 < 19 < 10 < 18 ...


def sched(phases, B=2, seed=3, max_iters=10, **top):
    return S.Schedule({"phases": phases, **top}, IDS, B, seed=seed, max_iters=max_iters, metric_of=lambda m: METRIC)


def steps(s, n):
    return [s.step_ids(t).tolist() for t in range(n)]


def test_shuffle_covers_each_batch_once_per_epoch_and_is_pure():
    s = S.Schedule({"phases": [{"strategy": "shuffle"}]}, np.arange(100, 130), 6, seed=3, max_iters=10)
    epoch = np.concatenate([s.step_ids(k) for k in range(5)])
    assert sorted(epoch) == list(range(100, 130)) and not np.array_equal(epoch, np.arange(100, 130))
    again = S.Schedule({"phases": [{"strategy": "shuffle"}]}, np.arange(100, 130), 6, seed=3, max_iters=10)
    assert np.array_equal(again.step_ids(7), s.step_ids(7))  # random access: a pure function of the step
    other = S.Schedule({"phases": [{"strategy": "shuffle"}]}, np.arange(100, 130), 6, seed=4, max_iters=10)
    assert other.fingerprint() != s.fingerprint()


def test_sorted_and_filter():
    asc = sched([{"strategy": "sorted", "metric": "m"}], B=5)
    assert steps(asc, 3) == [[13, 16, 11, 19, 10], [18, 15, 17, 12, 14], [13, 16, 11, 19, 10]]  # NaN last
    desc = sched([{"strategy": "sorted", "metric": "m", "order": "desc"}], B=5)
    assert desc.step_ids(0).tolist() == [12, 17, 15, 18, 10]
    filt = sched([{"strategy": "filter", "metric": "m", "lo": 3, "hi": 6}])
    assert sorted(sum(steps(filt, 2), [])) == [10, 11, 18, 19]
    with pytest.raises(S.SpecError, match="no batches"):
        sched([{"strategy": "filter", "metric": "m", "lo": 100}])


def test_competence_draws_from_the_easiest_fraction():
    # 10 batches ranked by metric: 13, 16, 11, 19, 10, 18, 15, 17, 12, (14: NaN last)
    # linear pacing, c0 = 0.2, ramp over the 8-step phase: c(t) = 0.2 + 0.8 t/8, m = ceil(10 c)
    s = sched([{"strategy": "competence", "metric": "m", "pacing": "linear", "c0": 0.2, "steps": 8},
               {"strategy": "shuffle"}], B=2, max_iters=12)
    ranked = [13, 16, 11, 19, 10, 18, 15, 17, 12, 14]
    for t, m in [(0, 2), (1, 3), (2, 4), (4, 6), (7, 9)]:
        assert set(s.step_ids(t)) <= set(ranked[:m]), t
    assert sorted(s.step_ids(0)) == [13, 16]  # the 2 easiest, without repeat in the step
    assert S.pacing("root", 0.1, np.array([0, 1]))[0] == pytest.approx(0.1)
    assert S.pacing("step", 0.2, np.array([0.0, 0.19, 0.2, 1.0]), 5).tolist() == pytest.approx([0.2, 0.2, 0.36, 1.0])
    assert S.pacing("exp", 0.25, np.array([0.0, 0.5, 0.99, 1.0])).tolist() == [0.25, 0.5, 0.5, 1.0]


def test_mixture_apportions_rows_to_bins():
    # bounds [0, 4.5, 10): bin 0 = {13:1, 16:2, 11:3, 19:4}, bin 1 = {10:5, 18:6, 15:7, 17:8, 12:9}
    s = sched([{"strategy": "mixture", "metric": "m", "bounds": [0, 4.5, 10], "weights": [0.25, 0.75]}], B=4)
    for t in range(6):
        ids = s.step_ids(t).tolist()
        assert set(ids[:1]) <= {13, 16, 11, 19} and set(ids[1:]) <= {10, 18, 15, 17, 12}, t
    low = [s.step_ids(t)[0] for t in range(4)]
    assert sorted(low) == [11, 13, 16, 19]  # one epoch of bin 0, no repeat
    # interpolated: all rows from bin 1 at the first step, all from bin 0 at the last
    s2 = sched([{"strategy": "mixture", "metric": "m", "bounds": [0, 4.5, 10], "weights_start": [0, 1],
                 "weights_end": [1, 0], "steps": 5}], B=4, max_iters=5)
    assert set(s2.step_ids(0)) <= {10, 18, 15, 17, 12} and set(s2.step_ids(4)) <= {13, 16, 11, 19}
    assert S.apportion(np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]), 4).tolist() == [[2, 1, 1], [2, 1, 1]]


def test_interleave_alternates_two_orders_by_step():
    s = sched([{"strategy": "interleave", "ratio": [2, 1], "orders": [
        {"strategy": "sorted", "metric": "m"}, {"strategy": "sorted", "metric": "m", "order": "desc"}]}], B=2)
    assert steps(s, 6) == [[13, 16], [11, 19], [12, 17], [10, 18], [15, 17], [15, 18]]


def test_phases_switch_at_their_steps(tmp_path):
    s = sched([{"strategy": "sorted", "metric": "m", "steps": 2},
               {"strategy": "sorted", "metric": "m", "order": "desc", "fraction": 0.3},
               {"strategy": "sorted", "metric": "m"}], B=2, max_iters=10)
    assert s.bounds == [(0, 2), (2, 5), (5, 10)]
    assert steps(s, 6) == [[13, 16], [11, 19], [12, 17], [15, 18], [10, 19], [13, 16]]  # each phase starts fresh


def test_exclude_keeps_the_order_of_the_rest(tmp_path):
    np.save(tmp_path / "x.npy", np.array([16, 19]))
    s = sched([{"strategy": "sorted", "metric": "m"}], B=3, exclude=str(tmp_path / "x.npy"))
    assert steps(s, 3) == [[13, 11, 10], [18, 15, 17], [12, 14, 13]]
    base = sched([{"strategy": "sorted", "metric": "m"}], B=3)
    assert base.fingerprint() != s.fingerprint()


@pytest.mark.parametrize("spec, msg", [
    ({"phases": []}, "needs a non-empty list 'phases'"),
    ({"phases": [{"strategy": "zigzag"}]}, r"phases\[0\].strategy: 'zigzag' is not one of"),
    ({"phases": [{"strategy": "sorted"}]}, r"phases\[0\].metric: strategy sorted needs a batch metric"),
    ({"phases": [{"strategy": "shuffle", "speed": 2}]}, r"phases\[0\]: unknown key 'speed'"),
    ({"phases": [{"strategy": "shuffle"}, {"strategy": "shuffle"}]}, r"phases\[0\]: only the last phase may omit"),
    ({"phases": [{"strategy": "competence", "metric": "m", "c0": 0}]}, r"phases\[0\].c0: 0 must be a number in \(0, 1\]"),
    ({"phases": [{"strategy": "mixture", "metric": "m", "quantiles": [0, 1]}]}, r"quantiles: needs at least 3"),
    ({"phases": [{"strategy": "mixture", "metric": "m", "bounds": [0, 1, 2], "weights": [1]}]}, "needs 2 weights"),
    ({"phases": [{"strategy": "interleave", "orders": [{"strategy": "shuffle"}]}]}, "needs a list of 2 sub-orders"),
    ({"phases": [{"strategy": "shuffle"}], "extra": 1}, "unknown key 'extra'"),
])
def test_bad_specs_name_the_field(spec, msg):
    with pytest.raises(S.SpecError, match=msg):
        S.validate_spec(spec)


def test_fingerprint_is_structured_not_a_display_string(monkeypatch):
    a = sched([{"strategy": "sorted", "metric": "m"}])
    monkeypatch.setattr(S.Schedule, "desc", property(lambda self: "reworded"))
    assert sched([{"strategy": "sorted", "metric": "m"}]).fingerprint() == a.fingerprint()
    rec = a.record()
    assert rec["spec"]["phases"][0] == {"strategy": "sorted", "metric": "m", "order": "asc"}
    assert rec["bounds"] == [[0, None]]  # a sorted order does not depend on the run's length
    # ...a competence order does
    c = sched([{"strategy": "competence", "metric": "m"}], max_iters=10)
    assert c.fingerprint() != sched([{"strategy": "competence", "metric": "m"}], max_iters=20).fingerprint()


def test_spec_file_in_train_and_bad_spec_writes_nothing(tiny_run, tmp_path):
    spec = {"phases": [{"strategy": "competence", "metric": "fk_grade", "c0": 0.1, "fraction": 0.5},
                       {"strategy": "shuffle"}]}
    (tmp_path / "plan.json").write_text(json.dumps(spec))
    cfg = train.parse_config(train.TrainConfig(), tiny_run.train_args(schedule_spec=tmp_path / "plan.json"),
                             train.CHOICES)
    s = stream.build_schedule(cfg, BatchData(tiny_run.data_dir, 512, 64))
    assert s.bounds == [(0, 12), (12, 24)] and s.spec["phases"][0]["pacing"] == "root"
    (tmp_path / "bad.json").write_text(json.dumps({"phases": [{"strategy": "sorted", "metric": "nope"}]}))
    run = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "never")
    with pytest.raises(train.UserError, match="unknown batch metric 'nope'"):
        train.main(run.train_args(schedule_spec=tmp_path / "bad.json"))
    assert not run.out_dir.exists()


@pytest.mark.parametrize("name", sorted(S.STRATEGIES))  # an example spec per registered strategy
def test_example_specs_load(name, tiny_run, tmp_path):
    from conftest import ROOT
    path = ROOT / "config" / "schedules" / f"{name}.json"
    if name == "replay":  # its example replays the default run's recorded order: the tiny run's here
        (tmp_path / "replay.json").write_text(path.read_text().replace("out/batch_ids.npy",
                                                                       str(tiny_run.out_dir / "batch_ids.npy")))
        path = tmp_path / "replay.json"
    spec = S.validate_spec(json.loads(path.read_text()))
    assert name in {p["strategy"] for p in spec["phases"]}
    cfg = train.parse_config(train.TrainConfig(), tiny_run.train_args(schedule_spec=path), train.CHOICES)
    s = stream.build_schedule(cfg, BatchData(tiny_run.data_dir, 512, 64))
    assert all(len(s.step_ids(t)) == 8 for t in range(24))


# -----------------------------------------------------------------------------
# a spec's or an exclude list's error names the file, the field and the fix (through train.py)

SHORT = dict(max_iters=2, eval_interval=2)


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


def test_phase_fractions_summing_above_one_are_refused(tmp_path):
    """[0.7, 0.5, rest]: the third phase never ran, without a word (seen failing: accepted)."""
    from prebias.schedule import SpecError, load_spec
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"phases": [{"strategy": "shuffle", "fraction": 0.7},
                                        {"strategy": "sorted", "metric": "fk_grade", "fraction": 0.5},
                                        {"strategy": "shuffle"}]}))
    with pytest.raises(SpecError, match=rf"schedule spec {p}: phases\[1\].fraction: the phases' fractions sum to 1.2"):
        load_spec(p)
    p.write_text(json.dumps({"phases": [{"strategy": "shuffle", "fraction": 0.5},
                                        {"strategy": "sorted", "metric": "fk_grade", "fraction": 0.5}]}))
    assert len(load_spec(p)["phases"]) == 2  # exactly 1 is the whole run
