"""The house's layout: imports flow one way (entry points -> the package's stages -> components -> utilities), with
no cycle anywhere, lazy imports inside functions included (a cycle means no module can be read or tested alone)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("process_data", "train", "sampler", "quickstart")


def project_modules() -> dict[str, Path]:
    modules = {name: ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for path in sorted((ROOT / "minitrain").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (`from a import b` counts a.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module, as one cycle through it (Tarjan, then a walk)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # one concrete cycle through the group's first module, for the message
        path, members = [group[0]], set(group)
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = [w for w in nxt if w == group[0]]
            if back and len(path) > 1:
                break
            step = next((w for w in nxt if w not in path), None)
            if step is None:
                break
            path.append(step)
        found.append(path + [group[0]])
    return found


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_flow_from_entry_points_to_the_package():
    """No library module imports an entry point (sampler.py, the design card's top-level multipack sampler, is a
    component that validation uses), and stage 1 and stage 2 do not import each other."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("minitrain"):
            assert not targets & {"process_data", "train", "quickstart"}, f"{name} imports an entry point"
        if name.startswith("minitrain.prepare"):
            assert not any(t.startswith("minitrain.training") for t in targets), f"{name} (stage 1) imports stage 2"
        if name.startswith("minitrain.training"):
            assert not any(t.startswith("minitrain.prepare") for t in targets), f"{name} (stage 2) imports stage 1"
