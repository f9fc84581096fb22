"""The import graph of megatron_emu, every import (also those inside functions) read from the
source: no cycles, and no module imports from a layer above its own. TYPE_CHECKING-only
imports are not runtime imports and are left out.

Layers, lowest first: the plain foundations (config, files, the direct-I/O readers, memo) ->
model -> data -> parallel -> training -> the users of trained models (convert, generation,
evaluation) -> decoder (Stable Diffusion on a frozen Emu) -> arguments (the command line,
which may read a checkpoint's recorded config)."""

import ast
import os
from collections import defaultdict

import megatron_emu

PACKAGE = os.path.dirname(megatron_emu.__file__)
LAYER = {"config": 0, "model_config": 0, "files": 0, "optional": 0, "logging_args": 0, "cli": 0, "direct_io": 0,
         "range_check": 0, "memo": 0, "kernels": 1, "model": 1, "data": 2, "parallel": 3, "training": 4, "convert": 5,
         "generation": 5, "evaluation": 5, "decoder": 6, "arguments": 7}


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = "megatron_emu." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def runtime_imports(path: str, known: dict) -> set[str]:
    tree = ast.parse(open(path).read())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {n for n in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if n in known}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: runtime_imports(p, known) - {m, "megatron_emu"} for m, p in known.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER or module == "megatron_emu", f"{module}: no layer assigned (add it to LAYER)"
    return LAYER.get(top, 0)


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "megatron_emu.model.emu" in edges["megatron_emu.training.build"]
    assert "megatron_emu.training.checkpoint_files" in edges["megatron_emu.generation.loading"]  # inside load_emu
    assert "megatron_emu.direct_io" not in edges["megatron_emu.range_check"]  # TYPE_CHECKING only


def test_no_import_reaches_a_higher_layer():
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps if layer(b) > layer(a))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges, cycles = graph(), []
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state[nxt] == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
