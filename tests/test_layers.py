"""Each layer imports only from the layers below it (DESIGN.md)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lowbit"
ORDER = ["formats", "core", "methods", "nn", "optim", "pipeline", "io", "eval", "analysis", "kernels", "cli"]
ALLOWED = {
    "formats": set(),
    "core": {"formats", "kernels"},
    "kernels": {"formats"},
    "io": {"formats", "core", "kernels"},
}


def imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            mod = (node.module or "").split(".")[0]
            if node.level == 2 and mod:
                found.add(mod)
            if node.level == 2 and not mod:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowbit."):
            found.add(node.module.split(".")[1])
    return found


def test_layers_import_downward_only():
    for layer, allowed in ALLOWED.items():
        folder = PKG / layer
        if not folder.exists():
            continue
        for f in folder.rglob("*.py"):
            bad = imported_layers(f) - allowed - {layer}
            assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}; {layer} may import only {sorted(allowed)}"
