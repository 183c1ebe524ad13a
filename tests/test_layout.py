"""The package's shape, checked: no import cycles, no upward imports (grimp builds the import graph, lazy
imports inside functions included, TYPE_CHECKING-only imports excluded), and modules of a readable size."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Top to bottom: a module may import from its own layer or below, never above.
LAYERS = [
    {"winclip.__main__", "winclip.cli"},
    {"winclip.service", "winclip.distributed"},
    {"winclip.hosting", "winclip.requests"},
    {"winclip.inspection", "winclip.evaluation", "winclip.prompt_experiments", "winclip.precision_check"},
    {"winclip.rows", "winclip.report"},
    {"winclip.methods"},
    {"winclip.inputs"},
    {"winclip.detector", "winclip.features"},
    {"winclip.loading", "winclip.backbone"},
    {"winclip.kernels"},
    {"winclip.association", "winclip.config", "winclip.datasets", "winclip.hardware", "winclip.images",
     "winclip.lru", "winclip.metrics", "winclip.musc", "winclip.prompting", "winclip.runtime", "winclip.settings",
     "winclip.synthetic", "winclip.visualize", "winclip.windows"},
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


@pytest.fixture(scope="module")
def graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("winclip", exclude_type_checking_imports=True, cache_dir=None)


def edges(graph):
    for importer in graph.modules:
        if importer == "winclip":  # the package's __init__ re-exports the public API
            continue
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported != "winclip":
                yield importer, imported


def test_no_upward_imports(graph):
    upward = [f"{a} imports {b}" for a, b in edges(graph) if layer_of(b) < layer_of(a)]
    assert not upward, upward


def test_no_import_cycles(graph):
    following = {m: set() for m in graph.modules}
    for a, b in edges(graph):
        following[a].add(b)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in following[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            packages = {m for m in component if any(o.startswith(m + ".") for o in component)}
            if len(component - packages) > 1:  # a package importing its own submodules is no cycle
                cycles.append(sorted(component))

    for module in sorted(following):
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_module_sizes():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / "winclip").rglob("*.py")}
    assert sizes["winclip/backbone.py"] <= 300
    assert not {name: n for name, n in sizes.items() if n > 400}
