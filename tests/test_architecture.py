"""The package's layering, checked on the source: no import cycles, and each layer imports only layers below it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kbricks"

# lower numbers are lower layers; a package may import its own modules and any lower layer, never a higher one
LAYERS = {
    "errors": 0, "_version": 0,
    "registry": 1,
    "config": 2, "core": 2,
    "data": 3,
    "models": 4,
    "methods": 5,
    "continual": 6,
    "engine": 7,
    "studies": 8,
    "cli": 9, "api": 9, "__init__": 10, "__main__": 11,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, top_level_only: bool):
    """kbricks modules imported by ``path`` (resolved to the longest existing module name)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # top-level statements, including those inside top-level if/try blocks
        nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes += [n for stmt in tree.body if isinstance(stmt, ast.ClassDef) for n in stmt.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import x`: the module pkg.x when it is one, else the attribute x of module pkg
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        for n in names:
            if n == "kbricks" or n.startswith("kbricks."):
                out.add(resolve(n))
    out.discard(me)
    return out


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def layer_of(mod: str) -> tuple:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return top, LAYERS[top]


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_module_is_in_a_layer():
    assert {layer_of(m)[0] for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "every-import"])
def test_no_import_cycle(top_level_only):
    """No cycle at any level: a lazy import inside a function body is still a dependency, and a cycle hidden behind
    one is still two modules that cannot be understood (or tested) apart."""
    graph = {m: imports_of(p, top_level_only=top_level_only) for m, p in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_knows_no_method():
    """Methods plug into the engine through Method hooks and registries; the engine never names one."""
    offenders = [f"{m} imports {t}" for m, p in MODULES.items() if m.startswith("kbricks.engine")
                 for t in imports_of(p, top_level_only=False)
                 if t.startswith("kbricks.methods.") and t not in ("kbricks.methods.base",)]
    assert not offenders, offenders


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_layers_import_downwards(mod):
    """Function-level imports count too: a lazy import is still a dependency."""
    top, level = layer_of(mod)
    for target in imports_of(MODULES[mod], top_level_only=False):
        t_top, t_level = layer_of(target)
        assert t_top == top or t_level < level, f"{mod} (layer {top}) imports {target} (layer {t_top})"


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
