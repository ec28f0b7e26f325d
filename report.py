"""
One self-contained HTML page for an experiment or a single run: open it from disk in any
browser, offline (images and data are inline; no script, no network).

$ python report.py out/curriculum               # an experiment (experiment.py) -> out/curriculum/report.html
$ python report.py out                          # a single run (train.py + eval.py) -> out/report.html
$ python report.py out/curriculum --steps=0,250,499 --chars=0 --out=/tmp/curriculum.html

An experiment's page: the question and the arms (the settings each changes), the result
at the end of training (mean and 95% interval per arm, the difference from the baseline
with its interval and Holm-adjusted p-value), the figures, saturation steps, and per run
its config, commit, per-checkpoint table and a batch viewer. A run's page: its config and
commit, the per-checkpoint table, its figures (<run>/visualize/) and the batch viewer.

Batch viewer: the ids and the text of the batches trained at the chosen steps (default:
the first, middle and last recorded step), with tag insertions listed, as batch_viewer.py
shows them; for an experiment, the first seed of every arm (--viewer=all: every run).
"""

import base64
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metrics import MAIN_METRICS
from prebias import stats
from prebias.checkpoint import run_config, run_record
from prebias.common import ENV_FAULTS, UserError, main_guard, parse_config, write_text_atomic
from prebias.inputs import read_csv, read_json
from prebias.paths import RunPaths
from prebias.stream import RunBatches


# -----------------------------------------------------------------------------
# config (the experiment or run folder is the first argument)
@dataclass
class ReportConfig:
    out: str = ""  # the page ('' = <folder>/report.html)
    steps: str = ""  # batch viewer steps, comma list ('' = first, middle, last recorded)
    chars: int = 400  # characters of each batch's text in the viewer (0: all)
    viewer: str = "first"  # first: the first seed of each arm; all: every run; none
    max_rows: int = 40  # checkpoint rows per run table
# -----------------------------------------------------------------------------

TABLE_COLUMNS = {"final.csv": ("arm", "metric", "mean", "lo", "hi"),
                 "differences.csv": ("arm", "metric", "side", "diff", "lo", "hi", "lo_sim", "hi_sim", "p", "p_holm",
                                     "test"),
                 "saturation.csv": ("arm", "metric", "mean", "min", "max"),
                 "runs.csv": ("arm", "seed", "dir")}

CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
.meta { color: #666; } .question { font-size: 1.15em; background: #f4f7fb; padding: .6em 1em; border-left: 4px solid #4a7bd0; }
table { border-collapse: collapse; margin: .6em 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.sig td { background: #fff5d6; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
.text { text-align: left; font-family: Menlo, Consolas, monospace; font-size: 11.5px; white-space: pre-wrap; max-width: 800px; }
.note { color: #555; font-size: 12.5px; }
"""


def esc(x) -> str:
    return html.escape(str(x))


def img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}"><figcaption class="note">' \
           f'{esc(alt)}</figcaption></figure>'


def table(df: pd.DataFrame, left=(), row_class=None) -> str:
    """A plain HTML table; numbers with 4 significant digits."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.4g}"
        return esc(v)
    head = "".join(f'<th class="{"l" if c in left else ""}">{esc(c)}</th>' for c in df.columns)
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        cls = f' class="{row_class(r)}"' if row_class and row_class(r) else ""
        rows.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if c in left else ""}">{cell(r[c])}</td>'
                                           for c in df.columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# -----------------------------------------------------------------------------
# pieces of a run

def run_section(run_dir: Path, cfg: ReportConfig, viewer: bool, title: str) -> str:
    parts = [f"<h3>{esc(title)}</h3>"]
    batches = RunBatches(run_dir) if viewer else None  # reads the latest checkpoint's config once
    rc = vars(batches.cfg) if batches else run_config(run_dir)
    meta = run_record(run_dir)
    parts.append(f'<p class="meta">folder <code>{esc(run_dir)}</code> &middot; commit '
                 f'<code>{esc(meta.get("commit", "unknown"))}</code> &middot; started {esc(meta.get("time", "?"))}</p>')
    parts.append(f"<details><summary>config (train.py)</summary><pre>{esc(json.dumps(rc, indent=1))}</pre></details>")
    sp = RunPaths(run_dir).tables / "summary.csv"
    if sp.exists():
        s = read_csv(sp, "an evaluation table", f"rerun python eval.py --out_dir={run_dir} --redo=True",
                     columns=("iter",))
        cols = [c for c in ["iter", "tokens_seen", "val_loss", "train_loss", *(f"out_{m}" for m in MAIN_METRICS)]
                if c in s.columns]
        parts.append(f"<details><summary>per checkpoint ({len(s)} checkpoints, summary.csv)</summary>"
                     f"{table(s[cols].head(cfg.max_rows))}</details>")
    dp = RunPaths(run_dir).tables / "durability.csv"
    if dp.exists():
        d = read_csv(dp, "a durability table", f"rerun python durability.py --out_dir={run_dir} --redo=True",
                     columns=("iter", "tag", "kind"))
        parts.append(f"<details><summary>tags per checkpoint (durability.csv)</summary>"
                     f"{table(d.head(cfg.max_rows * 4), left=('tag', 'kind'))}</details>")
    if batches:
        parts.append(batch_viewer(batches, cfg))
    return "\n".join(parts)


def viewer_steps(n_steps: int, spec: str) -> list[int]:
    if spec:
        try:
            return [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--steps={spec}: a comma list of step numbers, e.g. --steps=0,100,499") from None
    return sorted({0, n_steps // 2, n_steps - 1}) if n_steps else []


def batch_viewer(run: RunBatches, cfg: ReportConfig) -> str:
    """The batches of the chosen steps, as trained (as batch_viewer.py shows them)."""
    out = []
    for step in viewer_steps(len(run.ids), cfg.steps):
        rows, source = run.rows(step, cfg.chars)
        df = pd.DataFrame(rows).drop(columns="offset")
        df["tags"] = ["; ".join(t) for t in df["tags"]]
        body = table(df, left=("stories", "tags", "text")).replace('<td class="l">', '<td class="l text">')
        out.append(f"<details><summary>step {step}: {len(rows)} batches ({esc(source)})</summary>{body}</details>")
    return "<h4>batch viewer</h4>" + "\n".join(out)


# -----------------------------------------------------------------------------
# the pages

# no script at all, images only from data: URIs, styles only inline: a value that slipped
# past esc() still cannot run or fetch anything
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def page(title: str, body: list[str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) +
            f'\n<p class="meta">written by report.py on {stamp}</p></body></html>\n')


def read_experiment(exp_dir: Path) -> dict:
    """experiment.json, its fields of the types the page uses (one line otherwise)."""
    spec = read_json(exp_dir / "experiment.json", "an experiment record (experiment.py writes it)",
                     f"rerun the experiment: python experiment.py <spec> (it rewrites {exp_dir / 'experiment.json'})",
                     keys=("name", "arms", "baseline", "seeds", "base"))
    if not isinstance(spec["arms"], dict) or not all(isinstance(v, dict) for v in spec["arms"].values()) or \
            not isinstance(spec["seeds"], list) or not isinstance(spec["base"], dict) or \
            not isinstance(spec["baseline"], str) or not isinstance(spec["name"], str):
        raise UserError(f"{exp_dir / 'experiment.json'}: arms and base must be objects and seeds a list: rerun the "
                        "experiment (python experiment.py <spec>)")
    return spec


def experiment_page(exp_dir: Path, cfg: ReportConfig) -> str:
    fix = f"rerun python experiment.py <spec> --aggregate_only=True (it rewrites {exp_dir}'s tables)"
    spec = read_experiment(exp_dir)
    tables = RunPaths(exp_dir).tables
    final, diff, sat, runs = (read_csv(tables / f, f"an experiment table ({f})", fix, columns=cols)
                              for f, cols in TABLE_COLUMNS.items())
    arms, base, n = spec.get("arm_order", list(spec["arms"])), spec["baseline"], len(spec["seeds"])
    b = [f"<h1>Experiment: {esc(spec['name'])}</h1>",
         f'<p class="meta">spec <code>{esc(spec.get("spec_path", ""))}</code> &middot; commit '
         f'<code>{esc(spec.get("commit", ""))}</code> &middot; {len(arms)} arms &times; {n} seeds '
         f'({esc(", ".join(map(str, spec["seeds"])))})</p>']
    if spec.get("question"):
        b.append(f'<p class="question">{esc(spec["question"])}</p>')
    # the arms
    arm_rows = [{"arm": a + (" (baseline)" if a == base else ""),
                 "settings": ", ".join(f"{k}={v}" for k, v in spec["arms"][a].items()) or "(the base settings)"}
                for a in arms]
    b += ["<h2>Arms</h2>", table(pd.DataFrame(arm_rows), left=("arm", "settings")),
          f'<p class="note">shared by every arm: {esc(", ".join(f"{k}={v}" for k, v in spec["base"].items()))}</p>']
    # the result
    res = []
    for m in dict.fromkeys(final["metric"]):
        f = final[final.metric == m].set_index("arm")
        row = {"metric": m}
        for a in arms:
            row[a] = stats.fmt_interval(f.loc[a, "mean"], f.loc[a, "lo"], f.loc[a, "hi"]) if a in f.index else "n/a"
        res.append(row)
    b += ["<h2>Result at the end of training</h2>",
          f'<p class="note">mean [95% t interval] over {n} seeds at each run\'s last checkpoint '
          f"(tables/final.csv)</p>", table(pd.DataFrame(res), left=("metric",))]
    if len(diff):
        test = str(diff["test"].iloc[0])
        d = diff.copy()
        d["difference [95%, this metric alone]"] = [stats.fmt_interval(r["diff"], r["lo"], r["hi"])
                                                    for _, r in d.iterrows()]
        d["[simultaneous 95%]"] = [stats.fmt_interval(r["diff"], r["lo_sim"], r["hi_sim"]).split(" ", 1)[-1]
                                   for _, r in d.iterrows()]
        d = d[["arm", "metric", "side", "baseline_mean", "arm_mean", "difference [95%, this metric alone]",
               "[simultaneous 95%]", "p", "p_holm", "mdd80"]]
        b += [f"<h3>Difference from {esc(base)}</h3>",
              f'<p class="note">arm &minus; {esc(base)}, {esc(test)} test over seeds (paired: seed-matched '
              "differences, used when every arm has the same seeds). The first interval holds for that metric "
              "alone; the simultaneous one holds for all metrics of the arm's side together (Bonferroni), and "
              "when it excludes 0 so does Holm's test. p: the test's raw p-value; p_holm: Holm-adjusted across "
              "the metrics of one side (output, input, tag) of one arm. mdd80: the smallest difference this "
              "design detects with 80% power. Highlighted: p_holm &lt; 0.05. Input rows describe the batches "
              "each arm trained on, so they differ by design.</p>",
              table(d, left=("arm", "metric", "side", "difference [95%, this metric alone]", "[simultaneous 95%]"),
                    row_class=lambda r: "sig" if r["p_holm"] < 0.05 else "")]
    elif len(arms) == 1:
        b.append('<p class="note">No differences to show: the experiment has one arm (differences.csv is empty).</p>')
    # figures
    vis = RunPaths(exp_dir).visualize
    captions = {"forest.png": "End-of-run differences from the baseline, each metric on its own scale",
                "bands_output.png": "Model outputs over training: mean per arm with its 95% band over seeds, "
                                    "saturation steps dashed (min..max over seeds on top)",
                "bands_input.png": "What each arm trained on: cumulative means of the batch metrics",
                "bands_tags.png": "Tags over training (durability.py)"}
    figs = [img(vis / f, c) for f, c in captions.items() if (vis / f).exists()]
    b += ["<h2>Figures</h2>"] + figs
    # saturation
    s = sat.copy()
    s["step"] = [f"{r['mean']:.0f} [{r['min']:.0f}\u2013{r['max']:.0f}]" if np.isfinite(r["mean"]) else "n/a"
                 for _, r in s.iterrows()]
    piv = s.pivot(index="metric", columns="arm", values="step").reindex(columns=arms).reset_index()
    b += ["<h2>Saturation steps</h2>",
          '<p class="note">the first checkpoint from which a run\'s curve stays within 5% of its total change of its '
          "final value (saturation.py); mean [min\u2013max] over seeds</p>", table(piv, left=("metric",))]
    # runs
    b.append("<h2>Runs</h2>")
    b.append(table(runs, left=("arm", "dir", "commit")))
    for a in arms:
        for k, (_, r) in enumerate(runs[runs.arm == a].iterrows()):
            show = cfg.viewer == "all" or (cfg.viewer == "first" and k == 0)
            b.append(run_section(Path(r["dir"]), cfg, show, f"{a} / seed {r['seed']}"))
    return page(f"{spec['name']}: experiment report", b)


def single_run_page(run_dir: Path, cfg: ReportConfig) -> str:
    b = [f"<h1>Run: {esc(run_dir)}</h1>"]
    if not (RunPaths(run_dir).tables / "summary.csv").exists():
        b.append(f'<p class="note">no evaluation yet: run python eval.py --out_dir={esc(run_dir)} for the '
                 "per-checkpoint table</p>")
    figs = sorted(RunPaths(run_dir).visualize.glob("*.png")) if RunPaths(run_dir).visualize.exists() else []
    b.append(run_section(run_dir, cfg, cfg.viewer != "none", "config, checkpoints and batches"))
    if figs:
        b += ["<h2>Figures</h2>"] + [img(p, p.stem.replace("_", " ")) for p in figs]
    return page(f"{run_dir}: run report", b)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folders = [a for a in argv if not a.startswith("-")]
    if len(folders) != 1:
        raise UserError("give one folder: python report.py out/<experiment> (or a run folder such as out)")
    cfg = parse_config(ReportConfig(), [a for a in argv if a.startswith("-")],
                       {"viewer": ("first", "all", "none")})
    if cfg.chars < 0:
        raise UserError(f"--chars={cfg.chars}: characters of each batch's text, >= 0 (0: all)")
    if cfg.max_rows < 1:
        raise UserError(f"--max_rows={cfg.max_rows}: checkpoint rows per run table, at least 1")
    folder = Path(folders[0])
    if (folder / "experiment.json").exists():
        text = experiment_page(folder, cfg)
    elif RunPaths(folder).config.exists() or RunPaths(folder).ckpt.exists():
        text = single_run_page(folder, cfg)
    else:
        raise UserError(f"{folder} is neither an experiment (experiment.json) nor a run (config.json): "
                        "give the folder experiment.py or train.py wrote")
    out = Path(cfg.out) if cfg.out else folder / "report.html"
    try:
        write_text_atomic(out, text)
    except OSError as e:
        if e.errno in ENV_FAULTS:  # a full disk or a read-only folder: main_guard's line gives that fix
            raise
        raise UserError(f"cannot write {out} ({e.strerror}): give a writable --out=<file.html>") from None
    print(f"wrote {out} ({len(text) / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    main_guard(main)
