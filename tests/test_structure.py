"""The house rules of the code, checked by parsing it, from the folders:
- the commands are the .py files at the root, except the design card's shared modules
  (model, tokenizer, metrics, export), which are libraries like everything in prebias/;
- nothing imports a command (tests and benchmarks may: they drive the commands);
- the libraries import each other downward only (no cycle), and no import of a project
  module hides inside a function to dodge one;
- prebias/ stands on its own: of the root files it imports only model and metrics (the
  floor), which import nothing of prebias/ that imports them back;
- one home for what is repeated: the run folder's layout (prebias/paths.py), the default
  seed, the interval level, the repository root;
- the tests are named after what they test, not after when they were written;
- no function is longer than ~80 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"model", "tokenizer", "metrics", "export"}  # the design card's modules at the root
FLOOR = {"model", "metrics"}  # the root modules prebias/ may import: they have no command face
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {f"prebias.{p.stem}": p for p in (ROOT / "prebias").glob("*.py")}
COMMANDS = {m for m in MODULES if "." not in m} - SHARED
LIBRARY = set(MODULES) - COMMANDS


def imports(path: Path, top_only: bool) -> set[str]:
    """The project modules a file imports (`from prebias import x` counts as prebias.x)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(MODULES)


def test_the_folders_hold_what_the_design_says():
    assert "train" in COMMANDS and "experiment" in COMMANDS and "prebias.stream" in LIBRARY
    assert SHARED <= set(MODULES)
    assert not (ROOT / "prebias" / "__init__.py").read_text().strip()  # a plain package, nothing runs on import


def test_nothing_imports_a_command():
    bad = [f"{m} imports {s}" for m, p in MODULES.items() for s in imports(p, top_only=False)
           if s in COMMANDS and s != m]
    assert bad == []


def test_library_imports_form_no_cycle_and_none_hide_in_functions():
    graph = {m: imports(p, top_only=True) - {m} for m, p in MODULES.items()}
    hidden = [f"{m}: {sorted(imports(p, False) - imports(p, True) - {m})}" for m, p in MODULES.items()
              if imports(p, False) - imports(p, True) - {m}]
    assert hidden == []
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in graph:
        visit(m, [])


def reachable(start: set[str]) -> set[str]:
    """Every project module that importing the modules in start loads, directly or not."""
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(imports(MODULES[m], top_only=False))
    return seen


def test_the_library_imports_only_the_floor_from_the_root():
    bad = [f"{m} imports {s}" for m, p in MODULES.items() if m.startswith("prebias.")
           for s in imports(p, top_only=False) if "." not in s and s not in FLOOR]
    assert bad == []
    for m in FLOOR:  # what model and metrics load of prebias/ does not import them back
        assert m not in reachable(imports(MODULES[m], top_only=False) - {m}), f"{m} is imported back by its imports"


LAYOUT = {"tables", "visualize", "ckpt", "attribution", "config.json", "run.json", "history.jsonl", "train.log",
          "batch_ids.npy", "pool_ids.npy", "insertions.npz", "masked_rows.npy", "holdout_ids.npy"}


def test_the_run_folder_layout_is_built_in_one_place():
    """`<dir> / "tables"` and the like only in prebias/paths.py: everything else asks RunPaths
    (a Hugging Face folder's config.json is Hugging Face's layout, not a run's)."""
    bad = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                    and node.right.value in LAYOUT and m != "prebias.paths" \
                    and (m, node.right.value) != ("prebias.hf", "config.json"):
                bad.append(f"{p.name}:{node.lineno} / {node.right.value!r}")
    assert bad == []


def defaults(fn) -> list[tuple[ast.arg, ast.expr]]:
    """(argument, default) of every argument of a function definition that has one."""
    a = fn.args
    pos = a.posonlyargs + a.args
    return [*zip(pos[len(pos) - len(a.defaults):], a.defaults),
            *((k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)]


def test_shared_constants_and_readers_have_one_home():
    """The default seed, the interval level and the repository root are defined once, in
    prebias/common.py, and a `level=` default is that LEVEL, not a number of its own; one
    JSON reader (prebias/inputs.py), one column label (prebias/saturation.py)."""
    seeds, levels, homes = [], [], {}
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 1337:
                seeds.append(m)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                levels += [f"{m}.{node.name}" for a, d in defaults(node)
                           if a.arg == "level" and isinstance(d, ast.Constant)]
        for node in tree.body:
            names = [node.name] if isinstance(node, ast.FunctionDef) else \
                [n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]
            for name in set(names) & {"ROOT", "SEED", "LEVEL", "read_json", "label", "column_label"}:
                homes.setdefault(name, []).append(m)
    assert seeds == ["prebias.common"]
    assert levels == []
    assert homes == {"ROOT": ["prebias.common"], "SEED": ["prebias.common"], "LEVEL": ["prebias.common"],
                     "read_json": ["prebias.inputs"], "column_label": ["prebias.saturation"]}


def test_no_test_file_is_named_after_an_audit_round():
    """Tests live in tests/test_<module or command>.py, or a cross-cutting suite named for
    what it checks; a library module's tests are findable by its name."""
    assert sorted(p.name for p in (ROOT / "tests").glob("test_audit*.py")) == []


def test_no_function_is_over_80_lines():
    long_ = []
    for p in [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_ == []
