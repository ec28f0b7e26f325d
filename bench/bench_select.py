"""
Does batch selection pay, at matched compute? On each bed (the sample with 20% of its
training stories corrupted, the clean sample, real TinyStories stories (--real_dir: a folder
of dataNN.json shards, e.g. data/TinyStories_all_data after `tinystories.py download`; the
real beds are skipped without it) and a copy of them with the same corruption), several
seeds of:

    uniform    plain training, max_iters steps
    loss       online, the highest-loss B of a pool of K*B (Loshchilov & Hutter 2015)
    rho        online RHO-LOSS, irreducible loss = the 3-gram reference fitted on the holdout
    rho_ref    online RHO-LOSS, irreducible loss = a small model trained on the holdout
               (train.py --holdout=only; one per bed, its training counted in every run;
               on the --ref_beds only, the noisy sample by default: its budget is the largest)
    prune      offline: keep the keep share of batches with the lowest reference loss
    magic      offline: a short proxy run per seed (--proxy_iters steps at --proxy_dim),
               its exact reverse pass (prebias/magic.py) and each batch's first-order
               effect on the validation loss at --magic_steps steps (select_batches.py
               --by=magic); keep the --keep best; the proxy run, the reverse pass and the
               JVPs counted in the run's FLOPs
    uniform@X  a uniform run given X's FLOP budget (compute.matched_steps), its cosine
               schedule decaying to min_lr at that budget (Kaddour et al. 2023)

and for each method, paired by seed: the steps to the validation loss uniform reaches at
max_iters (as a share of max_iters), the compute to reach it (everything counted: scoring,
the reference's fit, magic's proxy run and reverse pass) as a share of uniform's, its
FLOPs against uniform's, the compute-matched gap
(its final val loss minus uniform@X's) and the share of its budget it needs to reach
uniform@X's final loss (> 1: not reached), the wall-clock against uniform@X's, and the
noisy share it trained on. Mean and 95% t-interval over seeds. Runs are kept in
--keep_dir and reused (a finished run is read back, a killed one resumes), so a second
call only adds what is missing; per-seed numbers go to <keep_dir>/bench_select.csv.

$ python bench/bench_select.py --keep_dir=/tmp/bench_select        # 4 beds x 3 seeds (~2 h without magic)
$ python bench/bench_select.py --beds=noisy --seeds=1 --max_iters=60  # a short run
$ python bench/bench_select.py --beds=real --real_dir=<folder> --methods=prune,magic --matched=prune
$ python bench/bench_select.py --smoke       # tiny sizes, the same code paths (bench/smoke.py)
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import select_batches  # noqa: E402
import tinystories  # noqa: E402
import train  # noqa: E402
from prebias import batchmetrics, checkpoint  # noqa: E402
from prebias.compute import compute_curve, matched_steps, reach  # noqa: E402
from prebias.data import BatchData  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

BEDS = ("noisy", "clean", "real", "real_noisy")
SELECTED = ("loss", "rho", "rho_ref", "prune", "magic")
NO_MATCH = {"step": [0], "val": [math.nan], "wall_s": math.nan}  # a method run without its uniform@budget
SMOKE = dict(beds="noisy", seeds=2, n_stories=800, max_iters=4, ref_iters=4, seq=64, dim=16, ref_dim=16, batch=2,
             eval_interval=2, peak_flops=1e12, proxy_iters=4, proxy_dim=16, n_val=4)


# -----------------------------------------------------------------------------
# beds

def make_bed(bed: str, root: Path, a) -> tuple[Path, Path] | None:
    """(data_dir, tables_dir) of a bed, made once and reused; None (with a reason) when
    the real stories are absent."""
    data, tables = root / bed / "data", root / bed / "tables"
    real = Path(a.real_dir) if a.real_dir else None
    if bed.startswith("real") and not (real and list(real.glob("data*.json"))):
        print(f"skipping bed {bed}: " + (f"no data*.json in --real_dir={real}" if real else
                                         "give --real_dir=<a folder of real TinyStories dataNN.json shards>"))
        return None
    if not tinystories.raw_dir(data).exists():
        if bed in ("noisy", "clean"):
            tinystories.sample(data, n_stories=a.n_stories, n_shards=5, seed=1337,
                               noise=a.noise if bed == "noisy" else 0.0)
        elif bed == "real":
            shutil.copytree(real, tinystories.raw_dir(data))
        else:
            src = root / "real_src"  # noisy_copy reads a data folder: the shards under its raw_dir
            if not tinystories.raw_dir(src).exists():
                shutil.copytree(real, tinystories.raw_dir(src))
            tinystories.noisy_copy(src, data, a.noise, seed=1337)
    if not (data / "tok512.model").exists():
        tinystories.train_vocab(512, data)
    tinystories.pretokenize(512, a.seq, data, tables_dir=tables, holdout=a.holdout)  # reuses what is done
    return data, tables


def train_args(data, tables, out, seed, max_iters, a, **over) -> list[str]:
    args = dict(data_dir=data, tables_dir=tables, out_dir=out, vocab_size=512, max_seq_len=a.seq, dim=a.dim,
                n_layers=a.layers, n_heads=4, n_kv_heads=2, batch_size=a.batch, max_iters=max_iters,
                eval_interval=a.eval_interval, log_spaced=False, eval_iters=8, log_interval=max_iters,
                learning_rate=5e-3, warmup_iters=10, seed=seed, device="cpu", dtype="float32", model_bin="none",
                peak_flops=a.peak_flops)
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def run(out: Path, argv: list[str], max_iters: int) -> Path:
    """Train, or reuse a finished run, or resume a killed one."""
    found = dict(checkpoint.list_checkpoints(out))
    if max_iters not in found:
        train.main(argv + (["--init_from=resume"] if found else []))
    return out


# -----------------------------------------------------------------------------
# one bed: every method, every seed

def bed_runs(bed: str, data: Path, tables: Path, a, root: Path, methods=SELECTED, matched=SELECTED) -> dict:
    """{method: [per-seed result dict]} for uniform, `methods` and the compute-matched
    uniform baselines of `matched`."""
    d = root / bed
    ref_ckpt = ""
    if "rho_ref" in methods:  # the irreducible-loss model: trained on the holdout alone, once per bed
        ref = run(d / "ref_model", train_args(data, tables, d / "ref_model", 1, a.ref_iters, a, holdout="only",
                                              dim=a.ref_dim), a.ref_iters)
        ref_ckpt = checkpoint.ckpt_path(ref, a.ref_iters)
    spec = select_batches.main([f"--data_dir={data}", f"--tables_dir={tables}", "--vocab_size=512",
                                f"--max_seq_len={a.seq}", "--by=ref_nll", f"--keep={a.keep}", "--easiest"])
    over = {"uniform": {}, "loss": dict(select="loss", select_pool=a.pool),
            "rho": dict(select="rho", select_pool=a.pool),
            "rho_ref": dict(select="rho", select_pool=a.pool, select_ref=ref_ckpt),
            "prune": dict(schedule_spec=spec), "magic": {}}  # magic's spec: per seed, below
    over = {m: kw for m, kw in over.items() if m == "uniform" or m in methods}
    bm, _ = batchmetrics.load_batch_metrics(tables, BatchData(data, 512, a.seq))
    noisy = bm["noisy"].to_numpy()
    res = {m: [] for m in list(over) + [f"uniform@{m}" for m in matched]}
    for s in range(1, a.seeds + 1):
        if "magic" in methods:
            over["magic"], magic_cost = magic_spec(data, tables, a, d, s)
        for m, kw in over.items():
            out = run(d / f"{m}_s{s}", train_args(data, tables, d / f"{m}_s{s}", s, a.max_iters, a, **kw), a.max_iters)
            res[m].append(result(out, noisy))
        if "prune" in res:  # the offline ranking's cost (the 3-gram's: no FLOPs)
            cost = json.loads(Path(str(spec).replace("_spec.json", "_select.json")).read_text())["cost"]
            res["prune"][-1]["flops"] = res["prune"][-1]["flops"] + cost["total_flops"]
        if "magic" in res:  # the proxy run, its reverse pass and the JVPs
            res["magic"][-1]["flops"] = res["magic"][-1]["flops"] + magic_cost["total_flops"]
            res["magic"][-1]["select_cost"] = magic_cost
        per_step = res["uniform"][-1]["flops"][-1] / a.max_iters
        for m in matched:  # the compute-matched baseline of each selected run (shared where budgets agree)
            steps = matched_steps(res[m][-1]["flops"][-1], per_step)
            out = d / (f"uniform_{steps}_s{s}" if steps != a.max_iters else f"uniform_s{s}")
            argv = train_args(data, tables, out, s, steps, a, eval_interval=100)  # its end counts; 100: resumable
            res[f"uniform@{m}"].append(result(run(out, argv, steps), noisy))
    return res


def magic_spec(data: Path, tables: Path, a, d: Path, s: int) -> tuple[dict, dict]:
    """(train.py overrides of seed s's magic run, the ranking's cost): its proxy run
    (seed s, trained once and reused) ranked by select_batches.py --by=magic."""
    proxy = d / f"magic_proxy_s{s}"
    run(proxy, train_args(data, tables, proxy, s, a.proxy_iters, a, dim=a.proxy_dim, eval_interval=a.proxy_iters),
        a.proxy_iters)
    name = tables / "select" / f"magic_hardest_{a.keep:g}_s{s}_select.json"
    if not name.exists():  # the ranking is reused too: its cost is in the json
        select_batches.main([f"--out_dir={proxy}", "--by=magic", f"--keep={a.keep}", f"--tag=s{s}",
                             f"--magic_steps={a.magic_steps}", f"--n_val={a.n_val}", f"--pool={a.magic_pool}"])
    return dict(schedule_spec=str(name).replace("_select.json", "_spec.json")), json.loads(name.read_text())["cost"]


def result(out: Path, noisy) -> dict:
    c = compute_curve(out)
    ids = np.load(out / "batch_ids.npy")
    last = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    return {**c, "noisy": float(noisy[ids].mean()), "wall_s": last["compute"]["wall_s"], "dir": str(out)}


# -----------------------------------------------------------------------------
# the table

def interval(x, fmt="{:.2f}") -> str:
    """mean [95% t-interval] over seeds; how many seeds never got there, if any."""
    x = np.asarray(x, float)
    if np.isnan(x).all():
        return "n/a"
    bad = int((~np.isfinite(x)).sum())
    if bad:
        return f"not reached in {bad}/{len(x)}"
    if len(x) == 1 or np.ptp(x) == 0:  # one seed, or the same in every seed (a ratio by construction)
        return fmt.format(x[0])
    from scipy import stats
    h = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return f"{fmt.format(x.mean())} [{fmt.format(x.mean() - h)}, {fmt.format(x.mean() + h)}]"


def rows(bed: str, res: dict, a, methods=SELECTED) -> list[dict]:
    """Per method and seed, the numbers of the table."""
    out = []
    for m in ["uniform", *methods]:
        for s, r in enumerate(res[m]):
            u = res["uniform"][s]
            match = res["uniform"][s] if m == "uniform" else (res.get(f"uniform@{m}") or [NO_MATCH] * (s + 1))[s]
            target = u["val"][-1]
            out.append({"bed": bed, "method": m, "seed": s + 1, "final_val": r["val"][-1],
                        "steps_to_target": reach(r["step"], r["val"], target) / a.max_iters,
                        "compute_to_target": reach(r["flops"], r["val"], target) / u["flops"][-1],
                        "flops_vs_uniform": r["flops"][-1] / u["flops"][-1],
                        "matched_steps": int(match["step"][-1]), "matched_final_val": match["val"][-1],
                        "gap_vs_matched": r["val"][-1] - match["val"][-1],
                        "compute_to_matched_target": reach(r["flops"], r["val"], match["val"][-1]) / r["flops"][-1]
                        if match is not NO_MATCH else math.nan,
                        "wall_vs_matched": r["wall_s"] / match["wall_s"], "noisy": r["noisy"]})
    return out


def print_table(bed: str, table: list[dict], a):
    print(f"\n== bed {bed}: {a.seeds} seeds, {a.max_iters} steps, pool {a.pool}, prune keeps {a.keep}; "
          f"each seed paired with uniform's own runs")
    cols = [("final val", "final_val", "{:.3f}"), ("steps to target", "steps_to_target", "{:.2f}"),
            ("compute to target", "compute_to_target", "{:.2f}"),
            ("FLOPs / uniform", "flops_vs_uniform", "{:.2f}"), ("val - uniform@budget", "gap_vs_matched", "{:+.3f}"),
            ("budget to match", "compute_to_matched_target", "{:.2f}"), ("wall / uniform@budget", "wall_vs_matched",
                                                                         "{:.2f}"), ("noisy", "noisy", "{:.3f}")]
    print(f"{'method':8s} " + " ".join(f"{c[0]:>26s}" for c in cols))
    methods = list(dict.fromkeys(r["method"] for r in table))
    for m in methods:
        sel = [r for r in table if r["method"] == m]
        print(f"{m:8s} " + " ".join(f"{interval([r[k] for r in sel], f):>26s}" for _, k, f in cols))
    print("uniform@budget: " + ", ".join(
        f"{m} {sorted({r['matched_steps'] for r in table if r['method'] == m})} steps" if any(
            r["method"] == m and not math.isnan(r["gap_vs_matched"]) for r in table) else f"{m} not run"
        for m in methods[1:]))


def markdown(table: list[dict]) -> str:
    """The README's table: one row per bed and method, mean [95% t-interval] over seeds."""
    cols = [("final val loss", "final_val", "{:.2f}"), ("steps to target", "steps_to_target", "{:.2f}"),
            ("compute to target (all counted)", "compute_to_target", "{:.2f}"),
            ("FLOPs / uniform", "flops_vs_uniform", "{:.2f}"), ("val − uniform at its budget", "gap_vs_matched", "{:+.2f}"),
            ("budget to match uniform", "compute_to_matched_target", "{:.2f}"), ("noisy share", "noisy", "{:.3f}")]
    out = ["| bed | method | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for bed in dict.fromkeys(r["bed"] for r in table):
        for m in dict.fromkeys(r["method"] for r in table if r["bed"] == bed):
            sel = [r for r in table if r["bed"] == bed and r["method"] == m]
            cells = [interval([r[k] for r in sel], f).replace("not reached in", "not reached,") for _, k, f in cols]
            out.append(f"| {bed} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    """The bench's settings; validity_selection.py builds its own from these defaults (settings)."""
    ap = smoke.parser(__doc__)
    ap.add_argument("--beds", default=",".join(BEDS), help=f"comma list of {', '.join(BEDS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.2, help="share of training stories corrupted (noisy beds)")
    ap.add_argument("--n_stories", type=int, default=4000, help="generated beds: stories")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of training stories held out")
    ap.add_argument("--max_iters", type=int, default=200)
    ap.add_argument("--eval_interval", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.8, help="prune: share kept (lowest ref_nll)")
    ap.add_argument("--ref_iters", type=int, default=200, help="rho_ref: steps of the model trained on the holdout")
    ap.add_argument("--ref_dim", type=int, default=64, help="rho_ref: its width (same depth)")
    ap.add_argument("--ref_beds", default="noisy", help="beds that also run rho_ref (its baseline is the costliest run)")
    ap.add_argument("--methods", default=",".join(SELECTED), help="comma list of the selected arms to run")
    ap.add_argument("--matched", default="", help="arms that also get their uniform@budget run ('' = every arm)")
    ap.add_argument("--proxy_iters", type=int, default=20, help="magic: steps of the proxy run")
    ap.add_argument("--proxy_dim", type=int, default=32, help="magic: the proxy's width (same depth)")
    ap.add_argument("--magic_steps", type=int, default=2, help="magic: steps of the proxy whose effects are averaged")
    ap.add_argument("--n_val", type=int, default=32, help="magic: validation windows of the target loss")
    ap.add_argument("--magic_pool", type=int, default=0, help="magic: rank a random N of the batches (0: all)")
    ap.add_argument("--real_dir", default="", help="folder of real TinyStories dataNN.json shards (real beds)")
    ap.add_argument("--keep_dir", default="", help="keep (and reuse) the runs here instead of a temp folder")
    ap.add_argument("--peak_flops", type=float, default=0.0, help="train.py's MFU peak (0: measured by each run)")
    return ap


def settings(**over) -> argparse.Namespace:
    """Every setting of the bench, its defaults with `over` applied: what make_bed, bed_runs
    and train_args read, so a caller never passes a namespace that lacks one."""
    a = parser().parse_args([])
    unknown = set(over) - set(vars(a))
    if unknown:
        raise TypeError(f"bench_select has no setting {sorted(unknown)[0]!r}")
    return argparse.Namespace(**{**vars(a), **over})


def main():
    ap = parser()
    a = smoke.parse(ap, SMOKE)
    beds = [b for b in a.beds.split(",") if b]
    if set(beds) - set(BEDS):
        ap.error(f"--beds: choose from {', '.join(BEDS)}")
    root = Path(a.keep_dir) if a.keep_dir else Path(tempfile.mkdtemp(prefix="bench_select_"))
    table, t_all = [], time.time()
    try:
        for bed in beds:
            t0 = time.time()
            made = make_bed(bed, root, a)
            if made:
                methods = tuple(m for m in SELECTED if m in a.methods.split(",") and (
                    m != "rho_ref" or bed in a.ref_beds.split(",")))
                matched = tuple(m for m in methods if not a.matched or m in a.matched.split(","))
                rs = rows(bed, bed_runs(bed, *made, a, root, methods, matched), a, methods)
                print_table(bed, rs, a)
                print(f"bed {bed}: {time.time() - t0:.0f} s (runs already done are reused)")
                table += rs
        print(f"all beds: {time.time() - t_all:.0f} s")
        if table:
            import pandas as pd
            pd.DataFrame(table).to_csv(root / "bench_select.csv", index=False)
            print(f"\n{markdown(table)}\n\nper-seed numbers: {root / 'bench_select.csv'}")
    finally:
        if not a.keep_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
