"""
Saturation curves of the training inputs (stage 4b): for every batch metric, its mean
over the batches each checkpoint has trained on (the in_* columns of
<out_dir>/tables/summary.csv, written by eval.py), as a normalised score against the
training step, with each metric's saturation step marked (saturation.py's rule).

Which mean: by default the cumulative one (in_<metric>_cum, over all batches seen so
far), because it describes the data the model has been exposed to up to that checkpoint
and so lines up with the output curves: its saturation step says when the mix seen so
far stopped changing. Under a shuffled order it settles quickly (only sampling noise is
left); under a curriculum it keeps drifting, which is what a comparison of orderings
needs to show. --which=since plots the mean over the batches since the previous
checkpoint (what the model is being fed right now: noisy under shuffling, a clear
trend under a curriculum); --which=both draws both.

$ python visualize_sat_batch.py                                # out/ -> out/visualize/sat_curves_batch.png
$ python visualize_sat_batch.py --out_dir out/shuffle out/curriculum --plot_dir=out/compare
$ python visualize_sat_batch.py --which=since --metrics=in_fk_grade_since,in_ref_nll_since

Writes <out_dir>/visualize/sat_curves_batch.png and <out_dir>/tables/saturation_batch.csv
(columns: run, metric, saturation_step, first_step, final_step, first_value, final_value,
change, n_points, tol). The cumulative means are NaN at step 0 (no batch yet), so their
curves start at the first checkpoint after it. With several runs both files go to the
first run's folders, or to --plot_dir.
"""

import sys
from dataclasses import dataclass

from prebias import saturation
from prebias.common import main_guard, parse_config


# -----------------------------------------------------------------------------
# config
@dataclass
class SatBatchConfig:
    out_dir: str = "out"  # a run folder, or several: --out_dir a b c / --out_dir=a,b,c
    plot_dir: str = ""  # with several runs: where the figure and CSV go ('' = the first run's)
    which: str = "cum"  # cum | since | both: which batch means to plot
    metrics: str = "all"  # comma list of summary.csv in_* columns, or all
    tol: float = saturation.TOL  # saturation band around the final level, in normalised units
    ncols: int = 4  # subplots per row
# -----------------------------------------------------------------------------

CHOICES = {"which": ("cum", "since", "both")}
PNG, CSV = "sat_curves_batch.png", "saturation_batch.csv"


def input_columns(which: str):
    suffixes = ("_cum", "_since") if which == "both" else (f"_{which}",)

    def pick(df) -> list[str]:
        return [c for c in df.columns if c.startswith("in_") and c.endswith(suffixes)]
    return pick


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dirs, rest = saturation.split_out_dirs(argv)
    cfg = parse_config(SatBatchConfig(), rest, CHOICES)
    which = {"cum": "cumulative", "since": "since previous checkpoint", "both": "cumulative and since"}[cfg.which]
    return saturation.visualize(dirs or [cfg.out_dir], cfg.plot_dir, cfg.metrics, cfg.tol, cfg.ncols,
                                "visualize_sat_batch.py", input_columns(cfg.which), PNG, CSV,
                                f"Training batch metrics ({which} means)")


if __name__ == "__main__":
    main_guard(main)
