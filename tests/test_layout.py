"""The package's layout rules: no import cycle, no oversized module, the op boundary."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fp_compile"
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
    """fp_compile modules imported anywhere in the file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import mod" imports mod; "from mod import func" imports mod
            subs = [f"{target}.{a.name}" for a in node.names]
            names = [n for n in subs if n in modules] or [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("fp_compile"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in _imports(path, name, files):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
                # importing a submodule runs its packages' __init__ first
                parent = target.rpartition(".")[0]
                while parent.startswith("fp_compile") and parent != name:
                    if not name.startswith(parent + ".") and parent in files:
                        deps.add(parent)
                    parent = parent.rpartition(".")[0]
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert "fp_compile.dispatch" in graph["fp_compile.ops"]   # the checker sees imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_checker_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_library_does_not_import_the_demo_package():
    graph = _graph()
    users = sorted(name for name, deps in graph.items()
                   if any(d.startswith("fp_compile.demo") for d in deps)
                   and not name.startswith("fp_compile.demo") and name != "fp_compile.cli")
    assert not users, users
