"""bench/bench_upstream.py and bench/gpu_check.py: the side-by-side table is read from both
commands' own logs, and the GPU check rehearses every step on CPU (--dry) so it cannot rot
while no GPU is at hand."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_upstream  # noqa: E402

# llama2.c's train.py logs a step as f"{iter_num} | loss {lossf:.4f} | lr {lr:e} | {dt*1000:.2f}ms | mfu ..."
FAKE_UPSTREAM = textwrap.dedent("""
    import os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    assert args["vocab_source"] == "custom" and args["compile"] == "False" and args["dtype"] == "float32"
    assert os.path.exists(f"data/tok{args['vocab_size']}/data00.bin"), "the data are linked into the folder"
    for i in range(int(args["max_iters"]) + 1):
        print(f"{i} | loss 6.2000 | lr 5.000000e-04 | {2.5 if i else 900.0:.2f}ms | mfu -100.00%")
""")


def test_step_times_are_read_from_both_logs():
    proj = "step:11/40 loss:6.2000 lr:5.00e-04 ms:3.25 tok/s:78000 mfu:1.0\nstep:12/40 train_loss:6.1 val_loss:6.2"
    up = "11 | loss 6.2000 | lr 5.000000e-04 | 3.31ms | mfu -100.00%\nstep 0: train loss 6.2, val loss 6.2"
    assert bench_upstream.PROJECT_MS.findall(proj) == ["3.25"]
    assert bench_upstream.UPSTREAM_MS.findall(up) == ["3.31"]


def test_table_pools_rounds_and_gives_upstream_over_project():
    shape = bench_upstream.SHAPES["dim16"]
    res = {"dim16": {"project": [[2.0, 3.0, 4.0], [3.0]], "upstream": [[6.0, 6.0], [3.0, 3.0]]}}
    row = bench_upstream.table(res, [("dim16", shape, False)]).splitlines()[2]
    # pooled medians 3.0 and 4.5; per-round ratios 6/3 and 3/3: geometric mean sqrt(2), t(1) interval on the logs
    assert row == ("| dim 16, 1 layer, V 512, batch 4 × 64 | 3.00 | 4.50 | **1.50×** | 1.00–2.00 | "
                   "1.41 [0.02, 115.61]: undecided |")
    # five rounds all above 1 decide it; one round alone cannot
    assert bench_upstream.round_interval([1.05, 1.08, 1.06, 1.07, 1.04]).endswith(": ≥ 1.0")
    assert bench_upstream.round_interval([0.95, 0.97, 0.96, 0.94, 0.96]).endswith(": < 1.0")
    assert bench_upstream.round_interval([1.2]) == "(one round)"


def test_smoke_against_a_fake_upstream(tmp_path):
    """The whole pipeline in smoke mode: this project's train.py for real, llama2.c's
    replaced by a script that checks its arguments and data and logs in llama2.c's format."""
    fake = tmp_path / "llama2.c"
    fake.mkdir()
    for f in bench_upstream.UPSTREAM_FILES:
        (fake / f).write_text("")
    (fake / "train.py").write_text(FAKE_UPSTREAM)
    res = bench_upstream.main(["--smoke", f"--upstream={fake}"])
    assert res["dim16"]["upstream"] == [[2.5, 2.5]]  # its steps 10 and 11 (0-based): the first 10 left out
    assert len(res["dim16"]["project"]) == 1 and len(res["dim16"]["project"][0]) == 2
    assert all(0 < t < 60_000 for t in res["dim16"]["project"][0])
    # the CPU time of each step, from the stamps: positive, and never more than 2 threads' worth of its wall time
    for side in ("project", "upstream"):
        cpu, wall = res["dim16"][side + "_cpu"][0], res["dim16"][side][0]
        assert len(cpu) == 2 and all(c > 0 for c in cpu)
    assert all(c < 2 * w + 5 for c, w in zip(res["dim16"]["project_cpu"][0], res["dim16"]["project"][0]))


def test_a_folder_that_is_no_llama2c_checkout_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_upstream.py"), f"--upstream={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and f"--upstream={tmp_path}: no train.py there" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_gpu_check_rehearses_every_step_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", f"--keep_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=1800)
    out = r.stdout
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "speed: llama2.c not given" in out and "speed: project " in out
    for tag in ("default", "deterministic"):
        assert f"resume ({tag}): killed at step >= 10, resumed to 20: ids equal; weights bitwise" in out
    assert "torchrun --nproc_per_node=1: ids equal, weights bitwise against the plain process" in out
    assert out.rstrip().splitlines()[-1].startswith("gpu_check passed")
