"""The saturation rule on constructed curves, and the two visualize_sat_* scripts."""

import math
import shutil

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

import eval as ev
import visualize_sat_batch
import visualize_sat_output
from prebias import saturation as sat
from prebias.common import UserError

STEPS = [0, 1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("values, want", [
    ([0, 0.2, 0.5, 0.8, 0.9, 0.97, 0.99, 1.0], 16),      # monotone rise
    ([5.0, 4.0, 3.0, 2.0, 1.5, 1.02, 1.01, 1.0], 16),    # monotone fall (a loss) also scores 0 -> 1
    ([0, 0.5, 1.3, 1.2, 1.04, 0.97, 1.01, 1.0], 8),      # overshoot, then settles inside the band
    ([0, 0.3, 0.96, 1.02, 0.9, 0.98, 1.04, 1.0], 16),    # enters at 2, dips out at 8, re-enters at 16
    ([0, 0.6, 0.9, 1.0, 1.08, 0.93, 1.06, 1.0], 64),     # noisy to the end: only the last point
    ([0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 1),         # a step
    ([0, 1.05, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0], 1),       # exactly on the band edges counts as inside
])
def test_saturation_step_constructed(values, want):
    assert sat.saturation_step(STEPS, values, tol=0.05) == want


def test_normalised_score_endpoints_and_direction():
    z = sat.normalised_score([10.0, 7.0, 4.0])
    assert z.tolist() == [0.0, 0.5, 1.0]


def test_flat_curves():
    assert sat.normalised_score([3.0, 3.0, 3.0]).tolist() == [1.0, 1.0, 1.0]
    assert sat.saturation_step([0, 1, 2], [3.0, 3.0, 3.0]) == 0
    # returns to its start after moving: deviations in units of its own range
    z = sat.normalised_score([2.0, 4.0, 2.0, 2.0])
    assert z.tolist() == [1.0, 2.0, 1.0, 1.0]
    assert sat.saturation_step([0, 1, 2, 4], [2.0, 4.0, 2.0, 2.0]) == 2


def test_single_point_nan_and_all_nan():
    assert sat.saturation_step([5], [1.23]) == 5
    # a NaN first point (a batch mean at step 0) is skipped: the curve starts at step 1
    assert sat.saturation_step([0, 1, 2, 4], [math.nan, 0.0, 1.0, 1.0]) == 2
    assert np.isnan(sat.normalised_score([math.nan, 0.0, 1.0])[0])
    assert math.isnan(sat.saturation_step([0, 1], [math.nan, math.nan]))


def test_tolerance_changes_the_step():
    v = [0, 0.5, 0.85, 0.92, 0.97, 1.0]
    s = [0, 1, 2, 4, 8, 16]
    assert sat.saturation_step(s, v, tol=0.05) == 8
    assert sat.saturation_step(s, v, tol=0.1) == 4
    assert sat.saturation_step(s, v, tol=0.2) == 2


def test_saturation_table_columns():
    df = pd.DataFrame({"iter": [0, 1, 2], "a": [1.0, 2.0, 3.0], "b": [0.0, 5.0, 0.1]})
    t = sat.saturation_table(df, ["a", "b"], run="r")
    assert t["saturation_step"].tolist() == [2.0, 2.0]
    assert t.loc[0, "change"] == 2.0 and t.loc[0, "range_over_change"] == 1.0
    assert t.loc[1, "range_over_change"] == pytest.approx(50.0)
    assert set(t["run"]) == {"r"}


def test_split_out_dirs():
    assert sat.split_out_dirs(["--out_dir=a,b", "--tol=0.1"]) == (["a", "b"], ["--tol=0.1"])
    assert sat.split_out_dirs(["--out_dir", "a", "b", "c", "--ncols=2"]) == (["a", "b", "c"], ["--ncols=2"])
    assert sat.split_out_dirs(["--out_dir=a", "b"]) == (["a", "b"], [])
    assert sat.split_out_dirs(["--tol=0.1"]) == ([], ["--tol=0.1"])


# -----------------------------------------------------------------------------
# the scripts on a real (tiny) run

@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """Two evaluated runs: the fixture run and a copy whose last checkpoint is removed
    (so the curves differ)."""
    root = tmp_path_factory.mktemp("satruns")
    a, b = root / "shuffle_a", root / "shuffle_b"
    shutil.copytree(tiny_run.out_dir, a)
    shutil.copytree(tiny_run.out_dir, b)
    (b / "ckpt" / "ckpt_24.pt").unlink()
    for d in (a, b):
        ev.main([f"--out_dir={d}", "--n_prompts=2", "--max_new_tokens=8", "--val_batches=2", "--device=cpu"])
    return a, b


def check_png(p):
    assert p.exists() and p.stat().st_size > 0
    img = mpimg.imread(p)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_sat_output_single_run(two_runs):
    a, _ = two_runs
    res = visualize_sat_output.main([f"--out_dir={a}"])
    check_png(a / "visualize" / "sat_curves_output.png")
    t = pd.read_csv(a / "tables" / "saturation_output.csv")
    assert "val_loss" in set(t["metric"]) and t["metric"].str.startswith("out_").sum() > 5
    assert set(t["run"]) == {"shuffle_a"}
    # the saturation steps in the CSV follow the rule on the summary columns
    j = pd.read_csv(a / "tables" / "summary.csv")
    vl = t.set_index("metric").loc["val_loss", "saturation_step"]
    assert vl == sat.saturation_step(j["iter"], j["val_loss"])
    assert len(res) == len(t)


def test_sat_batch_single_run(two_runs):
    a, _ = two_runs
    visualize_sat_batch.main([f"--out_dir={a}"])
    check_png(a / "visualize" / "sat_curves_batch.png")
    t = pd.read_csv(a / "tables" / "saturation_batch.csv")
    assert len(t) > 5 and t["metric"].str.endswith("_cum").all()
    assert (t["first_step"] == 1).all()  # the cumulative means start after step 0


def test_sat_several_runs_overlay(two_runs, tmp_path):
    a, b = two_runs
    visualize_sat_output.main(["--out_dir", str(a), str(b)])  # default: the first run's folders
    check_png(a / "visualize" / "sat_curves_output.png")
    t = pd.read_csv(a / "tables" / "saturation_output.csv")
    assert set(t["run"]) == {"shuffle_a", "shuffle_b"}
    assert len(t) == 2 * t["metric"].nunique()
    assert t[t["run"] == "shuffle_b"]["final_step"].max() == 16
    cmp = tmp_path / "compare"
    visualize_sat_batch.main([f"--out_dir={a},{b}", f"--plot_dir={cmp}", "--which=both"])
    check_png(cmp / "sat_curves_batch.png")
    tb = pd.read_csv(cmp / "saturation_batch.csv")
    assert tb["metric"].str.endswith("_since").any() and tb["metric"].str.endswith("_cum").any()


def test_sat_errors(tmp_path, two_runs):
    with pytest.raises(UserError, match="eval.py"):
        visualize_sat_output.main([f"--out_dir={tmp_path / 'nothing'}"])
    with pytest.raises(UserError, match="which"):
        visualize_sat_batch.main([f"--out_dir={two_runs[0]}", "--which=sometimes"])
    with pytest.raises(UserError, match="unknown metric"):
        visualize_sat_output.main([f"--out_dir={two_runs[0]}", "--metrics=out_nope"])


def test_every_figure_labels_a_summary_column_the_same_way():
    """One column_label for the two visualize_sat_* figures and experiment.py's bands and forest."""
    want = {"val_loss": "val_loss (nats/token, held-out batches)", "out_fk_grade": "fk_grade (generated text)",
            "in_fk_grade_cum": "fk_grade (mean, all batches so far)", "in_ttr_since": "ttr (mean since prev. ckpt)",
            "tag_secret_exposure": "tag_secret_exposure", "in_noisy": "in_noisy", "n_batches_cum": "n_batches_cum"}
    assert {c: sat.column_label(c) for c in want} == want
