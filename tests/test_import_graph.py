"""The import graph of hf_adamp: no cycle among module-level imports, and no function-level import of an hf_adamp
module (a deferred import that dodges a cycle hides it) beyond a short list with reasons.

The graph is read from the source with ``ast``: an edge for every ``import`` / ``from ... import`` that resolves
inside hf_adamp (relative imports resolved), to the module named, or to the submodule when the imported name is
one; importing ``a.b.c`` from outside package ``a.b`` also runs ``a/b/__init__.py``, an edge too. The root
package ``hf_adamp`` is left out: every import of a submodule starts from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "hf_adamp"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# (importing module, imported module): why the import is inside a function
ALLOWED_DEFERRED = {
    ("hf_adamp", "hf_adamp.telemetry"): "telemetry subclasses transformers' TrainerCallback: loaded on first use",
    ("hf_adamp.integrations.launch_hooks", "hf_adamp.telemetry"): "the same, when a Trainer asks for it",
    ("hf_adamp.selfcheck", "hf_adamp.telemetry"): "the same, when the self-check runs",
    ("hf_adamp.optim.backends.triton", "hf_adamp.kernels.triton_step"): "imports triton: only for a Triton step",
    ("hf_adamp.optim.backends.triton", "hf_adamp.kernels"): "the package of triton_step (loaded already)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The hf_adamp modules an import statement loads (without the root package)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        if node.level:
            base = here.split(".") if is_package else here.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names.add(source)
        for alias in node.names:  # `from pkg import submodule`
            if f"{source}.{alias.name}" in modules:
                names.add(f"{source}.{alias.name}")
    found = set()
    for name in names:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        while name not in modules and "." in name:  # `import a.b.c` where c is an attribute
            name = name.rsplit(".", 1)[0]
        parts = name.split(".")
        for k in range(2, len(parts) + 1):  # the packages on the way, where `here` is outside them
            prefix = ".".join(parts[:k])
            if prefix in modules and not (here == prefix or here.startswith(prefix + ".")):
                found.add(prefix)
    return found


def _import_statements(node: ast.AST, in_function: bool = False):
    """(statement, whether it is inside a function) for every executed import below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        elif not (isinstance(child, ast.If) and _is_type_checking(child.test)):  # typing-only imports never run
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _import_statements(child, inner)


def import_graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """Module-level edges per module, and the (module, target) pairs of function-level imports."""
    modules = all_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    deferred: set[tuple[str, str]] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _import_statements(tree):
            targets = _targets(node, name, path.name == "__init__.py", modules) - {name}
            if in_function:
                deferred.update((name, t) for t in targets)
            else:
                edges[name].update(targets)
    return edges, deferred


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    edges, _ = import_graph()
    assert "hf_adamp.optim._engine" in edges["hf_adamp.optim.adamp"]
    assert "hf_adamp._tensors" in edges["hf_adamp.kernels"]
    assert edges["hf_adamp._tensors"] == set() and edges["hf_adamp.sharding.detect"] == set()  # the leaves
    assert "hf_adamp.optim.backends" in edges["hf_adamp.optim._engine"]


def test_no_import_cycle():
    edges, _ = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_level_imports_of_hf_adamp_modules_beyond_the_allowed():
    _, deferred = import_graph()
    unexpected = sorted(deferred - ALLOWED_DEFERRED.keys())
    assert not unexpected, f"function-level imports of hf_adamp modules (move them to the top): {unexpected}"


def test_backends_never_import_the_engine():
    edges, _ = import_graph()
    backends = [name for name in edges if name.startswith("hf_adamp.optim.backends")]
    assert len(backends) >= 5
    for name in backends:
        assert "hf_adamp.optim._engine" not in edges[name], name


def test_no_cycle_through_function_level_imports_either():
    """A deferred import only postpones a cycle: the graph with them has none either."""
    edges, deferred = import_graph()
    for name, target in deferred:
        edges[name].add(target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)
