"""
Planted truth: every research measure run on problems whose answer is known, printing
for each the measure, the truth, the estimate (bias, interval coverage, error rate) and
whether it passes. A benchmark, not a timed test (`make validity`).

$ python bench/validity.py                      # every area
$ python bench/validity.py --quick              # fewer replicates: a smoke run
$ python bench/validity.py --only=stats         # one area (or a,b)

Areas, one module each beside this file (bench/validity_<area>.py, a function
checks(quick: bool) -> list[Line]): stats, durability, selection, attribution.
"""

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AREAS = ("stats", "durability", "selection", "attribution")


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer replicates (a smoke run, not the verdict)")
    ap.add_argument("--only", default="", help=f"comma-separated areas of {', '.join(AREAS)}")
    args = ap.parse_args(argv)
    areas = [a for a in args.only.split(",") if a] or list(AREAS)
    bad = [a for a in areas if a not in AREAS]
    if bad:
        ap.error(f"unknown area {bad[0]!r}; choose from {', '.join(AREAS)}")
    lines, t_all = [], time.time()
    for area in areas:
        t0 = time.time()
        found = importlib.import_module(f"validity_{area}").checks(args.quick)
        for line in found:
            print(f"[{area}] {line}", flush=True)
        print(f"[{area}] {len(found)} checks in {time.time() - t0:.0f} s", flush=True)
        lines += found
    n_fail = sum(not x.passed for x in lines)
    print(f"\n{len(lines) - n_fail} of {len(lines)} checks pass ({time.time() - t_all:.0f} s)")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
