"""The architecture, enforced: who may import whom inside rm_scale/ (lazy and TYPE_CHECKING imports count too), no
import circles, collectives / the Accelerator / DeepSpeed each in their one room, functions that fit on a screen, and
a README layout section that matches the tree. Pure AST over the sources: fast, no imports of the package."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rm_scale"
LEAVES = {"rm_scale.distributed", "rm_scale.loss", "rm_scale.dsconfig"}
FACADE = {"rm_scale", "rm_scale.__main__", "rm_scale.stream"}  # the public entry points: may use anything
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    lazy: bool  # inside a function (not at module level)
    names: tuple[str, ...]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _target(module: str, name: str | None) -> str:
    """``from module import name``: the submodule when ``name`` is one, else the module."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _imports(name: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text())
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rm_scale":
                    edges.append(Edge(name, alias.name, node.lineno, id(node) in lazy_nodes, ()))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] != "rm_scale":
                continue
            for alias in node.names:
                edges.append(Edge(name, _target(module, alias.name), node.lineno, id(node) in lazy_nodes,
                                  (alias.name,)))
    return edges


EDGES = [e for name, path in MODULES.items() for e in _imports(name, path)]


def _layer(module: str) -> str:
    if module in FACADE:
        return "facade"
    if module in LEAVES or module == "rm_scale.config":
        return module.split(".")[1]
    return module.split(".")[1]  # data, model, scoring, train, commands


def _allowed(src: str, dst: str) -> bool:
    layer, target = _layer(src), _layer(dst)
    if layer == "facade":
        return True
    if src in LEAVES:
        return False
    if layer in ("data", "model"):
        return target == layer
    if layer == "config":
        return dst in ("rm_scale.data.batching", "rm_scale.distributed")
    if layer == "train":
        if target == "train":  # only the trainer imports its siblings; no sibling imports the trainer
            return src == "rm_scale.train.trainer" and dst != src
        return target in ("distributed", "loss", "dsconfig", "config", "data", "model")
    if layer == "scoring":  # using a trained model: no training, no ranks
        return target in ("scoring", "data", "model")
    if layer == "commands":
        return target != "facade"
    raise AssertionError(f"{src}: no layer")


def test_every_import_follows_the_layers():
    wrong = [f"{e.src}:{e.line} imports {e.dst}" for e in EDGES if not _allowed(e.src, e.dst)]
    assert not wrong, "imports against the layering (see tests/test_layering.py):\n" + "\n".join(wrong)


def test_the_trainer_imports_only_public_names_of_its_siblings():
    private = [f"{e.line}: {e.dst}.{n}" for e in EDGES if e.src == "rm_scale.train.trainer"
               and e.dst.startswith("rm_scale.train.") for n in e.names if n.startswith("_")]
    assert not private


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        graph.setdefault(e.src, set()).add(e.dst)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lazy_imports_of_the_package_say_why():
    silent = []
    for e in EDGES:
        if not e.lazy:
            continue
        lines = MODULES[e.src].read_text().splitlines()
        here, above = lines[e.line - 1], lines[e.line - 2].strip() if e.line > 1 else ""
        if "#" not in here and not above.startswith("#"):
            silent.append(f"{e.src}:{e.line}")
    assert not silent, "function-level imports of rm_scale modules need a one-line '# why' comment: " + ", ".join(silent)


def _ast_uses(path: Path) -> dict[str, list[int]]:
    """Lines where a module names torch.distributed, .accelerator, deepspeed or accelerate, or imports bench."""
    uses: dict[str, list[int]] = {"torch.distributed": [], ".accelerator": [], "deepspeed": [], "accelerate": [],
                                  "bench": [], "torch.load / pickle": []}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            if node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                uses["torch.distributed"].append(node.lineno)
            if node.attr == "accelerator":
                uses[".accelerator"].append(node.lineno)
            if node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                uses["torch.load / pickle"].append(node.lineno)
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for full in names:
            top = full.split(".")[0]
            if full.startswith("torch.distributed"):
                uses["torch.distributed"].append(node.lineno)
            if top in ("deepspeed", "accelerate", "bench"):
                uses[top].append(node.lineno)
            if top in ("pickle", "dill", "cloudpickle"):
                uses["torch.load / pickle"].append(node.lineno)
    return uses


def test_collectives_accelerator_and_deepspeed_stay_in_their_rooms():
    rooms = {
        "torch.distributed": {"rm_scale.distributed"},
        ".accelerator": {"rm_scale.train.trainer"},
        "accelerate": {"rm_scale.train.trainer"},
        "deepspeed": {"rm_scale.model.reward"},  # GatheredParameters for the score-head init
        "bench": set(),  # the benchmark harness is not part of the library
        # rm_scale's own state (data positions, markers, reports) is JSON; weights are safetensors
        # (README, "Preemption, checkpoints, faults")
        "torch.load / pickle": set(),
    }
    wrong = []
    for name, path in MODULES.items():
        for what, lines in _ast_uses(path).items():
            if lines and name not in rooms[what]:
                wrong.append(f"{name}:{lines[0]} uses {what} (allowed only in {sorted(rooms[what]) or 'bench/'})")
    assert not wrong, "\n".join(wrong)


def test_functions_fit_on_a_screen():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, f"functions of {MAX_FUNCTION_LINES}+ lines: {long}"


def test_readme_layout_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"[\w/]+\.py", block))
    folders = {m.group(1) for m in re.finditer(r"^(rm_scale/\w+/)\s", block, re.M)}
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
             and "demo_data" not in p.parts}
    described = set()
    for entry in listed:
        for f in files:
            if f == entry or any(f == folder + entry for folder in folders):
                described.add(f)
    missing = sorted(files - described)
    assert not missing, f"README's layout section does not list {missing}"
    stale = [e for e in listed if not (ROOT / e).exists() and not any((ROOT / f / e).exists() for f in folders)]
    assert not stale, f"README's layout section lists {stale}, which do not exist"
    for folder in folders:
        assert (ROOT / folder).is_dir(), f"README's layout lists {folder}, which does not exist"


def test_the_documented_import_paths_keep_working():
    import rm_scale
    import rm_scale.data
    import rm_scale.model
    import rm_scale.stream

    for name in rm_scale.__all__:
        assert getattr(rm_scale, name) is not None
    assert rm_scale.stream.PairFiles is rm_scale.data.PairFiles is rm_scale.PairFiles
    assert rm_scale.model.read_reward_stats is rm_scale.read_reward_stats
    assert rm_scale.data.RewardDataCollatorWithPadding is rm_scale.RewardDataCollatorWithPadding
