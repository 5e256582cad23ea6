"""The package's layers, written once: a module imports only modules of its own layer or lower ones
(lazy imports inside functions count too), and no import circle exists. docs/architecture.md draws the
same picture."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A name is a module or a package prefix (the longest match wins).
LAYERS: list[tuple[str, ...]] = [
    ("vaemo_dist.config", "vaemo_dist.secrets", "vaemo_dist.fsutil", "vaemo_dist.faults", "vaemo_dist.dist",
     "vaemo_dist.watchdog", "vaemo_dist.startup", "kernels"),
    ("vaemo_dist.data", "vaemo_dist.model"),
    ("vaemo_dist.checkpoints", "vaemo_dist.objectives", "vaemo_dist.text"),
    ("vaemo_dist.train", "vaemo_dist.export", "vaemo_dist.pretrained"),
    ("vaemo_dist.eval", "vaemo_dist.sweep"),
    ("vaemo_dist.stages", "vaemo_dist.launch", "vaemo_dist"),  # vaemo_dist/__init__.py: the public API
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    return found


def imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in ("vaemo_dist", "kernels")}


def graph() -> dict[str, set[str]]:
    files = [p for top in ("vaemo_dist", "kernels") for p in (ROOT / top).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports(path, name) if m in modules and m != name}
    return edges


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def test_no_module_imports_upward():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in graph().items() for b in targets
              if b != "vaemo_dist" and layer_of(b) > layer_of(a)]
    assert upward == []


def test_no_import_circles():
    edges = graph()
    # Package __init__ files re-export their own modules; an edge from a package to its own
    # submodule is not a circle of design.
    edges = {a: {b for b in bs if not b.startswith(a + ".") and a != "vaemo_dist"} for a, bs in edges.items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert circles == []
