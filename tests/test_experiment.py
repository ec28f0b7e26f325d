"""experiment.py and stats.py: the statistics against hand-computed cases, the spec's
checks, and a tiny experiment killed, resumed and aggregated (tests/conftest.py)."""

import json
import math
import re
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import experiment
from conftest import experiment_spec
from prebias import saturation, stats
from prebias.common import FolderLock, UserError

# -----------------------------------------------------------------------------
# statistics on known numbers

def test_mean_interval_by_hand():
    n, m, sd, lo, hi = stats.mean_interval([1.0, 2.0, 3.0, np.nan])
    assert (n, m, sd) == (3, 2.0, 1.0)
    h = 4.30265273 / math.sqrt(3)  # t(0.975, df=2) from a printed table
    assert lo == pytest.approx(2 - h, abs=1e-7) and hi == pytest.approx(2 + h, abs=1e-7)
    n, m, sd, lo, hi = stats.mean_interval([5.0])
    assert (n, m) == (1, 5.0) and math.isnan(sd) and math.isnan(lo)
    assert stats.mean_interval([np.nan])[0] == 0


def test_welch_by_hand():
    w = stats.welch([1, 2, 3], [4, 6, 8])
    # variances 1 and 4 over 3 each: se^2 = 1/3 + 4/3 = 5/3; df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    assert w["diff"] == 4.0
    assert w["df"] == pytest.approx(50 / 17, rel=1e-12)
    h = sps.t.ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert (w["lo"], w["hi"]) == (pytest.approx(4 - h), pytest.approx(4 + h))
    assert w["p_welch"] == pytest.approx(0.0547867660, abs=1e-9)
    assert w["p_welch"] == pytest.approx(sps.ttest_ind([4, 6, 8], [1, 2, 3], equal_var=False).pvalue, rel=1e-9)
    assert math.isnan(stats.welch([1], [2, 3])["p_welch"])  # one seed: no test
    assert math.isnan(stats.welch([1, 1], [2, 2])["p_welch"])  # no spread: no test


def test_permutation_exact():
    # 20 splits of 6 values into 3 + 3; only the observed split and its mirror reach |diff| = 4
    assert stats.permutation_p([1, 2, 3], [4, 6, 8]) == pytest.approx(2 / 20)
    # |diff| >= 1 needs a group sum <= 6 or >= 9: 10 of the 20 splits
    assert stats.permutation_p([1, 2, 3], [2, 3, 4]) == pytest.approx(10 / 20)
    assert stats.permutation_p([1, 2, 3], [1, 2, 3]) == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04); NaN stays out of the family
    got = stats.holm([0.01, 0.04, 0.03, np.nan])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(got[3])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _runs_frame():
    """Two arms x 3 seeds, checkpoints 0 and 10; step 0 holds wild values that the
    end-of-run tables must ignore."""
    rows = []
    for arm, m1, m2 in (("base", [1, 2, 3], [10, 11, 12]), ("x", [4, 6, 8], [10, 12, 11])):
        for k, seed in enumerate((1, 2, 3)):
            rows.append({"arm": arm, "seed": seed, "iter": 0, "m1": 100.0, "m2": -50.0})
            rows.append({"arm": arm, "seed": seed, "iter": 10, "m1": float(m1[k]), "m2": float(m2[k])})
    return pd.DataFrame(rows)


def test_paired_and_sign_flip_by_hand():
    # d = [3, 4, 5]: mean 4, sd 1, se 1/sqrt(3), t = 4 sqrt(3) on 2 df
    r = stats.paired(pd.Series([1.0, 2.0, 3.0], index=[1, 2, 3]), pd.Series([4.0, 6.0, 8.0], index=[1, 2, 3]))
    assert (r["diff"], r["df"], r["n_pairs"]) == (4.0, 2.0, 3)
    assert r["p_paired"] == pytest.approx(2 * sps.t.sf(4 * math.sqrt(3), 2), rel=1e-12)
    assert r["p_paired"] == pytest.approx(sps.ttest_rel([4, 6, 8], [1, 2, 3]).pvalue, rel=1e-9)
    h = sps.t.ppf(0.975, 2) / math.sqrt(3)
    assert (r["lo"], r["hi"]) == (pytest.approx(4 - h), pytest.approx(4 + h))
    # pairs are matched by seed, not by position; a seed one arm lacks is left out
    r = stats.paired(pd.Series([3.0, 1.0, 2.0, 9.0], index=[3, 1, 2, 7]), pd.Series([4.0, 6.0, 8.0], index=[1, 2, 3]))
    assert r["n_pairs"] == 3 and r["diff"] == 4.0
    # sign flips of [3, 4, 5]: only all + and all - reach |mean| 4: 2 of 8
    assert stats.sign_flip_p([3, 4, 5]) == pytest.approx(2 / 8)
    assert stats.sign_flip_p([1, -1]) == 1.0
    # random flips (above 2^14): never 0, (b + 1) / (m + 1)
    assert stats.sign_flip_p(np.full(20, 1.0), draws=999) == pytest.approx(1 / 1000 * (1 + 999 * 2 ** -19), abs=2e-3)
    assert stats.sign_flip_p(np.full(20, 1.0), draws=999) > 0


def test_monte_carlo_permutation_p_is_never_zero():
    a, b = np.arange(12.0), np.arange(12.0) + 100  # a split as extreme as this one is never drawn
    assert stats.permutation_p(a, b, max_exact=100) == pytest.approx(1 / 101)


def test_paired_sees_what_welch_cannot():
    """Seed-correlated arms: each seed's arms share a large seed effect, the arm shifts
    every seed by about -0.13. Welch compares the spread over seeds, paired the differences."""
    seeds = [1, 2, 3, 4, 5]
    base = pd.Series([3.16, 3.34, 2.69, 2.95, 3.05], index=seeds)
    arm = pd.Series([3.07, 3.16, 2.53, 2.83, 3.01], index=seeds)
    assert stats.welch(base, arm)["p_welch"] == pytest.approx(0.4697, abs=1e-4)
    assert stats.paired(base, arm)["p_paired"] == pytest.approx(0.00915, abs=1e-4)
    rows = [{"arm": a, "seed": s, "iter": 10, "m": float(v[s])} for a, v in (("base", base), ("x", arm)) for s in seeds]
    d = stats.difference_table(pd.DataFrame(rows), ["m"], ["base", "x"], "base", {"m": "output"})
    assert d["test"].iloc[0] == "paired"  # the default where every arm has the same seeds
    assert d["p"].iloc[0] == pytest.approx(0.00915, abs=1e-4)
    rows = [r for r in rows if not (r["arm"] == "x" and r["seed"] == 5)]
    assert stats.difference_table(pd.DataFrame(rows), ["m"], ["base", "x"], "base", {"m": "output"})["test"].iloc[0] \
        == "welch"  # seeds differ between the arms: no pairing


def test_difference_table_by_hand():
    df = _runs_frame()
    d = stats.difference_table(df, ["m1", "m2"], ["base", "x"], "base", {"m1": "output", "m2": "output"}, "welch")
    r1, r2 = d.set_index("metric").loc["m1"], d.set_index("metric").loc["m2"]
    assert (r1["baseline_mean"], r1["arm_mean"], r1["diff"]) == (2.0, 6.0, 4.0)
    assert r1["p"] == r1["p_welch"] == pytest.approx(0.0547867660, abs=1e-9)
    assert r1["p_permutation"] == pytest.approx(0.1)
    assert r1["p_paired"] == pytest.approx(2 * sps.t.sf(4 * math.sqrt(3), 2)) and r1["p_sign_flip"] == 0.25
    assert r2["diff"] == 0.0 and r2["p_welch"] == pytest.approx(1.0)
    # Holm over the two output metrics: 2 * 0.0548, then max(that, 1.0)
    assert r1["p_holm"] == pytest.approx(2 * 0.0547867660, abs=1e-8) and r2["p_holm"] == pytest.approx(1.0)
    # the simultaneous interval of a family of 2: level 1 - 0.05/2, on Welch's df 50/17 and se sqrt(5/3)
    h = sps.t.ppf(1 - 0.025 / 2, 50 / 17) * math.sqrt(5 / 3)
    assert (r1["lo_sim"], r1["hi_sim"], r1["family"]) == (pytest.approx(4 - h), pytest.approx(4 + h), 2)
    assert r1["lo_sim"] < r1["lo"] < r1["hi"] < r1["hi_sim"]
    # mdd80: the true difference at which Welch's t at the family's level rejects with probability 0.8
    crit = sps.t.ppf(1 - 0.025 / 2, 50 / 17)
    assert sps.nct.sf(crit, 50 / 17, r1["mdd80"] / math.sqrt(5 / 3)) == pytest.approx(0.8, abs=1e-9)
    f = stats.final_table(df, ["m1"], ["base", "x"]).set_index("arm")
    assert f.loc["x", "mean"] == 6.0 and f.loc["x", "values"] == "4 6 8" and f.loc["x", "iter"] == 10
    c = stats.curve_table(df, ["m1"])
    assert c[(c.arm == "x") & (c.iter == 0)]["mean"].item() == 100.0
    assert c[(c.arm == "x") & (c.iter == 0)]["sd"].item() == 0.0


def test_difference_table_two_seeds_many_metrics():
    """2 seeds (1 df) and a family of 12: t_{1-0.05/24, 1} is ~153, beyond the noncentrality a
    fixed bracket searched, and every 2-seed experiment stopped in mdd after all its runs."""
    rows = [{"arm": a, "seed": s, "iter": 10, **{f"m{j}": v + 0.1 * j * s + u * s * (j % 3 + 1) for j in range(12)}}
            for a, v, u in (("base", 1.0, 0.0), ("x", 1.3, 0.05)) for s in (1, 2)]
    metrics = [f"m{j}" for j in range(12)]
    d = stats.difference_table(pd.DataFrame(rows), metrics, ["base", "x"], "base", dict.fromkeys(metrics, "output"))
    assert (d["family"] == 12).all() and (d["test"] == "paired").all()
    crit = sps.t.ppf(1 - 0.05 / 12 / 2, 1)
    for _, r in d.iterrows():
        assert r["se"] > 0 and sps.nct.sf(crit, 1, r["mdd80"] / r["se"]) == pytest.approx(0.8, abs=1e-6)


def test_saturation_tables_by_hand():
    rows = []
    for seed, curve in ((1, [0, 5, 10, 10]), (2, [0, 9.8, 10, 10])):
        rows += [{"arm": "a", "seed": seed, "iter": it, "m": v} for it, v in zip((0, 1, 2, 4), curve)]
    per_run, per_arm = stats.saturation_tables(pd.DataFrame(rows), ["m"], ["a"], saturation.saturation_step)
    assert list(per_run["saturation_step"]) == [2.0, 1.0]  # 5 is 50% off; 9.8 is within 5%
    r = per_arm.iloc[0]
    assert (r["n"], r["mean"], r["min"], r["max"]) == (2, 1.5, 1.0, 2.0)


# -----------------------------------------------------------------------------
# the spec: one line naming the file and the field, and nothing written

@pytest.mark.parametrize("over, words", [
    ({"armz": {}}, "unknown key 'armz'"),
    ({"arms": {"a": {"lr": 1}}}, "unknown train.py key 'lr'"),
    ({"base": {"seed": 3}}, "sets 'seed'"),
    ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"eval": {"temprature": 1}}, "unknown eval.py key 'temprature'"),
    ({"arms": {"a b": {}}}, "plain folder name"),
])
def test_bad_spec_one_line(tiny_data, tmp_path, over, words):
    spec = experiment_spec(tiny_data, tmp_path / "bad.json", **over)
    with pytest.raises(UserError, match=re.escape(words)) as e:
        experiment.main([str(spec), f"--out_root={tmp_path / 'out'}"])
    assert str(spec) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_spec_not_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{arms: ")
    with pytest.raises(UserError, match="not valid JSON"):
        experiment.main([str(p), f"--out_root={tmp_path / 'out'}"])


# -----------------------------------------------------------------------------
# the tiny experiment (killed, resumed, rerun)

def _runs(x):
    return [(arm, seed, x.dir / arm / f"seed{seed}") for arm in ("shuffle", "curriculum") for seed in (1, 2)]


def test_killed_experiment_resumes_and_skips(tiny_experiment):
    killed, resumed = tiny_experiment.outputs
    assert "shuffle/seed1: durability done" in killed and "shuffle/seed2: train ..." in killed
    assert "curriculum" not in killed
    # the finished run is skipped, the killed one continues from a checkpoint of its own
    # (>= 8, not from scratch), the others start
    assert "shuffle/seed1: trained (step 80), skipped" in resumed and "shuffle/seed1: train ..." not in resumed
    m = re.search(r"shuffle/seed2: resume from step (\d+)", resumed)
    assert m and int(m.group(1)) >= 8, resumed
    assert "curriculum/seed1: train ..." in resumed and "curriculum/seed2: train ..." in resumed
    for _, _, d in _runs(tiny_experiment):
        ck = sorted(int(p.stem.split("_")[1]) for p in (d / "ckpt").glob("ckpt_*.pt"))
        assert ck == [0, 1, 2, 4, 8, 16, 32, 40, 80]
        assert np.load(d / "batch_ids.npy").shape == (80, 4)
        assert json.loads((d / "experiment_run.json").read_text())["settings"]["seed"] == d.name[4:]


def test_killed_run_trained_its_schedule(tiny_experiment):
    """The killed and resumed run trained exactly its schedule's ids at every step; the
    sorted arm's order does not depend on the seed, the shuffled one's does."""
    import types

    from prebias.checkpoint import run_config
    from prebias.data import BatchData
    from prebias.stream import build_schedule
    ids = {(arm, s): np.load(d / "batch_ids.npy") for arm, s, d in _runs(tiny_experiment)}
    cfg = types.SimpleNamespace(**run_config(tiny_experiment.dir / "shuffle" / "seed1"))
    sched = build_schedule(cfg, BatchData(cfg.data_dir, cfg.vocab_size, cfg.max_seq_len))
    assert np.array_equal(ids[("shuffle", 1)], np.stack([sched.step_ids(s) for s in range(80)]))
    assert np.array_equal(ids[("curriculum", 1)], ids[("curriculum", 2)])
    assert not np.array_equal(ids[("shuffle", 1)], ids[("shuffle", 2)])


def test_tables_match_the_runs(tiny_experiment):
    t = tiny_experiment.dir / "tables"
    final, diff = pd.read_csv(t / "final.csv"), pd.read_csv(t / "differences.csv")
    curves = pd.read_csv(t / "curves.csv")
    last = {(arm, seed): pd.read_csv(d / "tables" / "summary.csv").sort_values("iter").iloc[-1]
            for arm, seed, d in _runs(tiny_experiment)}
    for metric in ("val_loss", "out_ref_nll", "in_fk_grade_cum", "tag_secret_exposure"):
        vals = {arm: [last[(arm, s)][metric] if metric in last[(arm, s)] else np.nan for s in (1, 2)]
                for arm in ("shuffle", "curriculum")}
        if metric.startswith("tag_"):
            dur = {(arm, s): pd.read_csv(d / "tables" / "durability.csv") for arm, s, d in _runs(tiny_experiment)}
            vals = {arm: [dur[(arm, s)].query("iter == 80")["exposure"].item() for s in (1, 2)]
                    for arm in ("shuffle", "curriculum")}
        f = final[final.metric == metric].set_index("arm")
        for arm in vals:
            assert f.loc[arm, "mean"] == pytest.approx(np.mean(vals[arm]), rel=1e-12), metric
            assert f.loc[arm, "n"] == 2
        d = diff[diff.metric == metric].iloc[0]
        assert d["diff"] == pytest.approx(np.mean(vals["curriculum"]) - np.mean(vals["shuffle"]), rel=1e-9, abs=1e-12)
        if np.std(vals["curriculum"]) + np.std(vals["shuffle"]) > 0:
            ref = sps.ttest_ind(vals["curriculum"], vals["shuffle"], equal_var=False).pvalue
            assert d["p_welch"] == pytest.approx(ref, rel=1e-9)
    assert set(diff["side"]) == {"primary", "output", "input", "tag"}  # val_loss: a family of its own
    assert (diff[diff.side == "primary"]["metric"] == "val_loss").all()
    assert (diff[diff.metric == "val_loss"]["p_holm"] == diff[diff.metric == "val_loss"]["p"]).all()  # family of 1
    assert set(curves["iter"]) == {0, 1, 2, 4, 8, 16, 32, 40, 80}
    assert (curves[curves.metric == "val_loss"]["n"] == 2).all()  # NaN values (no input at step 0) are not counted
    assert (curves[(curves.metric == "in_fk_grade_cum") & (curves.iter == 0)]["n"] == 0).all()
    runs = pd.read_csv(t / "runs.csv")
    assert len(runs) == 4 and (runs["final_iter"] == 80).all()
    commit = json.loads((tiny_experiment.dir / "shuffle" / "seed1" / "run.json").read_text())["commit"]
    assert runs["commit"].iloc[0] == commit


def test_figures_are_drawn(tiny_experiment):
    for name in ("bands_output.png", "bands_input.png", "bands_tags.png", "forest.png"):
        im = matplotlib.image.imread(tiny_experiment.dir / "visualize" / name)
        assert im.shape[0] > 300 and im.shape[1] > 500 and im.std() > 0.05, name


def test_changed_arm_is_refused(tiny_experiment, tiny_data, tmp_path):
    spec = experiment_spec(tiny_data, tiny_experiment.spec.parent / "changed.json",
                           arms={"shuffle": {}, "curriculum": {"schedule": "sorted", "schedule_metric": "fk_grade",
                                                               "schedule_order": "desc"}})
    before = (tiny_experiment.dir / "experiment.json").read_text()
    with pytest.raises(UserError, match="trained with schedule_order=\\(unset\\), the spec now says desc"):
        experiment.main([str(spec), f"--out_root={tiny_experiment.out_root}", "--name=tiny", "--aggregate_only=True"])
    assert (tiny_experiment.dir / "experiment.json").read_text() == before


def test_second_experiment_on_the_folder_is_refused(tiny_experiment):
    lock = FolderLock(tiny_experiment.dir)
    try:
        with pytest.raises(UserError, match="is in use by pid"):
            experiment.main([str(tiny_experiment.spec), f"--out_root={tiny_experiment.out_root}",
                             "--aggregate_only=True"])
    finally:
        lock.release()


def test_aggregate_only_reproduces_the_tables(tiny_experiment, tmp_path):
    t = tiny_experiment.dir / "tables"
    before = {p.name: p.read_bytes() for p in t.glob("*.csv")}
    experiment.main([str(tiny_experiment.spec), f"--out_root={tiny_experiment.out_root}", "--aggregate_only=True"])
    assert {p.name: p.read_bytes() for p in t.glob("*.csv")} == before


# -----------------------------------------------------------------------------
# wandb, for real, offline

def wandb_records(path: Path):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobufs:
    32 KiB blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and n == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def wandb_run(folder: Path):
    """(run record, logged history keys) of every offline run under folder/wandb/."""
    out = []
    for f in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run, keys = None, set()
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
        out.append((run, keys))
    return out


def test_wandb_offline_logs_training_eval_and_figures(tiny_experiment):
    pytest.importorskip("wandb", reason="the optional extra (requirements-extra.txt) is not installed")
    assert tiny_experiment.wandb
    d = tiny_experiment.dir / "curriculum" / "seed2"
    runs = wandb_run(d)
    assert runs, f"no offline run under {d}/wandb"
    train = [k for r, k in runs if "loss" in k]
    assert train and {"loss", "lr", "tok_per_s", "mfu", "val_loss", "iter"} <= train[0]
    ev = [k for r, k in runs if "eval/val_loss" in k]
    assert ev and {"eval/iter", "eval/out_fk_grade", "eval/in_fk_grade_cum", "eval/generations/_type"} <= ev[0]
    for run, _ in runs:  # eval logged into the training run: same id, group and job type
        assert (run.run_id, run.run_group, run.job_type) == ("tiny-curriculum-seed2", "tiny", "curriculum")
        cfg = {c.key: json.loads(c.value_json) for c in run.config.update}
        assert cfg["seed"] == 2 and cfg["schedule"] == "sorted"
    agg = wandb_run(tiny_experiment.dir)
    assert agg and agg[-1][0].job_type == "aggregate"
    assert {"experiment/forest/_type", "experiment/bands_output/_type", "experiment/differences/_type"} <= agg[-1][1]


def test_experiment_without_wandb_is_clear(tmp_path, monkeypatch):
    """Asked for wandb where it is missing: one line saying how to install it."""
    from prebias import tracking
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(UserError, match="requirements-extra.txt"):
        tracking.start(project="p", dir=tmp_path, config={})


def test_spec_examples_load():
    for p in sorted(Path(experiment.ROOT / "config" / "experiments").glob("*.json")):
        spec = experiment.load_spec(p)
        assert spec["baseline"] in spec["arms"] and len(spec["seeds"]) >= 3, p


def test_wandb_without_login_is_one_line(tmp_path, monkeypatch):
    """Online mode with no API key: one line naming the fixes, not wandb's traceback."""
    pytest.importorskip("wandb", reason="the optional extra (requirements-extra.txt) is not installed")
    from prebias import tracking
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    with pytest.raises(UserError, match=r"wandb could not start a run \(.*\): run `wandb login`, or set WANDB_MODE"):
        tracking.start(project="p", dir=tmp_path, config={})


# -----------------------------------------------------------------------------
# the spec: every value checked as the stages will read it, before any folder

@pytest.mark.parametrize("how", ["stem", "flag_up", "flag_html"])
def test_an_experiment_name_that_leaves_out_root_is_refused(tiny_data, tmp_path, how):
    root = tmp_path / "w"
    root.mkdir()
    spec = experiment_spec(tiny_data, root / ("...json" if how == "stem" else "ok.json"))
    flag = {"stem": [], "flag_up": ["--name=../esc"], "flag_html": ["--name=<script>"]}[how]
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(UserError, match="experiment name .* must be a plain folder name"):
        experiment.main([str(spec), f"--out_root={root / 'out'}", "--aggregate_only=True", *flag])
    assert sorted(p.name for p in root.iterdir()) == before  # no out/, no experiment.json, no .lock beside the spec


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


# -----------------------------------------------------------------------------
# a one-arm experiment's differences table

def test_a_one_arm_experiment_writes_a_readable_empty_differences_table(tmp_path):
    import report
    spec = {"arms": {"shuffle": {}}, "baseline": "shuffle", "seeds": [1, 2], "metrics": ["val_loss"],
            "primary": ["val_loss"], "test": "auto", "base": {}, "name": "one", "question": ""}
    exp = tmp_path / "one"
    runs = []
    for seed in (1, 2):
        d = exp / "shuffle" / f"seed{seed}"
        (d / "tables").mkdir(parents=True)
        pd.DataFrame({"iter": [0, 4, 8], "val_loss": [6.2, 5.0 + seed / 10, 4.0 + seed / 10]}).to_csv(
            d / "tables" / "summary.csv", index=False)
        (d / "config.json").write_text(json.dumps({"seed": seed}))
        runs.append(experiment.Run("shuffle", seed, d, []))
    experiment.aggregate(exp, spec, runs)
    diff = pd.read_csv(exp / "tables" / "differences.csv")
    assert len(diff) == 0 and {"arm", "metric", "diff", "lo", "hi", "p", "p_holm", "test"} <= set(diff.columns)
    (exp / "experiment.json").write_text(json.dumps({**spec, "arm_order": ["shuffle"]}))
    page = report.experiment_page(exp, report.ReportConfig(viewer="none"))
    assert "No differences to show: the experiment has one arm" in page


@pytest.mark.parametrize("key", ["metrics", "primary"])
def test_a_tag_metric_of_no_tag_is_refused_before_any_run(tiny_data, tmp_path, key):
    """tag_<id>_<measure> passes the up-front pattern; one whose id no arm's tag file has was
    refused only after every run trained (the aggregation's error). Seen failing on the old
    code: it went on to train (here into a missing data folder)."""
    from conftest import experiment_spec
    over = {"metrics": ["val_loss", "tag_nosuch_exposure"]} if key == "metrics" else \
        {"primary": ["tag_secret:control_exposure"]}  # a canary has no control
    path = experiment_spec(tiny_data, tmp_path / "exp.json", **over)
    spec = json.loads(path.read_text())
    spec["base"]["data_dir"] = str(tmp_path / "no_data")  # the old code would fail in train.py, not after hours
    path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {key}: 'tag_\S+' names no tag the arms insert "
                                        r"\(their tags: secret\)"):
        experiment.main([str(path), f"--out_root={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    experiment.check_tag_metrics(path, {**spec, "metrics": ["tag_secret_exposure"], "primary": []})  # a real tag passes


@pytest.mark.parametrize("n_seeds", [1, 2, 3, 30])
def test_every_statistic_is_computable_at_the_seed_count(tmp_path, n_seeds):
    """The spec check runs aggregate()'s statistics on made-up values at 1, 2, 3 and 30 seeds
    and every main metric (a family of ~14: at 2 seeds the mdd search raised after all runs)."""
    spec = {"arms": {"a": {}, "b": {}, "c": {}}, "baseline": "a", "seeds": list(range(1, n_seeds + 1)),
            "metrics": [], "test": "auto"}
    experiment.check_statistics(tmp_path / "exp.json", spec)
    spec["test"] = "nosuch_test"
    with pytest.raises(UserError, match=rf"exp.json: the experiment's statistics cannot be computed for {n_seeds} "
                                        "seeds"):
        experiment.check_statistics(tmp_path / "exp.json", spec)



def test_local_runs_share_the_cores_unless_the_caller_set_threads(monkeypatch):
    """OMP_NUM_THREADS: cores // jobs, but the caller's own value when set (as on Slurm)."""
    import os
    from prebias.launchers import Slots
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert Slots(jobs=4, per=1).env(0).get("OMP_NUM_THREADS") in ("2", None)  # None: a GPU slot
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert Slots(jobs=2, per=1).env(1)["OMP_NUM_THREADS"] == "1"
