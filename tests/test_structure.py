"""The package's import structure, read from the source (ast): the extension loader sits below the
op modules and knows nothing of the audit, and no modules import one another in a circle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tubevit_fast")


def imported_modules(path: str) -> set[str]:
    """Every tubevit_fast module `path` imports, at the top or inside a function; `from X import
    name` counts as importing X.name when that is a module of the package, else X."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _module_path(candidate) else node.module)
    return {m for m in found if m == "tubevit_fast" or m.startswith("tubevit_fast.")}


def _module_path(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "tubevit_fast":
        return None
    base = os.path.join(ROOT, *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


def package_modules() -> dict[str, str]:
    """name -> path of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if not file.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
            modules[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, file)
    return modules


def test_the_extension_loader_imports_no_op_and_nothing_of_the_audit():
    imports = imported_modules(os.path.join(PACKAGE, "extension.py"))
    assert imports, "the ast reading found no tubevit_fast import at all"
    bad = sorted(m for m in imports if m.startswith(("tubevit_fast.ops", "tubevit_fast.audit")))
    assert bad == [], f"tubevit_fast/extension.py imports {bad}"


def test_the_attention_layout_is_below_everything():
    assert imported_modules(os.path.join(PACKAGE, "attention_layout.py")) == set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycles_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_modules_import_one_another_in_a_circle():
    """Over every import, lazy ones included. A package's __init__ re-exports its modules (it is
    the top, not a layer): imports of a package count as imports of nothing."""
    modules = package_modules()
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name
                    and not modules[m].endswith("__init__.py")}
             for name, path in modules.items()}
    for ring in (("tubevit_fast.backends", "tubevit_fast.extension"),
                 ("tubevit_fast.extension", "tubevit_fast.ops.attention")):
        assert all(name in graph for name in ring)
    assert _cycles(graph) == []


# The library: what a user imports to build and run a model. The training application
# (tubevit_fast.app, and the command lines above it) sits on top and is never imported from here.
LIBRARY = ("tubevit_fast.model", "tubevit_fast.modules", "tubevit_fast.reference", "tubevit_fast.ops",
           "tubevit_fast.kernels", "tubevit_fast.torch_backend", "tubevit_fast.backends", "tubevit_fast.geometry",
           "tubevit_fast.posembed", "tubevit_fast.convert", "tubevit_fast.extension", "tubevit_fast.audit",
           "tubevit_fast.pixels", "tubevit_fast.packing", "tubevit_fast.amp", "tubevit_fast.numerics",
           "tubevit_fast.attention_layout")


def test_the_library_never_imports_the_application():
    modules = package_modules()
    graph = {name: imported_modules(path) for name, path in modules.items()}
    library = [name for name in modules if name == "tubevit_fast" or name.startswith(LIBRARY)]
    assert "tubevit_fast.modules" in library and "tubevit_fast.ops.tube_embed" in library
    for start in library:
        seen, todo = set(), [start]
        while todo:  # everything `start` imports, directly or through other modules
            for name in graph.get(todo.pop(), ()):
                if name not in seen:
                    seen.add(name)
                    todo.append(name)
        app = sorted(m for m in seen if m.startswith("tubevit_fast.app"))
        assert app == [], f"{start} imports the application: {app}"
