"""The largest workable batch size for a model and chunk length k: predicted, then verified.

Each probe runs in a fresh process (``tbptt_exp.core.probe``) with a time-out, because
TensorFlow does not give device memory back after running out of it. The search:

1. probe two small sizes and fit a linear memory model, peak(B) = fixed + per_row * B;
2. predict the largest size under the memory budget (GPU: the card or its cap);
3. verify it and the next size up; bisect between the largest size that worked and the
   smallest that did not where the prediction was off.

Sizes are multiples of ``granularity``. Out-of-memory in any form TensorFlow reports it,
an exceeded budget, a time-out and a host-memory kill mean "too big"; any other error
stops the search and is shown, since it is a bug, not a size. Results are cached by a
fingerprint of everything that decides memory.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tbptt_exp.core.config import BatchFinderConfig, ExperimentConfig, to_dict

PROBE_COMMAND = (sys.executable, "-m", "tbptt_exp.core.probe")  # a probe: the core in a fresh process

FITS = ("ok",)
TOO_BIG = ("oom", "budget", "timeout", "killed")


@dataclass
class Probe:
    batch_size: int
    outcome: str  # ok | oom | budget | timeout | killed | error
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.outcome in FITS


class ProbeError(RuntimeError):
    """A probe failed for a reason other than memory: a bug, not a batch size."""


@dataclass
class Frontier:
    k: int
    max_batch_size: int  # 0: not even the smallest size fits
    recommended_batch_size: int
    peak_memory_mb: float | None
    tokens_per_s: float | None
    probes: int
    budget_mb: float | None
    memory_model: dict = field(default_factory=dict)  # fixed_mb, per_row_mb
    probe_log: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def fit_memory_model(probes: list[Probe]) -> tuple[float, float] | None:
    """Least squares over the probes that fit: peak = fixed + per_row * B."""
    points = [(p.batch_size, p.peak_memory_mb) for p in probes if p.fits and p.peak_memory_mb]
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    per_row = sum((b - mean_b) * (m - mean_m) for b, m in points) / var
    return mean_m - per_row * mean_b, per_row


def local_model(probes: list[Probe], budget_mb: float) -> tuple[float, float] | None:
    """A line through the two measured peaks nearest the budget (a secant step).

    Peaks are measured for sizes that fit and for sizes over the budget; the points near
    the budget predict best (a CPU allocator skips small tensors, so tiny sizes mislead).
    """
    points = sorted(
        {(p.batch_size, p.peak_memory_mb) for p in probes if p.peak_memory_mb and p.outcome in ("ok", "budget")},
        key=lambda bm: abs(bm[1] - budget_mb),
    )
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = points[0], next(((b, m) for b, m in points[1:] if b != points[0][0]), (None, None))
    if b2 is None or m2 == m1:
        return None
    per_row = (m2 - m1) / (b2 - b1)
    return m1 - per_row * b1, per_row


def search(
    probe: Callable[[int], Probe], cfg: BatchFinderConfig, budget_mb: float | None,
    on_probe: Callable[[Probe], None] | None = None,
) -> tuple[int, list[Probe], tuple[float, float] | None]:
    """Largest multiple of ``granularity`` in [min, max] that fits; the probes it took.

    With a budget, each step probes the size a memory model predicts (secant through the
    measured peaks nearest the budget); a step that fails to halve the bracket is followed
    by a bisection step, so the worst case stays near log2 of the range.
    """
    g = cfg.granularity
    lo_size = max(g, -(-cfg.min_batch_size // g) * g)
    hi_size = max(lo_size, cfg.max_batch_size // g * g)
    probes: dict[int, Probe] = {}

    def run(b: int) -> Probe:
        if b not in probes:
            p = probe(b)
            if p.outcome == "error":
                raise ProbeError(f"batch_size={b}: {p.error}")
            probes[b] = p
            if on_probe:
                on_probe(p)
        return probes[b]

    def bounds() -> tuple[int, int]:
        """Smallest size known not to fit (hi_size + g if none), largest known to fit below it.

        Memory need not grow monotonically with the batch (kernels change with shapes), so
        a size that fits above a failed one is not trusted: the answer is always a size that
        fits with the next size up probed and failing.
        """
        bad = min((b for b, p in probes.items() if not p.fits), default=hi_size + g)
        fit = max((b for b, p in probes.items() if p.fits and b < bad), default=0)
        return fit, bad

    if not run(lo_size).fits:
        return 0, list(probes.values()), None
    if hi_size > lo_size:
        run(min(hi_size, lo_size * 4))
    bisect_next = False
    while True:
        fit, bad = bounds()
        if bad - fit <= g or fit >= hi_size:
            break
        model = local_model(list(probes.values()), budget_mb) if budget_mb is not None else None
        if model is not None and model[1] > 0 and not bisect_next:
            target = int((budget_mb - model[0]) / model[1]) // g * g
            target = min(max(target, fit + g), bad - g, hi_size)
        elif bad > hi_size:
            target = min(hi_size, fit * 2 // g * g)  # nothing too big seen yet: gallop
        else:
            target = (fit + bad) // 2 // g * g
        width = bad - fit
        run(target)
        fit, bad = bounds()
        bisect_next = (bad - fit) > width / 2 and bad <= hi_size  # the model did not pay off
    fit, _ = bounds()
    return fit, list(probes.values()), fit_memory_model(list(probes.values()))


def recommended(max_batch: int, model: tuple[float, float] | None, budget_mb: float | None,
                cfg: BatchFinderConfig) -> int:
    """The largest size whose predicted peak leaves ``headroom`` of the budget free."""
    g = cfg.granularity
    if max_batch == 0:
        return 0
    if model is None or budget_mb is None or model[1] <= 0:
        return max(g, int(max_batch * (1 - cfg.headroom)) // g * g)
    limit = int((budget_mb * (1 - cfg.headroom) - model[0]) / model[1]) // g * g
    return max(g, min(max_batch, limit))


# --- probes in processes ---------------------------------------------------------------


def run_probe_process(request: dict, timeout_s: float, command: tuple[str, ...] = PROBE_COMMAND) -> dict:
    """Run one probe process on ``request``; its answer, or how it died."""
    from tbptt_exp.core.probe import MARKER

    started = time.perf_counter()
    try:
        out = subprocess.run(
            list(command), input=json.dumps(request),
            capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout", "error": f"no answer within {timeout_s:.0f} s", "seconds": timeout_s}
    seconds = time.perf_counter() - started
    for line in out.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):]) | {"seconds": seconds}
    if out.returncode in (-9, 137):  # SIGKILL: the kernel's out-of-memory killer, most often
        return {"outcome": "killed", "error": "killed (host memory?)", "seconds": seconds}
    tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
    return {"outcome": "error", "error": f"probe exited {out.returncode}: " + " | ".join(tail), "seconds": seconds}


def describe_device(config: dict, timeout_s: float, command: tuple[str, ...] = PROBE_COMMAND) -> dict:
    result = run_probe_process({"config": config, "describe": True}, timeout_s, command)
    if result.get("outcome") != "describe":
        raise ProbeError(f"cannot start a probe: {result.get('error', result)}")
    return result


def budget_for(device: dict, cfg: ExperimentConfig) -> float | None:
    """The memory a batch may use: the budget setting, else the GPU's cap or total memory."""
    if cfg.device.memory_budget_mb is not None:
        return float(cfg.device.memory_budget_mb)
    if device.get("device", "").startswith("GPU"):
        if cfg.device.memory_limit_mb is not None:
            return float(cfg.device.memory_limit_mb)
        total = device.get("device_memory_mb", "unknown")
        return float(total) if total not in ("unknown", "") else None
    return None


def fingerprint(cfg: ExperimentConfig, config_dict: dict, device: dict, tensorflow: str, vocab_size: int) -> str:
    decisive = {
        "model": config_dict["model"], "k": cfg.k, "dtype": "float32",
        "engine": config_dict["engine"], "trainer": {k: config_dict["trainer"][k] for k in ("optimizer", "steps_per_execution", "jit_compile")},
        "device": device, "memory_limit_mb": cfg.device.memory_limit_mb, "budget_mb": cfg.device.memory_budget_mb,
        "tensorflow": tensorflow, "finder": {k: v for k, v in config_dict["batch_finder"].items() if k not in ("cache", "cache_dir", "probe_timeout_s")},
        "vocab": vocab_size,
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir(cfg: BatchFinderConfig) -> Path:
    from tbptt_exp.paths import default_store_dir

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_store_dir() / "batch_cache"


def find_max_batch(
    cfg: ExperimentConfig, vocab_size: int,
    on_probe: Callable[[Probe], None] | None = None, say: Callable[[str], None] = print,
    probe_command: tuple[str, ...] | None = None,
) -> Frontier:
    """Search (or recall from the cache) the largest workable batch for ``cfg.k``;
    ``probe_command`` runs a probe process (default ``PROBE_COMMAND``)."""
    probe_command = probe_command or PROBE_COMMAND
    finder = cfg.batch_finder
    config_dict = to_dict(cfg)
    device = describe_device(config_dict, finder.probe_timeout_s, probe_command)
    budget = budget_for(device["device"], cfg)
    key = fingerprint(cfg, config_dict, device["device"], device["tensorflow"], vocab_size)
    cached = cache_dir(finder) / f"{key}.json"
    if finder.cache and cached.is_file():
        say(f"k={cfg.k}: cached result {cached.name} (device {device['device']['device_name']})")
        return Frontier(**json.loads(cached.read_text()) | {"cached": True})
    if budget is None:
        say(f"k={cfg.k}: no memory budget known (set device.memory_budget_mb): searching by real out-of-memory only")

    def probe(b: int) -> Probe:
        request = {"config": config_dict, "batch_size": b, "vocab_size": vocab_size, "chunks": finder.probe_chunks}
        r = run_probe_process(request, finder.probe_timeout_s, probe_command)
        p = Probe(b, r["outcome"], r.get("peak_memory_mb"), r.get("tokens_per_s"), r.get("seconds", 0.0), r.get("error", ""))
        say(f"k={cfg.k} batch_size={b}: {p.outcome}"
            + (f", peak {p.peak_memory_mb:,.1f} MB" if p.peak_memory_mb is not None else "")
            + (f", {p.tokens_per_s:,.0f} tokens/s" if p.tokens_per_s else "")
            + (f" ({p.error})" if p.error and p.outcome != "ok" else "") + f" [{p.seconds:.1f} s]")
        return p

    best, probes, model = search(probe, finder, budget, on_probe)
    at_best = next((p for p in probes if p.batch_size == best), None)
    frontier = Frontier(
        k=cfg.k, max_batch_size=best,
        recommended_batch_size=recommended(best, model, budget, finder),
        peak_memory_mb=at_best.peak_memory_mb if at_best else None,
        tokens_per_s=at_best.tokens_per_s if at_best else None,
        probes=len(probes), budget_mb=budget,
        memory_model={"fixed_mb": model[0], "per_row_mb": model[1]} if model else {},
        probe_log=[asdict(p) for p in sorted(probes, key=lambda p: p.batch_size)],
        fingerprint=key,
    )
    if finder.cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(frontier.to_dict(), indent=1))
    return frontier
