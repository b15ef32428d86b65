"""The package's shape: a one-way import graph, a core without Hydra or MLflow, lean probes."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tbptt_exp", "hydra_plugins")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every tbptt_exp / hydra_plugins module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith(PACKAGES)}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {i for i in imports(path) if i in files and i != name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "tbptt_exp.core.train" in graph and graph["tbptt_exp.app.jobs"]  # the graph is real
    assert find_cycle(graph) is None


def test_the_core_imports_neither_hydra_nor_mlflow_nor_the_app():
    for path in (ROOT / "tbptt_exp" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = {m for m in names if m.split(".")[0] in ("hydra", "omegaconf", "mlflow", "optuna", "hydra_plugins")
               or m.startswith("tbptt_exp.app")}
        assert not bad, f"{path.name} imports {bad}"


def test_importing_any_module_has_no_side_effects_on_hydra():
    """Nothing registers with Hydra (or masks logs) merely by being imported."""
    code = (
        "import importlib, logging, pkgutil, tbptt_exp\n"
        "factory = logging.getLogRecordFactory()\n"
        "for m in pkgutil.walk_packages(tbptt_exp.__path__, 'tbptt_exp.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "from hydra.core.config_store import ConfigStore\n"
        "print('experiment_schema.yaml' in ConfigStore.instance().repo, logging.getLogRecordFactory() is factory)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_a_probe_process_imports_neither_mlflow_nor_hydra():
    """A real probe (train, evaluate, measure) on a tiny model, with its loaded modules listed."""
    from tbptt_exp.core.config import ExperimentConfig, KeyRecallDataConfig, ModelConfig, to_dict

    config = to_dict(ExperimentConfig(k=5, batch_size=8, data=KeyRecallDataConfig(num_sequences=32),
                                      model=ModelConfig(units=8, embedding_dim=4)))
    request = {"config": config, "seconds": 0.5}
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr))\n"
        "from tbptt_exp.core.probe import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    from tbptt_exp.core.probe import MARKER

    answer = json.loads(next(line for line in out.stdout.splitlines() if line.startswith(MARKER))[len(MARKER):])
    assert answer["outcome"] == "ok", answer
    modules = next(line for line in out.stderr.splitlines() if line.startswith("MODULES")).split()[1:]
    assert "tensorflow" in modules and "tbptt_exp.core.engines" in modules
    loaded = {m.split(".")[0] for m in modules}
    assert not loaded & {"mlflow", "hydra", "hydra_plugins", "optuna"}, loaded & {"mlflow", "hydra", "hydra_plugins", "optuna"}
