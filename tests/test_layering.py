"""The packages of ``ldm`` import downward only (docs/architecture.md, "Layers"), with no cycle, lazy
imports inside functions included: a test that fails when an import goes the wrong way."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own package and anything on a lower line, nothing else
LAYERS = [
    ["errors", "atomic"],
    ["jsonl", "cli", "checkpoints"],
    ["diffusion"],
    ["models"],
    ["formats", "data"],
    ["pipeline"],
    ["training", "evaluation"],
    ["convert"],
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}
# what torch-only packages may not import at all (the math and the networks know no framework)
FRAMEWORKS = {
    "diffusion": ("pytorch_lightning", "lightning", "hydra", "omegaconf", "webdataset"),
    "models": ("pytorch_lightning", "lightning", "hydra", "omegaconf", "webdataset"),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "ldm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def component(module: str) -> str | None:
    """``ldm.data.folder`` -> ``data``; ``ldm`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ldm" else None


def test_every_package_has_a_layer():
    assert {component(m) for m in modules()} - {None} <= set(LEVEL)


def test_imports_go_downward_only():
    wrong = []
    known = modules()
    for module, path in known.items():
        own = component(module)
        if own is None:
            continue
        for name in imports(path):
            other = component(name)
            if other is None or other == own or name not in known:
                continue
            if LEVEL[other] >= LEVEL[own]:
                wrong.append(f"{module} imports {name} ({own} is not above {other})")
    assert wrong == []


def test_the_math_and_the_networks_import_no_framework_and_no_file_code():
    # torch only (DESIGN: "diffusion and models depend on torch only"): no framework, and nothing of
    # ours beyond the maths for the networks (files, layouts and checkpoints are ldm.formats' business)
    wrong = []
    for module, path in modules().items():
        own = component(module) or ""
        banned = FRAMEWORKS.get(own, ())
        wrong += [f"{module} imports {name}" for name in imports(path) if name.split(".")[0] in banned]
        if own in ("diffusion", "models"):
            allowed = {"diffusion"} if own == "diffusion" else {"diffusion", "models"}
            wrong += [f"{module} imports {name}" for name in imports(path) if component(name) not in (None, *allowed)]
    assert wrong == []


def test_no_import_cycle_between_modules():
    known = modules()
    graph = {m: {n for n in imports(p) if n in known and n != m} for m, p in known.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail + [module, target]
            if target not in state and (cycle := visit(target, trail + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]) :])
