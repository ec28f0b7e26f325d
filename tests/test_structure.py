"""The house rules of the code, checked by parsing it, from the folders:
- the commands are the .py files at the root, except the design card's shared modules
  (model, tokenizer, metrics, export), which are libraries like everything in prebias/;
- nothing imports a command (tests and benchmarks may: they drive the commands);
- the libraries import each other downward only (no cycle), and no import of a project
  module hides inside a function to dodge one;
- prebias/ stands on its own: of the root files it imports only model and metrics (the
  floor), which import nothing of prebias/ that imports them back;
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


def test_no_function_is_over_80_lines():
    long_ = []
    for p in [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_ == []
