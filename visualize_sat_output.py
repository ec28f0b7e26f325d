"""
Saturation curves of the model's outputs (stage 4a): for every output metric of
<out_dir>/tables/summary.csv (written by eval.py: val_loss and the out_* prompt means of
the generated texts), the normalised score against the training step, with each
metric's saturation step marked. The rule is saturation.py's (see its docstring):
score = (v - v_first) / (v_final - v_first); saturation step = the first checkpoint
from which the score stays within tol of 1 at every later checkpoint.

$ python visualize_sat_output.py                               # out/ -> out/visualize/sat_curves_output.png
$ python visualize_sat_output.py --out_dir=out/curriculum
$ python visualize_sat_output.py --out_dir out/shuffle out/curriculum --plot_dir=out/compare
$ python visualize_sat_output.py --metrics=val_loss,out_bleu,out_ttr --tol=0.1

Writes <out_dir>/visualize/sat_curves_output.png (one subplot per metric, one line per
run; several runs are drawn on each metric's raw values, with each run's saturation
step ringed, since the normalised score would end every run at 1) and <out_dir>/tables/saturation_output.csv (columns: run, metric, saturation_step,
first_step, final_step, first_value, final_value, change, n_points, tol). With several
runs both go to the first run's folders, or to --plot_dir.
"""

import sys
from dataclasses import dataclass

from prebias import saturation
from prebias.common import main_guard, parse_config


# -----------------------------------------------------------------------------
# config
@dataclass
class SatOutputConfig:
    out_dir: str = "out"  # a run folder, or several: --out_dir a b c / --out_dir=a,b,c
    plot_dir: str = ""  # with several runs: where the figure and CSV go ('' = the first run's)
    metrics: str = "all"  # comma list of summary.csv columns, or all (val_loss + every out_*)
    tol: float = saturation.TOL  # saturation band around the final level, in normalised units
    ncols: int = 4  # subplots per row
# -----------------------------------------------------------------------------

PNG, CSV = "sat_curves_output.png", "saturation_output.csv"


def output_columns(df) -> list[str]:
    """val_loss, then every out_* column in table order."""
    return [c for c in df.columns if c == "val_loss" or c.startswith("out_")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dirs, rest = saturation.split_out_dirs(argv)
    cfg = parse_config(SatOutputConfig(), rest)
    return saturation.visualize(dirs or [cfg.out_dir], cfg.plot_dir, cfg.metrics, cfg.tol, cfg.ncols,
                                "visualize_sat_output.py", output_columns, PNG, CSV,
                                "Output metrics")


if __name__ == "__main__":
    main_guard(main)
