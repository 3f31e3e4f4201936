"""Each layer imports only from the layers below it (DESIGN.md)."""
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
