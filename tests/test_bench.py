"""Every benchmark and validity area at smoke size (the convention: bench/smoke.py): each
runs as a user runs it, in its own process with its temp folders in tmp_path, exits 0,
prints a line of its table, and leaves nothing in the repo. The scripts are read from
bench/'s files, so a new one without --smoke, a HEADERS line or a make target fails here."""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))
AREAS = sorted(p.stem.removeprefix("validity_") for p in BENCH.glob("validity_*.py"))
NAMES = SCRIPTS + [f"validity_{a}" for a in AREAS]

# A line of each one's printed table (a regex searched in its stdout): the header or a row.
NUM = r"[-+]?\d[\d,.]*"
CHECK = r"\[{area}\] (PASS|FAIL)  .+ \| truth: .+ \| estimate: .+ \| rule: .+\n(.*\n)*\[{area}\] {n} checks in "
HEADERS = {
    "bench_attribute": rf"attribution tiny \(dim 64, 4 layers\), {NUM}M params, d=16: {NUM} s per 1,000 batches per "
                       rf"checkpoint \(gradients {NUM} s, projection {NUM} s; 4 batches of 16 tokens",
    "bench_attribution": rf"==== sample, from scratch\nLDS, 1% drops .*: 3 in-place retrains, 4 probes(.*\n)"
                         rf"estimator +LDS \[95% CI\](.*\n)*magic +{NUM}(.*\n)*"
                         rf"LDS, 50% drops .*: 3 in-place retrains, 4 probes(.*\n)*top-2 removed in place \(\w+\): {NUM}; "
                         rf"timing-matched random-2(.*\n)*"
                         rf"order-aware \(\w+\): Pearson ({NUM}|\+nan)(.*\n)*"  # nan: 8 steps, no whole step in a tenth
                         rf"==== sample, continued\nLDS, 1% drops .*: 3 in-place retrains, 4 probes(.*\n)"
                         rf"estimator +LDS \[95% CI\](.*\n)*magic +{NUM}(.*\n)*"
                         rf"order-aware \(magic\), continued at lr 0.001: final val loss {NUM}, Pearson ({NUM}|\+nan)"
                         rf"(.*\n)*order-aware \(magic\), continued at lr 0.0003: final val loss {NUM}",
    "bench_durability": rf"durability tiny \(dim 64, 4 layers\): {NUM} s per checkpoint \(R=50 candidates",
    "bench_eval": rf"tiny \(dim 64, 2 layers\) +{NUM} s/checkpoint(.*\n)*\s+3 prompts x 8 new tokens \(24 generated\): "
                  rf"batched\+KV cache +{NUM} s \| prompt-by-prompt no cache +{NUM} s",
    "bench_export": rf"program +file +flags +tok/s +vs run  greedy ids\nrun +v0 (.*\n)*runq / run = {NUM}x(.*\n)*"
                    rf"model +val loss +ppl +vs fp32\nfp32 +{NUM} +{NUM} +\+0.00%(.*\n)*3\) Hugging Face round trip",
    "bench_metrics": rf"metric +texts/s +us/text\nn_chars +{NUM} +{NUM}\n(.*\n)*ALL \(one call\) +{NUM}(.*\n)*"
                     rf"NGramScorer V= 4096 order=3: fit +{NUM} M tok/s",
    "bench_pretokenize": rf"whole command, 200 stories, {NUM} batches, workers=1: --metrics=none {NUM} s \| "
                         rf"--metrics=all {NUM} s \| ratio {NUM}x",
    "bench_runc": rf"build +model +best tok/s +worst +vs exact  ids == runexact\n"
                  rf"runexact +260K-shape +{NUM} +{NUM} +1.00x  yes",
    "bench_select": rf"== bed noisy: 2 seeds, 4 steps(.*\n)method +final val +steps to target(.*\n)"
                    rf"uniform +{NUM}(.*\n)*\| bed \| method \| final val loss(.*\n)*\| noisy \| prune \| {NUM}",
    "bench_spine": rf"vocab 512: per-story loop +{NUM} stories/s \| batched 1 thread +{NUM} \({NUM}x\)",
    "bench_upstream": rf"upstream not given \(--upstream=<a llama2.c checkout>\): timing the project's side only(.*\n)*"
                      rf"\| dim 16, 1 layer, V 512, batch 4 × 64 \| {NUM} \| \(not given\)",
    "bench_train": rf"dim64_L5_V512 +fp32 eager +provenance +{NUM} tok/s +bare +{NUM} tok/s(.*\n)*"
                   rf"dim64_L5_V512 +tags on +{NUM} tok/s(.*\n)*dim288_L6_V512 batch 1 lr 5e-3: flush_denormal on",
    "validity_attribution": CHECK.format(area="attribution", n=5),
    "validity_durability": CHECK.format(area="durability", n=20),
    "validity_selection": CHECK.format(area="selection", n=9),
    "validity_stats": CHECK.format(area="stats", n=11),
}
# over ~10 s of CPU at smoke size (measured under load): make test-fast skips them, make test runs them
SLOW = {"bench_attribution", "bench_durability", "bench_eval", "bench_export", "bench_pretokenize", "bench_select",
        "bench_train", "validity_durability", "validity_selection"}


def command(name: str) -> list[str]:
    if name.startswith("validity_"):
        return [sys.executable, str(BENCH / "validity.py"), "--smoke", f"--only={name.removeprefix('validity_')}"]
    return [sys.executable, str(BENCH / f"{name}.py"), "--smoke"]


def repo_files() -> dict:
    """Every file of the checkout with its modification time, but git's and the caches pytest
    itself writes (a second pytest session in the same checkout writes them at any time)."""
    skip = {".git", ".pytest_cache", ".benchmarks", "__pycache__"}
    return {p: p.stat().st_mtime_ns for p in ROOT.rglob("*") if not skip & set(p.parts) and p.is_file()}


def test_every_script_follows_the_smoke_convention():
    assert "bench_select" in SCRIPTS and "selection" in AREAS  # the folder is read
    assert sorted(HEADERS) == NAMES, "a bench script (or validity area) without a line in HEADERS"
    sys.path.insert(0, str(BENCH))
    import validity
    assert sorted(validity.AREAS) == AREAS
    make = (ROOT / "Makefile").read_text()
    for name in SCRIPTS:
        assert "smoke.parse(" in (BENCH / f"{name}.py").read_text(), f"{name}.py does not parse --smoke"
        assert f"bench/{name}.py" in make, f"no make target runs bench/{name}.py"
    for area in AREAS:
        assert "def checks(size: str)" in (BENCH / f"validity_{area}.py").read_text()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES])
def test_smoke_run(name, tmp_path):
    before = repo_files()
    # one thread per process: the smoke runs measure nothing, and torch's threads stall on a busy machine
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    res = subprocess.run(command(name), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{name}: {time.time() - t0:.1f} s wall, {cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.1f}"
          " s CPU")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert re.search(HEADERS[name], res.stdout), res.stdout[-3000:]
    after = repo_files()
    changed = {f for f in before.keys() & after.keys() if before[f] != after[f]}
    touched = sorted(str(f.relative_to(ROOT)) for f in set(before) ^ set(after) | changed)
    assert touched == [], "the smoke run wrote into the repo"
