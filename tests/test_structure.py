"""The structure of docs/architecture.md, enforced. Every import of one
project module by another, at module level or inside a function, points
down the layers below, and no set of modules imports itself in a loop.

A function-level import is counted like any other, so deferring an import
cannot hide a dependency that points up."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vmoe_torch"

# Lowest first. A package may import only packages of a lower rank; packages
# of the same rank do not know each other.
LAYERS: dict[str, int] = {
    "utils": 0,         # atomic writes, seeds, state-dict comparison
    "config": 1,        # typed settings: routing, model, catalogue, experiment files
    "layers": 2,        # ViT building blocks, no MoE knowledge
    "moe": 3,           # routing, dispatch, experts, the MoE layer
    "storage": 4,       # our own files: from_pretrained dirs, work dirs, sharded checkpoint files
    "models": 5,        # the model, built from config, saved/loaded through storage
    "distributed": 6,   # parallel modes over a model
    "convert": 7,       # foreign formats (the reference's checkpoints and configs)
    "data": 7,          # datasets and the input pipeline
    "export": 7,        # torch.export / ONNX programs
    "upcycling": 8,     # dense ViTs of other libraries -> V-MoE
    "evaluate": 8,      # classification, few-shot, routing grids
    "analysis": 9,      # routing statistics, plots, the report
    "train": 9,         # the training loop
    "integrations": 9,  # timm
    "serve": 9,         # the HTTP inference server
    "demo": 10,         # the bundled end-to-end job
    "cli": 11,          # argument parsing only
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in `path`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in MODULES:
                found.append((candidate, node.lineno))
                break
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES} - {""}
    assert packages == set(LAYERS), (
        f"packages without a layer: {sorted(packages - set(LAYERS))}; "
        f"layers without a package: {sorted(set(LAYERS) - packages)}")


def test_imports_point_down_the_layers():
    bad = []
    for name, path in MODULES.items():
        src = _package(name)
        for target, line in _imports(name, path):
            dst = _package(target)
            if not src or dst == src:
                continue
            if dst == "" or LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({src}, layer {LAYERS[src]}) imports {target} "
                           f"({dst or 'the package root'}, layer {LAYERS.get(dst, '-')})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_loop_between_modules():
    graph = {name: {t for t, _ in _imports(name, path) if t != name} for name, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not loops, f"modules that import each other in a loop: {loops}"


def test_the_checker_reads_imports_inside_functions(tmp_path):
    """A deferred import is found like a module-level one (else a loop could
    hide behind it)."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..storage import pretrained\n    from . import vit_moe\n")
    assert [t for t, _ in _imports("vmoe_torch.models.fake", fake)] == [
        "vmoe_torch.storage.pretrained", "vmoe_torch.models.vit_moe"]


def test_functions_and_files_stay_small():
    """STYLE: files of one job (under ~500 lines), functions under 80 lines."""
    long_functions, long_files = [], []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 500:
            long_files.append(f"{path.relative_to(SRC)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long_functions, "split these functions: " + ", ".join(long_functions)
    assert not long_files, "split these files: " + ", ".join(long_files)
