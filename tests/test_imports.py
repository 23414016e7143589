"""The package's imports point one way: cli/train -> models -> nn -> ops -> (triton | reference),
with the shared maths in a leaf. Read from the source with `ast`, lazy imports included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unet_fast"

# The layer of each module (by dotted-name prefix, longest first): a module may import its own
# layer and the layers below it, never one above. Leaves import nothing of the package.
LAYERS = {
    "unet_fast._C": 0,
    "unet_fast._common": 0,
    "unet_fast.reference": 0,
    "unet_fast._backend": 1,
    "unet_fast.triton": 2,
    "unet_fast.ops": 3,
    "unet_fast.nn": 4,
    "unet_fast.fuse": 4,
    "unet_fast.models": 5,
    "unet_fast.train": 6,
    "unet_fast.bench": 7,
    "unet_fast.cli": 7,
    "unet_fast.__main__": 7,
    "unet_fast.train.__main__": 7,  # `python -m unet_fast.train`: an entry point, like cli
    "unet_fast": 7,  # the package's __init__: the public names, gathered from every layer
}
LEAVES = ("unet_fast._common", "unet_fast.reference")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    owner = max(
        (name for name in LAYERS if module == name or module.startswith(name + ".")), key=len
    )
    return LAYERS[owner]


def imports(module: str) -> set:
    """The package's modules that `module` imports anywhere in its source (a name imported from a
    package counts as its submodule when one exists, else as the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "unet_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == "unet_fast":
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES or sub == "unet_fast._C" else base)
    return found - {module}


GRAPH = {module: imports(module) for module in MODULES}


def test_the_graph_is_read():
    assert "unet_fast.ops.recompute" in GRAPH["unet_fast.nn.conv_bn_relu"]
    assert "unet_fast._backend" in GRAPH["unet_fast.ops.crop_concat"]


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_of_the_package(leaf):
    assert GRAPH[leaf] == set(), f"{leaf} imports {sorted(GRAPH[leaf])}"


def test_imports_point_down_the_layers():
    upward = [
        f"{m} ({layer(m)}) imports {i} ({layer(i)})"
        for m, targets in GRAPH.items()
        for i in sorted(targets)
        if layer(i) > layer(m)
    ]
    assert upward == []


def test_no_import_cycles():
    """Depth-first search over the whole graph; a back edge is a cycle."""
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []
