"""
The smoke convention of bench/: every benchmark and validity area also runs at smoke size,

    $ python bench/bench_<name>.py --smoke                 # seconds: tiny sizes, the same code paths
    $ python bench/validity.py --smoke --only=<area>       # a validity area the same way

and tests/test_bench.py runs each of them so (make test), so a broken benchmark fails CI.
A new bench/bench_<name>.py follows it in four steps:
1. ap = smoke.parser(__doc__): an argparse parser that has --smoke. The sizes the run
   depends on are flags (or the keys of a dict in the config block that flags select).
2. SMOKE = dict(...) in the config block, the small sizes by flag name; then
   a = smoke.parse(ap, SMOKE): under --smoke they become the defaults (a flag given on the
   command line still wins). Smoke changes sizes only: every step of the full run still
   runs; never branch on a.smoke to skip work or take a toy path.
3. Write only in tempfile folders (tests/test_bench.py points TMPDIR at its own folder and
   fails on any file left in the repo) or in a folder the user names; under --smoke never
   in a cache that a full run would reuse.
4. Print the table as the full run does; add the script and a line of its header to
   HEADERS in tests/test_bench.py (the test fails for a bench script missing there), and
   the script to a target of the Makefile (make bench, or one of its own).
A validity area (bench/validity_<area>.py) has checks(size) -> list[Line], size one of
validity.SIZES ("full", "quick", "smoke"), and takes its replicate counts from a dict by size.
"""

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser, with its docstring as the help and --smoke."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, the same code paths, seconds: what make test runs (not a measurement)")
    return ap


def parse(ap: argparse.ArgumentParser, smoke: dict, argv=None) -> argparse.Namespace:
    """Parse argv; under --smoke the defaults are first replaced by `smoke` (flag: value)."""
    first, _ = ap.parse_known_args(argv)
    if first.smoke:
        unknown = set(smoke) - set(vars(first))
        if unknown:  # a typo in SMOKE would silently run the full size
            raise KeyError(f"SMOKE names {sorted(unknown)[0]!r}, which is not a flag of this script")
        ap.set_defaults(**smoke)
    return ap.parse_args(argv)
