"""
Run an experiment: the same comparison of batch orderings (or tags, or selection
methods) repeated over seeds, then the mean and a 95% interval of every metric per arm,
each arm's difference from the baseline with a p-value, and figures.

$ python experiment.py config/experiments/curriculum.json             # runs, eval, tables, figures
$ python experiment.py config/experiments/curriculum.json --jobs=2    # two runs at once
$ python experiment.py config/experiments/canary.json --wandb_log=True
$ python experiment.py config/experiments/curriculum.json --aggregate_only=True
$ python experiment.py config/experiments/curriculum.json --launcher=slurm --slurm_gpus_per_job=1 \
      --slurm_partition=gpu --slurm_time=8:00:00                     # one Slurm job per run
$ python experiment.py config/experiments/curriculum.json --launcher=slurm --detach=True
$ python report.py out/curriculum                                     # the HTML page

One run per ordering proves nothing: seed k of every arm shares its initialisation, so the
arms are compared by seed-matched differences. Each run (arm x seed) is train.py (a
finished run is skipped, a cut one resumed), eval.py and, for arms with tags,
durability.py, into <out_root>/<name>/<arm>/seed<k>/ (name: the spec's file name); then
tables into <out_root>/<name>/tables/ and figures into visualize/. The spec's keys, the
tables' columns and the launchers are defined in docs/experiments.md.
"""

import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import metrics
from prebias import saturation, stats, tracking
from prebias.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, run_record
from prebias.common import (ROOT, FolderLock, UserError, config_to_argv, git_commit, json_loads, main_guard,
                            parse_config, write_csv_atomic, write_json_atomic)
from prebias.batchmetrics import REF_COLUMNS
from prebias.configs import (MAX_SEED, TRAIN_CHOICES, DurabilityConfig, EvalConfig, TrainConfig, check_durability,
                             check_eval, check_train)
from prebias.inputs import read_json
from prebias.paths import TABLES, VISUALIZE, RunPaths
from prebias.schedule import SpecError
from prebias.schedule import load_spec as load_schedule_spec
from prebias.launchers import LAUNCHERS, Job, gather, launch, options_from, raise_failures

# -----------------------------------------------------------------------------
# config (the spec file is the first argument; these are how to run it)
@dataclass
class ExperimentConfig:
    out_root: str = "out"  # runs go to <out_root>/<name>/<arm>/seed<k>/
    name: str = ""  # '' = the spec's file name
    jobs: int = 1  # runs at once
    torchrun: int = 0  # > 0: each training through torchrun with this many processes
    wandb_log: bool = False  # log every run (group = experiment, job type = arm) and the figures
    wandb_project: str = "llama2_prebiasing"
    aggregate_only: bool = False  # only rebuild tables and figures from finished runs (slurm: after its jobs end)
    # where the runs go (prebias/launchers.py): local processes, or one Slurm job each (submitit)
    launcher: str = "local"  # local | slurm (| submitit_local: the slurm path without Slurm, for trying it)
    detach: bool = False  # slurm: submit and return; later --aggregate_only=True --launcher=slurm waits and gathers
    slurm_partition: str = ""  # '' = the cluster's default partition
    slurm_time: str = "4:00:00"  # each run's time limit; a run cut by it is requeued and resumes
    slurm_gpus_per_job: int = 0  # GPUs per run (--gpus-per-node); 0 = CPU; --torchrun=K needs K
    slurm_cpus_per_job: int = 1  # cores per run (--cpus-per-task; OMP_NUM_THREADS unless set)
    slurm_mem: str = ""  # memory per run, e.g. 32G; '' = the partition's default
    slurm_max_parallel: int = 0  # runs at once (the job array's %N); 0 = no limit
    slurm_extra: str = ""  # more sbatch options, e.g. "--account=lab --qos=normal --constraint=a100"
    slurm_poll: float = 30.0  # seconds between two looks at the queue while waiting
# -----------------------------------------------------------------------------

SPEC_KEYS = ("question", "base", "arms", "baseline", "seeds", "eval", "durability", "metrics", "primary", "test")
# set by experiment.py for every run; an arm or the base may not set them
RESERVED = ("out_dir", "seed", "init_from", "model_bin", "show_batches", "wandb_log", "wandb_project",
            "wandb_run_name", "wandb_group", "wandb_job_type", "wandb_run_id")
DEFAULT_METRICS = ["val_loss"] + [f"out_{m}" for m in metrics.MAIN_METRICS]
STAGE_CONFIGS = {"train.py": TrainConfig, "eval.py": EvalConfig, "durability.py": DurabilityConfig}
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a folder of the experiment's own (no '..', '/', '$')
RESERVED_NAMES = (TABLES, VISUALIZE, "slurm", "experiment.json", "experiment.log", "report.html")  # its files
DIFF_COLUMNS = ["arm", "baseline", "metric", "side", "n_baseline", "n_arm", "baseline_mean", "arm_mean", "diff", "lo",
                "hi", "df", "se", "p", *(f"p_{t}" for t in stats.TESTS), "p_holm", "lo_sim", "hi_sim", "mdd80",
                "family", "test"]  # differences.csv (stats.difference_table's columns)
TAG_COLUMNS = ("loss", "gap", "gap_ctx", "exposure", "exposure_extrap", "exposure_exact", "extraction", "effect")  # durability.csv


def config_fields(script: str) -> set[str]:
    """The --key=value fields of a stage that experiment.py launches."""
    return {f.name for f in dataclasses.fields(STAGE_CONFIGS[script])}


# -----------------------------------------------------------------------------
# the spec

def _settings(spec_path, where: str, obj, script: str, reserved=()) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{spec_path}: {where} must be an object of {script} settings")
    known = config_fields(script)
    for k in obj:
        if k in reserved:
            raise UserError(f"{spec_path}: {where} sets {k!r}, which experiment.py sets for every run; remove it")
        if k not in known:
            raise UserError(f"{spec_path}: {where} has unknown {script} key {k!r}; valid: {', '.join(sorted(known))}")
    return dict(obj)


def load_spec(path) -> dict:
    """The spec, checked before anything runs: unknown keys, empty arms, bad seeds and a
    baseline that is not an arm are one line naming the file and the field."""
    p = Path(path)
    try:
        spec = json_loads(p.read_text())
    except OSError as e:
        raise UserError(f"experiment spec {p}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"experiment spec {p} is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{p}: an experiment spec is a JSON object (see config/experiments/)")
    for k in spec:
        if k not in SPEC_KEYS:
            raise UserError(f"{p}: unknown key {k!r}; valid: {', '.join(SPEC_KEYS)}")
    base = spec.get("base", {})
    if isinstance(base, str):
        try:
            base = json_loads(Path(base).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: base config {spec['base']}: {e}") from None
    for k, kind in (("question", str), ("baseline", str), ("test", str), ("eval", dict), ("durability", dict)):
        if k in spec and not isinstance(spec[k], kind):
            raise UserError(f"{p}: {k!r} must be a JSON {'string' if kind is str else 'object'}")
    out = {"question": str(spec.get("question", "")), "spec_path": str(p),
           "base": _settings(p, "base", base, "train.py", RESERVED)}
    arms = spec.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise UserError(f"{p}: 'arms' must name at least one arm, e.g. {{\"shuffle\": {{}}}}")
    for a in arms:
        if not ARM_NAME.fullmatch(a) or a in RESERVED_NAMES:
            raise UserError(f"{p}: arm name {a!r} must be a plain folder name: letters, digits, '_', '-' and '.', "
                            f"starting with a letter or digit, at most 64 characters, and not one of "
                            f"{', '.join(RESERVED_NAMES)}")
    out["arms"] = {a: _settings(p, f"arm {a!r}", s, "train.py", RESERVED) for a, s in arms.items()}
    out["baseline"] = spec.get("baseline", next(iter(arms)))
    if out["baseline"] not in arms:
        raise UserError(f"{p}: baseline {out['baseline']!r} is not an arm ({', '.join(arms)})")
    seeds = spec.get("seeds", [1, 2, 3])
    if not isinstance(seeds, list) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_SEED for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"{p}: 'seeds' must be a list of distinct non-negative integers below 2**63 (train.py's "
                        "--seed), e.g. [1, 2, 3]")
    out["seeds"] = seeds
    out["eval"] = _settings(p, "eval", spec.get("eval", {}), "eval.py", ("out_dir",))
    out["durability"] = _settings(p, "durability", spec.get("durability", {}), "durability.py", ("out_dir",))
    metrics = spec.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{p}: 'metrics' must be a list of summary.csv column names")
    out["metrics"] = metrics
    primary = spec.get("primary", ["val_loss"])
    if not isinstance(primary, list) or not all(isinstance(m, str) for m in primary):
        raise UserError(f"{p}: 'primary' must be a list of summary.csv column names (e.g. [\"val_loss\"])")
    out["primary"] = primary
    out["test"] = spec.get("test", "auto")
    if out["test"] not in ("auto", *stats.TESTS):
        raise UserError(f"{p}: 'test' must be auto or one of {', '.join(stats.TESTS)}, not {out['test']!r}")
    check_values(p, out)
    return out


def check_values(p, spec: dict):
    """Every value as the stages will read it, before the lock and before any run folder:
    each arm's train.py settings (base + arm), the eval and durability settings through
    parse_config and the stage's own check (configs.check_*), an arm's schedule spec, and
    the metrics against the columns the runs can have. One line naming the field."""
    for arm, over in spec["arms"].items():
        settings = {**spec["base"], **over, "seed": spec["seeds"][0]}
        _check_stage(p, settings, TrainConfig(), TRAIN_CHOICES, check_train,
                     lambda k, arm=arm, over=over: f"arms.{arm}" if k in over else "base")
        if settings.get("schedule_spec"):
            try:
                load_schedule_spec(settings["schedule_spec"])
            except SpecError as e:
                raise UserError(f"{p}: {'arms.' + arm if 'schedule_spec' in over else 'base'}.schedule_spec: {e}") \
                    from None
    _check_stage(p, spec["eval"], EvalConfig(), None, check_eval, lambda k: "eval")
    _check_stage(p, spec["durability"], DurabilityConfig(), None, check_durability, lambda k: "durability")
    for key in ("metrics", "primary"):
        bad = [m for m in spec[key] if not is_summary_column(m)]
        if bad:
            raise UserError(f"{p}: {key}: {bad[0]!r} is not a column the runs' summary.csv (or durability.csv) can "
                            "have: val_loss, val_ppl, train_loss, out_<metric>[_sampled], in_<metric>_cum or _since, "
                            f"tag_<tag>_<measure>; metrics: {', '.join(metrics.output_metric_names())}")


def spec_tag_ids(p, spec: dict) -> set[str]:
    """The ids of the tags some arm inserts (base + arm tags files), with the "<id>:control"
    of each conditional tag that has a control: the tags durability.csv will measure."""
    have = set()
    for over in spec["arms"].values():
        path = {**spec["base"], **over}.get("tags")
        if not path:
            continue
        obj = read_json(path, "a tag file", f"fix the tags setting of {p}", want=object)
        for t in obj.get("tags", []) if isinstance(obj, dict) and isinstance(obj.get("tags"), list) else []:
            if isinstance(t, dict) and isinstance(t.get("id"), str):
                have.add(t["id"])
                if t.get("kind") == "conditional" and t.get("control", True) is not False:
                    have.add(f"{t['id']}:control")
    return have


def check_statistics(p, spec: dict):
    """Every statistic aggregate() computes, computed first on made-up values at the spec's
    arms x seeds (and metrics, and a family as large as theirs): a test or an interval that
    cannot be computed at this seed count is refused before any run trains, not after all of
    them have (a 2-seed experiment stopped in the mdd search so)."""
    wanted = [m for m in (spec["metrics"] or DEFAULT_METRICS) if not m.startswith("tag_")]
    rng = np.random.default_rng(0)
    df = pd.DataFrame([{"arm": a, "seed": s, "iter": it, **{m: float(rng.normal()) for m in wanted}}
                       for a in spec["arms"] for s in spec["seeds"] for it in (0, 1, 2, 4)])
    side = {m: "primary" if m in spec.get("primary", []) else "output" for m in wanted}
    try:
        stats.curve_table(df, wanted)
        stats.final_table(df, wanted, list(spec["arms"]))
        stats.difference_table(df, wanted, list(spec["arms"]), spec["baseline"], side, spec["test"])
        stats.saturation_tables(df, wanted, list(spec["arms"]), saturation.saturation_step)
    except Exception as e:  # noqa: BLE001 (any failure of the statistics is this spec's to fix)
        raise UserError(f"{p}: the experiment's statistics cannot be computed for {len(spec['seeds'])} seeds and "
                        f"{len(wanted)} metrics ({type(e).__name__}: {e}); change seeds, metrics or test") from None


def check_tag_metrics(p, spec: dict):
    """A tag measure among metrics/primary (tag_<tag>_<measure>) must name a tag some arm
    inserts: refused before any run trains, not after every run has (the aggregation's error)."""
    have = None
    for key in ("metrics", "primary"):
        for m in spec[key]:
            if not m.startswith("tag_") or not is_summary_column(m):
                continue
            have = spec_tag_ids(p, spec) if have is None else have
            if not any(m.endswith(f"_{c}") and m[4:-len(c) - 1] in have for c in TAG_COLUMNS):
                raise UserError(f"{p}: {key}: {m!r} names no tag the arms insert (their tags: "
                                f"{', '.join(sorted(have)) or 'none, no arm sets tags'}): use tag_<id>_<measure> "
                                "with the id of a tag in the arms' tag files")


def _check_stage(p, settings: dict, cfg, choices, check, where):
    """parse_config + check on settings as the stage gets them; its '--key=value: why' line
    becomes '<spec>: <where(key)>.key=value: why'."""
    try:
        check(parse_config(cfg, config_to_argv(settings), choices))
    except UserError as e:
        msg = str(e)
        m = re.match(r"--(\w+)=", msg)
        raise UserError(f"{p}: {where(m.group(1))}.{msg[2:]}" if m else f"{p}: {where(None)}: {msg}") from None


def is_summary_column(name: str) -> bool:
    """Whether a run's summary.csv (eval.py's join_summary) or its durability.csv
    measures (read_runs: tag_<tag>_<measure>) can have this column."""
    batch = ["noisy", *REF_COLUMNS, *metrics.text_metric_names()]  # batch_metrics.csv's metric columns
    names = {"iter", "tokens_seen", "val_loss", "val_ppl", "train_loss", "n_batches_since", "n_batches_cum",
             *(f"out_{m}{s}" for m in metrics.output_metric_names() for s in ("", "_sampled")),
             *(f"in_{c}_{s}" for c in batch for s in ("since", "cum"))}
    return name in names or bool(re.fullmatch(rf"tag_.+_({'|'.join(TAG_COLUMNS)})", name))


# -----------------------------------------------------------------------------
# the runs

@dataclass
class Run:
    arm: str
    seed: int
    dir: Path
    train_args: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def plan(spec: dict, exp_dir: Path, name: str, cfg: ExperimentConfig) -> list[Run]:
    runs = []
    for arm, over in spec["arms"].items():
        for seed in spec["seeds"]:
            d = exp_dir / arm / f"seed{seed}"
            settings = {**spec["base"], **over, "seed": seed, "out_dir": str(d)}
            args = config_to_argv(settings)
            if cfg.wandb_log:
                args += ["--wandb_log=True", f"--wandb_project={cfg.wandb_project}", f"--wandb_group={name}",
                         f"--wandb_job_type={arm}", f"--wandb_run_name={arm}-seed{seed}",
                         f"--wandb_run_id={name}-{arm}-seed{seed}"]
            runs.append(Run(arm, seed, d, args, settings))
    return runs


def check_settings(run: Run):
    """A run folder made by another version of this arm is refused (one line)."""
    p = run.dir / "experiment_run.json"
    want = {k: str(v) for k, v in run.settings.items() if k != "out_dir"}  # a moved folder is still the run
    if p.exists():
        have = json.loads(p.read_text()).get("settings", {})
        have.pop("out_dir", None)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{run.dir} was trained with {k}={have.get(k, '(unset)')}, the spec now says "
                            f"{want.get(k, '(unset)')}: use another experiment name, or delete {run.dir}")
    elif list_checkpoints(run.dir):
        raise UserError(f"{run.dir} holds checkpoints that experiment.py did not start: delete it or use another "
                        "experiment name")


def train_state(run: Run) -> tuple[str, int]:
    """('new' | 'cut' | 'done', latest checkpoint step or -1)."""
    ckpts = list_checkpoints(run.dir)
    if not ckpts:
        return "new", -1
    ck = load_checkpoint(latest_checkpoint(run.dir))
    done = ck["iter_num"] >= ck["config"]["max_iters"] and (run.dir / "model.bin").exists()
    return ("done" if done else "cut"), int(ck["iter_num"])


def has_tags(run: Run) -> bool:
    return bool(run.settings.get("tags"))


def _command(run: Run, stage: str, spec: dict, cfg: ExperimentConfig, resume: bool) -> list[str]:
    py = [sys.executable]
    if stage == "train":
        head = ([shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={cfg.torchrun}"]
                if cfg.torchrun > 0 else py)
        return head + [str(ROOT / "train.py")] + run.train_args + (["--init_from=resume"] if resume else [])
    extra = spec["eval"] if stage == "eval" else spec["durability"]
    wb = ["--wandb_log=True"] if cfg.wandb_log and stage == "eval" else []
    return py + [str(ROOT / f"{stage}.py"), f"--out_dir={run.dir}"] + config_to_argv(extra) + wb


def job_of(run: Run, spec: dict, cfg: ExperimentConfig) -> Job:
    """The run as a launcher job: train (skipped when finished, resumed when cut), eval,
    and durability where the arm has tags. Writes the run's experiment_run.json."""
    state, it = train_state(run)
    run.dir.mkdir(parents=True, exist_ok=True)
    if not (run.dir / "experiment_run.json").exists():
        write_json_atomic(run.dir / "experiment_run.json", {"arm": run.arm, "seed": run.seed,
                                                             "settings": {k: str(v) for k, v in run.settings.items()},
                                                             "train_args": run.train_args})
    stages = ["eval"] + (["durability"] if has_tags(run) else [])
    if state == "done":
        print(f"{run.label}: trained (step {it}), skipped", flush=True)
    else:
        stages.insert(0, "train")
    if state == "cut":
        print(f"{run.label}: resume from step {it} (cut there)", flush=True)
    return Job(run.label, run.dir, [(s, _command(run, s, spec, cfg, resume=state == "cut")) for s in stages],
               resume={"train": _command(run, "train", spec, cfg, resume=True)})  # a requeued Slurm job goes on


def run_all(runs: list[Run], spec: dict, cfg: ExperimentConfig, exp_dir: Path, name: str):
    jobs = [job_of(r, spec, cfg) for r in runs]
    results = launch(jobs, cfg.launcher, options_from(cfg, name=name, folder=str(exp_dir / "slurm")))
    raise_failures(results, "runs")


def gather_runs(runs: list[Run], cfg: ExperimentConfig, exp_dir: Path, name: str):
    """--aggregate_only=True with a Slurm launcher: wait for the runs' jobs still in the
    queue, and stop on any run whose last job did not finish."""
    results = gather([Job(r.label, r.dir) for r in runs], cfg.launcher,
                     options_from(cfg, name=name, folder=str(exp_dir / "slurm")))
    raise_failures(results, "runs")


# -----------------------------------------------------------------------------
# aggregation

def read_runs(runs: list[Run]) -> pd.DataFrame:
    """Every run's summary.csv (and durability.csv, one column per tag and measure),
    stacked with arm and seed columns."""
    frames = []
    for r in runs:
        p = RunPaths(r.dir).tables / "summary.csv"
        if not p.exists():
            raise UserError(f"no {p}: run the experiment first (without --aggregate_only)")
        df = pd.read_csv(p)
        dp = RunPaths(r.dir).tables / "durability.csv"
        if dp.exists():
            dur = pd.read_csv(dp)
            for tag, g in dur.groupby("tag"):
                for c in TAG_COLUMNS:
                    if g[c].notna().any():
                        df = df.merge(g[["iter", c]].rename(columns={c: f"tag_{tag}_{c}"}), on="iter", how="left")
        df.insert(0, "seed", r.seed)
        df.insert(0, "arm", r.arm)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def choose_metrics(df: pd.DataFrame, wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """(metrics to compare, side of each): the spec's (or default) outputs, their input
    twins, and every tag measure."""
    def usable(c):
        return c in df.columns and np.isfinite(df[c].to_numpy(dtype=float)).any()
    if wanted:
        bad = [m for m in wanted if m not in df.columns]
        if bad:
            raise UserError(f"metrics {', '.join(bad)} are not summary.csv columns; valid: "
                            f"{', '.join(c for c in df.columns if c not in ('arm', 'seed'))}")
    outs = [m for m in (wanted or DEFAULT_METRICS) if usable(m) and not m.startswith("in_")]
    ins = [m for m in wanted if m.startswith("in_") and usable(m)]
    ins += [f"in_{m[4:]}_cum" for m in outs if m.startswith("out_") and usable(f"in_{m[4:]}_cum")
            and f"in_{m[4:]}_cum" not in ins]
    tags = [c for c in df.columns if c.startswith("tag_") and usable(c)]
    side = {**{m: "output" for m in outs}, **{m: "input" for m in ins}, **{m: "tag" for m in tags}}
    return outs + ins + tags, side


def aggregate(exp_dir: Path, spec: dict, runs: list[Run]) -> dict:
    df = read_runs(runs)
    arms = list(spec["arms"])
    metrics, side = choose_metrics(df, spec["metrics"])
    side.update({m: "primary" for m in spec.get("primary", []) if m in side})  # a family of its own
    paths = RunPaths(exp_dir)
    tables, vis = paths.tables, paths.visualize
    curves = stats.curve_table(df, metrics)
    final = stats.final_table(df, metrics, arms)
    diff = stats.difference_table(df, metrics, arms, spec["baseline"], side, spec["test"])
    if diff.empty:  # one arm: a table with its columns and no rows (a 1-byte file is no table to a reader)
        diff = pd.DataFrame(columns=DIFF_COLUMNS)
    sat_runs, sat = stats.saturation_tables(df, metrics, arms, saturation.saturation_step)
    last = stats.final_rows(df)
    listing = pd.DataFrame([{"arm": r.arm, "seed": r.seed, "dir": str(r.dir),
                             "final_iter": int(last[(last.arm == r.arm) & (last.seed == r.seed)]["iter"].iloc[0]),
                             "commit": run_record(r.dir).get("commit", "")} for r in runs])
    out = {}
    for name, t in (("curves", curves), ("final", final), ("differences", diff), ("saturation", sat),
                    ("saturation_runs", sat_runs), ("runs", listing)):
        write_csv_atomic(t, tables / f"{name}.csv")
        out[name] = tables / f"{name}.csv"
    n = len(spec["seeds"])
    for s, png in (("output", "bands_output.png"), ("input", "bands_input.png"), ("tag", "bands_tags.png")):
        ms = [m for m in metrics if side[m] == s or (s == "output" and side[m] == "primary")]
        if ms:
            what = {"output": "model outputs", "input": "batches trained on (cumulative means)",
                    "tag": "tags (durability.py)"}[s]
            saturation.plot_bands(curves, sat, ms, arms, vis / png, f"{exp_dir.name}: {what}, mean of {n} seeds "
                                  "per arm vs training step", {m: saturation.column_label(m) for m in ms})
            out[png] = vis / png
    if len(arms) > 1:
        ms = [m for m in metrics if side[m] != "input"]
        stats.plot_forest(diff, ms, arms, vis / "forest.png", f"{exp_dir.name}: end-of-run difference from "
                          f"{spec['baseline']}", {m: saturation.column_label(m) for m in ms})
        out["forest.png"] = vis / "forest.png"
    print_differences(diff, final, spec)
    return out


def print_differences(diff: pd.DataFrame, final: pd.DataFrame, spec: dict):
    n = len(spec["seeds"])
    test = diff["test"].iloc[0] if len(diff) else spec["test"]
    print(f"\nend of training, mean [95% interval] over {n} seeds; diff = arm - {spec['baseline']} "
          f"[simultaneous 95% interval over the arm's metrics of one side, Bonferroni], p = {test} test, "
          "Holm-adjusted per arm and side")
    rows = []
    for m in dict.fromkeys(final["metric"]):
        f = final[final.metric == m].set_index("arm")
        line = {"metric": m}
        for a in spec["arms"]:
            r = f.loc[a]
            line[a] = stats.fmt_interval(r["mean"], r["lo"], r["hi"], 3)
            d = diff[(diff.metric == m) & (diff.arm == a)] if len(diff) else diff
            if len(d):
                d = d.iloc[0]
                line[f"{a} diff"] = (f"{stats.fmt_interval(d['diff'], d['lo_sim'], d['hi_sim'], 3, '+')} "
                                     f"p={d['p_holm']:.2g}")
        rows.append(line)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 40):
        print(pd.DataFrame(rows).set_index("metric").to_string())
    print_power(diff, n)


def print_power(diff: pd.DataFrame, n: int):
    """What the design can see: per arm and output metric, the smallest difference detected
    with 80% power at the family's level, from the observed spread over n seeds."""
    if not len(diff):  # one arm: nothing to compare
        return
    out = diff[diff["side"].isin(["primary", "output"]) & np.isfinite(diff["mdd80"])]
    if not len(out):
        return
    print(f"\npower: with {n} seeds, the smallest difference detected with 80% power (at the family's "
          "Bonferroni level, from the observed spread):")
    for arm, g in out.groupby("arm", sort=False):
        print(f"  {arm}: " + ", ".join(f"{r.metric} {r.mdd80:.3g}" for r in g.itertuples()))


def experiment_name(cfg: ExperimentConfig, spec_path: str) -> str:
    """--name, else the spec's file name: a folder of its own under --out_root (the arms' rule)."""
    name = cfg.name or Path(spec_path).stem
    if not ARM_NAME.fullmatch(name):
        where = f"--name={cfg.name}" if cfg.name else f"{spec_path} (its file name)"
        raise UserError(f"experiment name {name!r} of {where} must be a plain folder name: letters, digits, '_', '-' "
                        "and '.', starting with a letter or digit, at most 64 characters (rename the spec or pass "
                        "--name=<such a name>)")
    return name


def log_wandb(exp_dir: Path, name: str, spec: dict, figures: dict, cfg: ExperimentConfig):
    """The experiment's figures and tables as one more run of its group (job type 'aggregate')."""
    run = tracking.start(project=cfg.wandb_project, dir=exp_dir, group=name, job_type="aggregate",
                         name=f"{name}-aggregate", config={k: v for k, v in spec.items() if k != "spec_path"})
    for k, p in figures.items():
        run.log({f"experiment/{Path(p).stem}": tracking.image(p) if str(p).endswith(".png")
                 else tracking.table(pd.read_csv(p))})
    run.finish()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec_args = [a for a in argv if not a.startswith("-")]
    if len(spec_args) != 1:
        raise UserError("give one experiment spec: python experiment.py config/experiments/<name>.json [--jobs=N]")
    cfg = parse_config(ExperimentConfig(), [a for a in argv if a.startswith("-")], {"launcher": LAUNCHERS.choices()})
    if cfg.jobs < 1 or cfg.torchrun < 0:
        raise UserError(f"--jobs={cfg.jobs} --torchrun={cfg.torchrun}: jobs must be >= 1, torchrun >= 0")
    if cfg.detach and cfg.launcher == "local":
        raise UserError("--detach=True needs --launcher=slurm (local runs are processes of this command)")
    options_from(cfg)  # the --slurm_* values, checked before anything is written
    spec = load_spec(spec_args[0])
    check_tag_metrics(spec_args[0], spec)
    check_statistics(spec_args[0], spec)
    name = experiment_name(cfg, spec_args[0])
    exp_dir = Path(cfg.out_root) / name
    lock = FolderLock(exp_dir, "experiment name (--name)")
    try:
        runs = plan(spec, exp_dir, name, cfg)
        for r in runs:
            check_settings(r)
        write_json_atomic(exp_dir / "experiment.json", {**spec, "name": name, "commit": git_commit(),
                                                        "arm_order": list(spec["arms"]),  # the file's keys are sorted
                                                        "runs": [str(r.dir) for r in runs]})
        if not cfg.aggregate_only:
            at_once = f"{cfg.jobs} at a time" if cfg.launcher == "local" else f"as {cfg.launcher} jobs"
            print(f"experiment {name}: {len(spec['arms'])} arms x {len(spec['seeds'])} seeds = {len(runs)} runs "
                  f"in {exp_dir}, {at_once}")
            run_all(runs, spec, cfg, exp_dir, name)
            if cfg.detach:
                print(f"submitted; when they are done: python experiment.py {spec_args[0]} --launcher={cfg.launcher} "
                      f"--aggregate_only=True" + (f" --name={name}" if cfg.name else "") +
                      (f" --out_root={cfg.out_root}" if cfg.out_root != "out" else ""))
                return {}
        elif cfg.launcher != "local":
            gather_runs(runs, cfg, exp_dir, name)
        figures = aggregate(exp_dir, spec, runs)
        for p in figures.values():
            print(f"wrote {p}")
        if cfg.wandb_log:
            log_wandb(exp_dir, name, spec, figures, cfg)
        print(f"report: python report.py {exp_dir}")
    finally:
        lock.release()
    return figures


if __name__ == "__main__":
    main_guard(main)
