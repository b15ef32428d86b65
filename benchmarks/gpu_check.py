"""The GPU check's steps (``benchmarks/gpu_check.sh`` installs, then runs this).

Each step runs with its own time limit (500 s in all) and records what it measured, or why it could not,
in one summary: ``gpu_check.json`` and ``gpu_check.md`` in the output folder. A step that
fails or times out does not stop the others.

Steps: the device as TensorFlow and NVML see it; whether the default model's train step
takes cuDNN's LSTM kernel; a default and a seed-model run; graph vs keras_fit and float32
vs mixed_float16 side by side (benchmarks/engines.py); the batch frontier for k=10,25 on
the whole card and under ``device=k2200`` (a 4 GB cap); a probe driven past the capped
memory, which must come back as a real out-of-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(command: list[str], limit_s: float, cwd: Path) -> dict:
    """Run one step; past its limit the whole process group goes (a sweep's probe processes
    too, which would otherwise keep GPU memory from the next step)."""
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as error:  # the command itself is missing
        return {"rc": f"not run: {error}", "seconds": 0.0, "stdout": "", "stderr": ""}
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = "timeout"
    return {"rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "stdout": stdout[-6000:], "stderr": stderr[-3000:]}


CUDNN_CHECK = """
import json
from tbptt_exp.core.device import load_tensorflow, prepare_tensorflow
prepare_tensorflow(); tf = load_tensorflow()
from tbptt_exp.core.config import ModelConfig, TrainerConfig
from tbptt_exp.core.engines import GraphEngine
from tbptt_exp.core.model import build_model, make_optimizer
model = build_model(ModelConfig(), 98, 32, 25)
engine = GraphEngine(model, TrainerConfig(), from_logits=True, optimizer=make_optimizer(TrainerConfig()))
spec = engine._train_execution.input_signature
graph = engine._train_execution.get_concrete_function(*spec).graph
ops = {op.type for op in graph.get_operations()}
ops |= {node.op for f in graph.as_graph_def().library.function for node in f.node_def}
print(json.dumps({"gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                  "cudnn_ops": sorted(o for o in ops if "Cudnn" in o)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    work.mkdir(exist_ok=True)
    tracking = f"tracking.uri=sqlite:///{out / 'mlflow.db'}"
    cache = f"batch_finder.cache_dir={out / 'batch_cache'}"
    steps: dict[str, dict] = {}

    def step(name: str, command: list[str], limit_s: float) -> dict:
        print(f"== {name} (limit {limit_s:.0f} s)", flush=True)
        steps[name] = run(command, limit_s, work)
        print(f"   rc={steps[name]['rc']} in {steps[name]['seconds']} s", flush=True)
        return steps[name]

    step("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 10)
    cudnn = step("cudnn path", [PY, "-c", CUDNN_CHECK], 60)
    if cudnn["rc"] == 0:
        cudnn["answer"] = json.loads(cudnn["stdout"].strip().splitlines()[-1])
    cli = [PY, "-m", "tbptt_exp"]
    step("default model", [*cli, "trainer.epochs=1", tracking], 60)
    step("seed model", [*cli, "model=seed", "trainer.epochs=1", "data.max_chars=100000", tracking], 60)
    step("engines and precisions", [PY, str(ROOT / "benchmarks" / "engines.py"), "--rounds", "2", "--k", "25",
                                    "--models", "default", "--precisions", "float32", "mixed_float16",
                                    "--max-chars", "100000"], 100)
    finder = ["batch_finder.granularity=256", "batch_finder.max_batch_size=16384", "batch_finder.probe_seconds=1",
              tracking, cache]
    step("max_batch whole card", [*cli, "-m", "sweep=max_batch", "k=10,25", *finder], 80)
    step("max_batch k2200", [*cli, "-m", "sweep=max_batch", "k=10,25", "device=k2200", *finder], 80)
    step("probe past the cap", [*cli, "task=max_batch", "k=25", "device=k2200", "batch_finder.granularity=32768",
                                "batch_finder.min_batch_size=32768", "batch_finder.max_batch_size=65536",
                                "batch_finder.probe_seconds=1", "batch_finder.cache=false", tracking], 50)
    frontiers = {str(p.relative_to(work)): json.loads(p.read_text()) for p in work.glob("multirun/*/*/batch_frontier.json")}
    singles = {str(p.relative_to(work)): json.loads(p.read_text()) for p in work.glob("outputs/*/*/batch_frontier.json")}
    outcomes = [p["outcome"] for rows in singles.values() for row in rows for p in row.get("probe_log", [])]
    summary = {"steps": {k: {kk: v for kk, v in s.items() if kk != "stderr" or s["rc"] != 0} for k, s in steps.items()},
               "frontiers": frontiers, "probe_past_the_cap": {"outcomes": outcomes, "real_oom": "oom" in outcomes}}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))

    lines = ["# GPU check", "", "| step | rc | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {s['rc']} | {s['seconds']} |" for name, s in steps.items()]
    lines += ["", f"cuDNN ops in the default model's train step: {cudnn.get('answer', {}).get('cudnn_ops')}",
              f"probe past the 4 GB cap: outcomes {outcomes} (a real out-of-memory: {'oom' in outcomes})", ""]
    for name, rows in frontiers.items():
        lines += [f"## {name}", "", "| k | precision | max batch | recommended | peak MB | real tokens/s |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['k']} | {r.get('precision')} | {r['max_batch_size']} | {r['recommended_batch_size']} | "
                  f"{r['peak_memory_mb']} | {r['tokens_per_s']} |" for r in rows]
        lines.append("")
    engines = steps["engines and precisions"]["stdout"]
    lines += ["## engines and precisions", "", engines[engines.find("| contender"):] if "| contender" in engines else "(none)"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
