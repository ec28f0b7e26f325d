"""
Planted truth: every research measure run on problems whose answer is known, printing
for each the measure, the truth, the estimate (bias, interval coverage, error rate) and
whether it passes. A benchmark, not a timed test (`make validity`).

$ python bench/validity.py                      # every area
$ python bench/validity.py --quick              # fewer replicates (~6 min), a rough verdict
$ python bench/validity.py --only=stats         # one area (or a,b)
$ python bench/validity.py --smoke              # seconds per area: every check runs, verdicts not meant (exit 0)

Areas, one module each beside this file (bench/validity_<area>.py, a function
checks(size: str) -> list[Line], size one of SIZES): stats, durability, selection, attribution.
"""

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smoke  # noqa: E402

AREAS = ("stats", "durability", "selection", "attribution")
SIZES = ("full", "quick", "smoke")  # replicates and run lengths of every area


@dataclass
class Line:
    measure: str  # what is checked, e.g. "half-life 95% profile interval, n=5 points"
    truth: str  # the planted answer, e.g. "half-life 100 steps"
    estimate: str  # what the measure gave: bias, coverage, error rate...
    passed: bool
    rule: str = ""  # the pass rule, e.g. "coverage in [0.90, 0.98]"

    def __str__(self):
        return f"{'PASS' if self.passed else 'FAIL'}  {self.measure} | truth: {self.truth} | estimate: " \
               f"{self.estimate}" + (f" | rule: {self.rule}" if self.rule else "")


def main(argv=None):
    ap = smoke.parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer replicates (a rough verdict)")
    ap.add_argument("--only", default="", help=f"comma-separated areas of {', '.join(AREAS)}")
    args = smoke.parse(ap, {}, argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    areas = [a for a in args.only.split(",") if a] or list(AREAS)
    bad = [a for a in areas if a not in AREAS]
    if bad:
        ap.error(f"unknown area {bad[0]!r}; choose from {', '.join(AREAS)}")
    lines, t_all = [], time.time()
    for area in areas:
        t0 = time.time()
        found = importlib.import_module(f"validity_{area}").checks(size)
        for line in found:
            print(f"[{area}] {line}", flush=True)
        print(f"[{area}] {len(found)} checks in {time.time() - t0:.0f} s", flush=True)
        lines += found
    n_fail = sum(not x.passed for x in lines)
    print(f"\n{len(lines) - n_fail} of {len(lines)} checks pass ({time.time() - t_all:.0f} s)")
    if size == "smoke":  # a few replicates decide nothing: the smoke run shows that every check runs
        print("smoke size: the pass rules need the full replicates; exit 0 whatever the verdicts")
        return 0
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
