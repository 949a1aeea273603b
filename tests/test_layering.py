"""The package follows the data flow: each layer imports only the layers below it, and no module imports itself
back through others (read from the source's imports, those inside functions and TYPE_CHECKING blocks too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "frankenmoe"

LAYERS = (
    "frankenmoe",  # the package root: __version__ and lazy names only
    "errors",
    "runtime",
    "io",
    "architectures",
    "config",
    "sources",
    "decoder",
    "routers",
    "checkpoint",
    "analysis",
    "merging",
    "api",
    "cli",
    "__main__",
    "testing",
)
"""Bottom to top: a module may import from its own layer and those before it, never one after it."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every frankenmoe module `path` imports; `from package import name` counts as the submodule when it is one
    (its package's __init__ runs first, but a package re-exporting its own modules is not a cycle of the flow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "frankenmoe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "frankenmoe":
            assert node.level == 0, f"{path}: relative import"
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {node.module}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {module: imported_modules(path, set(paths)) for module, path in paths.items()}


def test_every_package_is_a_named_layer() -> None:
    assert {layer_of(module) for module in import_graph()} <= set(LAYERS)


def test_no_module_imports_a_layer_above_its_own() -> None:
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    upward = [
        f"{module} imports {imported}"
        for module, imports in sorted(import_graph().items())
        for imported in sorted(imports)
        if rank[layer_of(imported)] > rank[layer_of(module)]
    ]
    assert upward == []


def test_the_library_never_imports_the_testing_package() -> None:
    users = [
        module
        for module, imports in import_graph().items()
        if layer_of(module) != "testing" and any(layer_of(imported) == "testing" for imported in imports)
    ]
    assert users == []


def test_there_is_no_import_cycle() -> None:
    graph = import_graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in graph:
                continue
            if state.get(imported) == 1:
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    source = tmp_path / "frankenmoe" / "io" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "def f():\n    from frankenmoe.merging.plan import MergePlan\n    from frankenmoe.io import bad\n"
    )
    imports = imported_modules(source, {"frankenmoe.io.bad", "frankenmoe.merging.plan"})
    assert imports == {"frankenmoe.merging.plan", "frankenmoe.io.bad"}
    assert LAYERS.index(layer_of("frankenmoe.merging.plan")) > LAYERS.index(layer_of("frankenmoe.io.bad"))


def test_the_merge_machinery_does_not_load_gguf_until_a_gguf_merge_needs_it() -> None:
    # gguf (with what it imports) takes a large part of a second to import, and a safetensors merge never needs it
    # (benchmarks/README.md times `import frankenmoe.merging.run`).
    code = "import sys, frankenmoe.merging.run; print('gguf' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"
