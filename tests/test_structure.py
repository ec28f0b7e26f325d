"""The house rules of the code, checked by parsing it: stage scripts are entry points
that nothing imports, library modules import each other downward only (no cycle), and
no import hides inside a function to dodge one."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"tinystories", "train", "eval", "visualize_attn", "visualize_embd", "visualize_sat_output",
          "visualize_sat_batch", "experiment", "report", "durability", "attribute", "select_batches", "batch_viewer"}
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path: Path, top_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_no_module_imports_a_stage_script():
    bad = [f"{m} imports {s}" for m, p in MODULES.items() for s in imports(p, top_only=False)
           if s in STAGES and s != m]
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
