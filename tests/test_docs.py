"""Docs that cannot drift: what README.md and docs/*.md name must exist at HEAD.

- every `python <command>.py ... --flag` (and `torchrun ... <command>.py --flag`, or a code
  span that starts with `<command>.py --flag`) names a command file that exists and flags
  its parser accepts: the fields of the dataclass it hands to prebias.common.parse_config,
  or the options of its argparse parser, read from the command's own source;
- every `make <target>` is a target of the Makefile (as make itself reads it);
- every variant of every registry appears in the first column of a table in docs/;
- every repository path named in a code span, code block or link exists (output paths,
  placeholders and other projects' files are told apart, below).
Failures name the doc, the line and the token.
"""

import ast
import bisect
import dataclasses
import importlib
import importlib.util
import itertools
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import metrics
from prebias.common import Registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# paths that a run writes (absent from a clean clone) or that stand for the user's own files
OUTPUT_ROOTS = {"out", "data", "data_noisy", "tables", "visualize", "ckpt", "slurm", "attribution", "hf",
                "metrics", "path", "out_dir", "out_root", "data_dir", "tables_dir"}
REPO_DIRS = {"prebias", "bench", "tests", "config", "docs", ".ci"}
BARE_EXTS = {"py", "c", "md", "sh", "txt", "model"}  # a bare file name with these must be a repository file
OTHER_PROJECTS = ("llama2.c's", "Pythia's", "llm.c's")  # a span right after these names their files
PROJECT_NAMES = {"llama2.c", "llm.c"}
# registries that are the engine's internals: its fast paths are keyed by the metrics in metrics.TEXT_METRICS
INTERNAL_REGISTRIES = {("prebias.metrics_engine", "STAGES"), ("prebias.metrics_engine", "FAST")}


# --- reading the docs ---------------------------------------------------------

def strip_comment(line: str) -> str:
    """A shell line without its # comment (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


@cache
def snippets(doc: Path) -> tuple:
    """(line, text, kind, text before it on its line) of every shell line of a fenced block
    (continuations joined; python blocks skipped), every inline code span and every link."""
    out, fence, pending, prose = [], None, None, []
    for n, line in enumerate(doc.read_text().split("\n"), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence else (line.strip()[3:] or "text")
            continue
        if fence is None:
            prose.append((n, line))
        elif fence != "python":
            code = strip_comment(line).rstrip()
            start, text = pending if pending else (n, "")
            text = (text + " " + code.rstrip("\\").strip()).strip()
            pending = (start, text) if code.endswith("\\") else None
            if not pending:
                out.append((start, text.removeprefix("$ "), "block", ""))
    text = "\n".join(line for _, line in prose)
    starts = list(itertools.accumulate((len(line) + 1 for _, line in prose), initial=0))

    def line_of(pos: int) -> int:
        return prose[bisect.bisect_right(starts, pos) - 1][0]

    for m in re.finditer(r"`([^`]+?)`", text):
        if "\n\n" not in m.group(1):
            before = text[max(0, m.start() - 12):m.start()]
            out.append((line_of(m.start()), m.group(1).replace("\n", " "), "span", before))
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        out.append((line_of(m.start()), m.group(1), "link", ""))
    return tuple(out)


COMMAND = re.compile(r"(?:^|[\s;&|(])(?:python3?|torchrun)\s+(?:-[^\s]+\s+)*?((?:[\w.-]+/)*[\w-]+\.py)\b([^;&|]*)")
SPAN_COMMAND = re.compile(r"^\s*((?:[\w.-]+/)*[\w-]+\.py)\s+(--.*)$")


def commands(doc: Path):
    """(line, command file, the flags given to it)."""
    for n, text, kind, _ in snippets(doc):
        if kind == "link":
            continue
        found = list(COMMAND.finditer(text)) or ([m] if kind == "span" and (m := SPAN_COMMAND.match(text)) else [])
        for m in found:
            rest = re.sub(r"\"[^\"]*\"|'[^']*'", "", m.group(2))  # a quoted value may hold another program's flags
            yield n, m.group(1), re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", rest)


# --- what exists --------------------------------------------------------------

def resolve(name: str, tree: ast.Module, path: Path):
    """The object `name` means in the module at `path`: from its imports where it is
    imported, else from the module itself (commands run nothing on import)."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            real = next(a.name for a in node.names if (a.asname or a.name) == name)
            return getattr(importlib.import_module(node.module), real)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return getattr(module, name)


@cache
def accepted_flags(command: str) -> frozenset:
    """--flags a command's parser takes: parse_config's dataclass fields, argparse's
    options, and any "--x" it tests its arguments against (`in sys.argv`, `in (...)`)."""
    path = ROOT / command
    tree = ast.parse(path.read_text())
    flags = {"help"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn == "parse_config" and node.args and isinstance(node.args[0], ast.Call) \
                    and isinstance(node.args[0].func, ast.Name):
                cfg = resolve(node.args[0].func.id, tree, path)
                flags |= {f.name for f in dataclasses.fields(cfg)}
            elif fn == "parser" and ast.unparse(node.func) == "smoke.parser":  # bench/smoke.py adds --smoke
                flags.add("smoke")
            elif fn == "add_argument":
                flags |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and
                          isinstance(a.value, str) and a.value.startswith("--")}
        elif isinstance(node, ast.Compare):  # "--quick" in sys.argv; a in ("--hardest", "--easiest")
            consts = [node.left] if any(ast.unparse(c) == "sys.argv" for c in node.comparators) else \
                [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts]
            flags |= {c.value[2:] for c in consts if isinstance(c, ast.Constant) and str(c.value).startswith("--")}
    return frozenset(flags)


@cache
def make_targets() -> frozenset:
    """The Makefile's targets as make reads them (its database; no recipe runs)."""
    db = subprocess.run(["make", "-pRrq", "-f", "Makefile"], cwd=ROOT, capture_output=True, text=True).stdout
    targets, not_target = set(), False
    for line in db.split("\n"):
        m = re.match(r"^([A-Za-z0-9][^$#/\t=:]*):(?!=)", line)
        if m and not not_target:
            targets.update(m.group(1).split())
        not_target = line.startswith("# Not a target")
    return frozenset(targets)


@cache
def repo_file_names() -> frozenset:
    skip = {".git", "out", "data", "__pycache__", ".pytest_cache"}
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith("data")]
        names.update(files)
    return frozenset(names)


def path_problem(token: str) -> str | None:
    """Why a path token names no repository file, or None (it exists, or is no repository path)."""
    token = token.rstrip(".,:;")
    if not token or token.startswith(("-", "/", "~", "$", "..", "http")) or re.search(r"[<>{}*]|NN", token) \
            or token in PROJECT_NAMES:
        return None
    if "/" in token:
        first = token.split("/")[0]
        has_ext = re.search(r"\.\w+$", token.rstrip("/"))
        if first in OUTPUT_ROOTS or not (has_ext or first in REPO_DIRS):
            return None
        return None if (ROOT / token.rstrip("/")).exists() else f"{token}: no such file in the repository"
    ext = token.rsplit(".", 1)[-1] if "." in token else ""
    if ext in BARE_EXTS and re.fullmatch(r"[\w.-]+", token) and token not in repo_file_names():
        return f"{token}: no file of that name in the repository"
    return None


def headings(doc: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in doc.read_text().split("\n"):
        if m := re.match(r"^#+\s+(.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def link_problem(doc: Path, target: str) -> str | None:
    if re.match(r"^[a-z]+:", target):  # https:, mailto:
        return None
    file, _, anchor = target.partition("#")
    dest = (doc.parent / file).resolve() if file else doc
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in headings(dest):
        return f"{target}: {dest.name} has no heading #{anchor}"
    return None


@cache
def registries() -> dict[str, list[str]]:
    """Every registry of the library (a module-level Registry) and the metric registry."""
    found = {"metrics.TEXT_METRICS": list(metrics.TEXT_METRICS)}
    for path in sorted((ROOT / "prebias").glob("*.py")):
        module = importlib.import_module(f"prebias.{path.stem}")
        source = path.read_text()
        for name, obj in vars(module).items():  # defined here (NAME = Registry(...)), not imported
            if isinstance(obj, Registry) and (module.__name__, name) not in INTERNAL_REGISTRIES \
                    and re.search(rf"^{name}\s*=\s*Registry\(", source, re.M):
                found[f"{module.__name__}.{name}"] = list(obj)
    return found


@cache
def table_first_cells() -> frozenset:
    """The code-span names in the first column of every table row of docs/."""
    names = set()
    for doc in DOCS[1:]:
        for line in doc.read_text().split("\n"):
            if line.startswith("|") and not re.match(r"^\|[\s:|-]+$", line):
                names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return frozenset(names)


# --- the checks -----------------------------------------------------------------

def doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_commands_and_flags_exist(doc):
    bad = []
    for n, command, flags in commands(doc):
        if not (ROOT / command).is_file():
            bad.append(f"{doc_id(doc)}:{n}: {command}: no such command")
            continue
        bad += [f"{doc_id(doc)}:{n}: {command} --{f}: {command} takes no --{f}"
                for f in flags if f not in accepted_flags(command)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_make_targets_exist(doc):
    bad = []
    for n, text, kind, _ in snippets(doc):
        for m in re.finditer(r"(?:^|[\s;&|(])make\s+([^;&|]*)", text if kind != "link" else ""):
            for target in m.group(1).split():
                if not re.fullmatch(r"[A-Za-z][\w.-]*", target):  # VAR=value, a placeholder: the targets end
                    break
                if target not in make_targets():
                    bad.append(f"{doc_id(doc)}:{n}: make {target}: the Makefile has no target {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_paths_exist(doc):
    bad = []
    for n, text, kind, before in snippets(doc):
        if kind == "link":
            problem = link_problem(doc, text)
            bad += [f"{doc_id(doc)}:{n}: {problem}"] if problem else []
        elif not before.rstrip().endswith(OTHER_PROJECTS):
            for token in re.split(r"[\s`'\"(),;=|\[\]]+", text):
                problem = path_problem(token)
                bad += [f"{doc_id(doc)}:{n}: {problem}"] if problem else []
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("registry", sorted(registries()))
def test_every_registered_variant_is_in_a_docs_table(registry):
    missing = [name for name in registries()[registry] if name not in table_first_cells()]
    assert not missing, f"{registry}: {missing} in no table of docs/ (first column, as `name`)"


def test_the_checks_see_the_docs():
    """The scanners find what the docs hold (a scanner that finds nothing passes everything)."""
    found = {c for doc in DOCS for _, c, _ in commands(doc)}
    assert {"train.py", "tinystories.py", "experiment.py", "bench/validity.py", "export.py"} <= found
    assert {"schedule_spec", "out_dir"} <= accepted_flags("train.py")
    assert {"vocab_size", "noise"} <= accepted_flags("tinystories.py")
    assert {"demo", "test", "test-fast", "experiment", "validity", "run", "runq"} <= make_targets()
    assert {"prebias.schedule.STRATEGIES", "prebias.selection.SCORES", "prebias.stats.TESTS", "metrics.TEXT_METRICS",
            "prebias.attribution.ESTIMATORS", "prebias.launchers.LAUNCHERS"} <= set(registries())
    assert path_problem("prebias/nothing.py") and path_problem("out/anything.py") is None
