"""Each layer imports only from the layers below it, and no module imports itself back through
others (DESIGN.md). Function-level imports count: ast.walk sees every import statement."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lowbit"
LEVEL = {"formats": 0, "core": 1, "methods": 2, "nn": 3, "optim": 3, "pipeline": 4, "qat": 5, "io": 5, "eval": 5,
         "analysis": 6, "cli": 7}
# kernels are optional fast paths that core dispatches to; they see formats only
ALLOWED = {layer: {o for o, lv in LEVEL.items() if lv < level} | {"kernels"} for layer, level in LEVEL.items()}
ALLOWED["kernels"] = {"formats"}
for allowed in ALLOWED.values():
    allowed.add("version")  # lowbit/version.py: one constant, no imports


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in PKG.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The lowbit modules `path` imports anywhere in its body (`from . import x` names module x when x is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lowbit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "lowbit":
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {target}
    return {m for m in found if m in MODULES}


def imported_layers(path: Path) -> set[str]:
    return {m.split(".")[1] for m in imported_modules(path) if m.count(".") >= 1}


def test_layers_import_downward_only():
    for layer, allowed in ALLOWED.items():
        folder = PKG / layer
        assert folder.is_dir(), f"lowbit/{layer}/ is a layer of DESIGN.md; make it a package"
        for f in folder.rglob("*.py"):
            bad = imported_layers(f) - allowed - {layer}
            assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}; {layer} may import only {sorted(allowed)}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {m: imported_modules(f) - {m} for m, f in MODULES.items()}
    assert import_cycles(graph) == []


def test_cli_subcommands_import_neither_each_other_nor_the_package():
    commands = {"lowbit.cli.formats", "lowbit.cli.quantize", "lowbit.cli.eval", "lowbit.cli.compare",
                "lowbit.cli.memory", "lowbit.cli.report"}
    for m in commands:
        bad = imported_modules(MODULES[m]) & (commands | {"lowbit", "lowbit.cli"})
        assert not bad, f"{m} imports {sorted(bad)}: share code through lowbit.cli.common"
