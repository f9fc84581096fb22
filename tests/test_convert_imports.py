"""convert/ has no import cycle (export.py and imports.py once imported each other): every
`megatron_emu.convert.*` import that runs, at module level or inside a function."""

import ast
from pathlib import Path

import megatron_emu.convert

PACKAGE = Path(megatron_emu.convert.__file__).parent


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only: never imported)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from runtime_nodes(child)


def convert_imports(file: Path) -> set[str]:
    found = set()
    for node in runtime_nodes(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_emu.convert"):
            names = [node.module] if node.module != "megatron_emu.convert" else [f"{node.module}.{a.name}" for a in node.names]
            found.update(n.rsplit(".", 1)[-1] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.rsplit(".", 1)[-1] for a in node.names if a.name.startswith("megatron_emu.convert."))
    return found - {file.stem}


def test_convert_has_no_import_cycle():
    graph = {f.stem: convert_imports(f) for f in PACKAGE.glob("*.py") if f.stem != "__init__"}
    assert graph["export"] and graph["imports"]  # the walk sees imports at all
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
