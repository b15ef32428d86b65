"""The largest and the useful batch size for a model and chunk length k, verified by probes.

Each probe runs in a fresh process (``tbptt_exp.core.probes.probe``) with a time-out, because
TensorFlow does not give device memory back after running out of it. A probe is a real
training run of the user's config at one batch size, shortened to a few seconds of steady
state plus the validation pass, so the peak it measures is the peak a real run reaches.

The search bisects the multiples of ``granularity`` in [min, max]: at most
ceil(log2(sizes)) + 2 probes (the smallest size, the bisection, the recommended size).
Its answer is always verified: the largest size probed that fits, with the next size up
probed and too big (or the top of the range fitting). Memory is not assumed to grow with
the batch (kernels and allocators change with shapes); where the probes show it does not,
the result says so. Out-of-memory in any form TensorFlow reports it, an exceeded budget,
a time-out and a host-memory kill mean "too big"; any other error, or a peak the device
cannot report while a budget is set, stops the search: a bug, not a size. Results are
cached by a fingerprint of everything that decides memory.

What fits is not what trains best: a larger batch is more streams, so fewer optimizer
steps. After the search a warm-up trains at the recommended size and measures the gradient
noise scale (``measure_noise``; or it is read from a run, ``batch_finder.noise_from``), and
the useful batch is the probed size of highest goodput, tokens/s times the statistical
efficiency that noise scale gives (``core.noise``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from scipy.optimize import isotonic_regression

from tbptt_exp.app.settings import BatchFinderConfig, RunConfig, Task, settings_read
from tbptt_exp.app.tracking import metrics
from tbptt_exp.core.config import ConfigError, experiment_dict
from tbptt_exp.core.factories import factory_source
from tbptt_exp.core.measure import (
    FIGURES,
    GOODPUT,
    NOISE_SCALE,
    PEAK_MEMORY,
    PROBE_FIGURES,
    REAL_TOKENS,
    TOKENS_TRAINED,
    TRAINING_TIME,
    VAL_LOSS,
    rate_text,
)
from tbptt_exp.core.noise import goodput
from tbptt_exp.core.probes.probe import PHASES, answer, launch
from tbptt_exp.paths import default_store_dir

PROBE_ENTRY = answer  # what a probe process runs
FITS = ("ok",)
TOO_BIG = ("oom", "budget", "timeout", "killed")
# Goodputs this close to the highest are tied, and the useful batch is the largest of them. Pollux
# acts on a predicted gain of 5% or more, from a live job's steady measurements; a probe's are
# coarser: identical probes' tokens/s differ by up to 6%, and the noise scale grew 1.6-2.4x over
# the 60 s that benchmarks/useful_batch.py trains (which raises a larger batch's goodput).
GOODPUT_TIE = 0.10
MONOTONE_TOLERANCE = 0.05  # a peak this much below a smaller size's peak: memory is not monotone


@dataclass
class Probe:
    """One probe's answer: its outcome and the figures it measured (``measure.PROBE_FIGURES``)."""

    batch_size: int
    outcome: str  # ok | oom | budget | timeout | killed | error
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None
    seconds: float = 0.0
    error: str = ""
    tokens_per_s_spread: float | None = None
    padded_tokens_per_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # wall time per phase (``probe.PHASES``)
    goodput: float | None = None  # tokens/s times the statistical efficiency at this size (``core.noise``)

    @property
    def fits(self) -> bool:
        return self.outcome in FITS

    @property
    def measuring_s(self) -> float:
        """The seconds it trained and validated; the rest of ``seconds`` is overhead (start, data, build)."""
        return sum(self.phases.get(name, 0.0) for name in ("compile", "training", "validation"))

    @classmethod
    def from_answer(cls, batch_size: int, answer: dict) -> Probe:
        """A probe process's answer (or how it died), as a Probe; a setting the probe refused
        (a budget its device cannot check) stops the search as that setting's one line."""
        if answer["outcome"] == "refused":
            raise ConfigError(answer["setting"], answer["value"], answer["allowed"])
        return cls(batch_size, answer["outcome"], seconds=answer.get("seconds", 0.0), error=answer.get("error", ""),
                   phases=answer.get("phases", {}), **{f.name: answer.get(f.name) for f in PROBE_FIGURES})

    def metrics(self) -> dict[str, float | None]:
        """MLflow's metrics of the probe (``probe/...``), logged with step = its batch size."""
        figures = {f.probe_metric: getattr(self, f.name) for f in PROBE_FIGURES}
        return figures | {GOODPUT.probe_metric: self.goodput, metrics.PROBE_FITS: float(self.fits),
                           metrics.PROBE_SECONDS: self.seconds}

    def describe(self, k: int, budget_mb: float | None = None) -> str:
        """``k=25 batch_size=56: over the budget of 50 MB at a peak of 56.2 MB [2.1 s, start 0.1, ...]``:
        the outcome, the figures and the probe's whole wall time with its phases. A probe over
        the budget stops as its peak passes it, so its peak is where it stopped, a floor."""
        peak = "" if self.peak_memory_mb is None else f", peak {PEAK_MEMORY.show(self.peak_memory_mb, unit=True)}"
        rate = f", {rate_text(self.tokens_per_s, self.tokens_per_s_spread)} tokens/s" if self.tokens_per_s else ""
        rate += f", goodput {GOODPUT.show(self.goodput)}" if self.goodput is not None else ""
        why = f" ({self.error})" if self.error and self.outcome != "ok" else ""
        outcome = self.outcome
        if outcome == "budget" and budget_mb is not None and self.peak_memory_mb is not None:
            outcome, peak = f"over the budget of {budget_mb:g} MB at a peak of {PEAK_MEMORY.show(self.peak_memory_mb, unit=True)}", ""
        phases = "".join(f", {name} {self.phases[name]:.1f}" for name in PHASES if name in self.phases)
        return f"k={k} batch_size={self.batch_size}: {outcome}{peak}{rate}{why} [{self.seconds:.1f} s{phases}]"


class ProbeError(RuntimeError):
    """A probe failed for a reason other than memory: a bug, not a batch size."""


@dataclass
class SearchResult:
    max_batch_size: int  # 0: not even the smallest size fits
    recommended_batch_size: int  # probed; leaves ``headroom`` of the budget free (0: none does)
    probes: list[Probe]
    memory_monotone: bool  # False: a larger size measured clearly less than a smaller one


@dataclass
class NoiseScale:
    """The gradient noise scale the useful batch is judged by, and where it was measured."""

    value: float | None  # streams; None: not measured (the warm-up failed or found no signal)
    where: str  # ``after 20 s of training at batch 32 (val_loss 1.70)``, or the run it came from
    batch_size: int = 0  # the batch it was measured at; its tokens/s stand beside the probes'
    tokens_per_s: float | None = None


@dataclass
class Frontier:
    k: int
    max_batch_size: int
    recommended_batch_size: int
    peak_memory_mb: float | None  # at max_batch_size
    tokens_per_s: float | None  # at max_batch_size: median of its windows
    tokens_per_s_spread: float | None
    probes: int
    budget_mb: float | None
    memory_monotone: bool = True
    max_is_ceiling: bool = False  # every size up to batch_finder.max_batch_size fitted: a bound, not a limit
    # The useful batch: the size of highest goodput (``core.noise``), by the noise scale below.
    useful_batch_size: int | None = None  # None: no noise scale known
    critical_batch_size: int | None = None  # the noise scale, rounded
    noise_scale: float | None = None  # B_noise in streams (``optim/gradient_noise_scale``)
    noise_measured: str = ""  # which point of training the noise scale is from
    noise_batch_size: int | None = None  # the batch it was measured at
    noise_tokens_per_s: float | None = None  # the warm-up's tokens/s there: one more goodput candidate
    reference_batch_size: int = 32  # statistical efficiency 1 here (trainer.reference_batch_size)
    goodput: float | None = None  # at useful_batch_size
    probe_log: list[Probe] = field(default_factory=list)  # every probe, in the order it ran
    fingerprint: str = ""
    cached: bool = False
    search_s: float = 0.0  # the search's wall time
    measuring_s: float = 0.0  # of it, probes training and validating (the rest: starting, data, building)
    warmup_s: float = 0.0  # of it, the warm-up that measured the noise scale (whole wall time)

    def answer(self) -> str:
        """``k=25: largest 200, recommended 176, useful 64 (critical batch ≈ 41 streams, its noise
        scale after 20 s at batch 32, val_loss 1.70), 23,456 tokens/s, 42.2 MB``, the ceiling said."""
        if not self.max_batch_size:
            return f"k={self.k}: not even the smallest size fits"
        ceiling = (" (every probe fitted: the range's ceiling, not a measured limit; raise "
                   "batch_finder.max_batch_size)") if self.max_is_ceiling else ""
        figures = ", ".join(f.show(v, unit=True) for f, v in ((REAL_TOKENS, self.tokens_per_s),
                                                             (PEAK_MEMORY, self.peak_memory_mb)) if v is not None)
        return (f"k={self.k}: largest {self.max_batch_size}{ceiling}, recommended {self.recommended_batch_size}, "
                f"{self.useful_text()}" + (f", {figures}" if figures else ""))

    def useful_text(self) -> str:
        """``useful 64 (critical batch ≈ 41 streams, measured after ...)``, or why it is unknown."""
        if self.useful_batch_size is None:
            return f"useful unknown ({self.noise_measured or 'no gradient noise scale'})"
        return (f"useful {self.useful_batch_size} (goodput {GOODPUT.show(self.goodput, unit=True)}; critical batch "
                f"≈ {self.critical_batch_size} streams, its noise scale {self.noise_measured})")

    def cost(self) -> str:
        """``11 probes in 41 s, 27 s of it training and validating``: what the answer took."""
        if self.cached:
            return f"{self.probes} probes, cached"
        warmup = f", {self.warmup_s:.0f} s the noise scale's warm-up" if self.warmup_s else ""
        return (f"{self.probes} probes in {self.search_s:.0f} s, {self.measuring_s:.0f} s of it training and "
                f"validating{warmup} (the rest: starting probes, handing them the data, building the model)")

    def to_dict(self) -> dict:
        """As plain data, its probes too: the cache file, the frontier's JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Frontier:
        """``to_dict``'s data (a cache file) as the record again, its probes as ``Probe``s."""
        known = {f.name for f in fields(cls)}
        probes = [Probe(**p) for p in record.get("probe_log", [])]
        return cls(**{k: v for k, v in record.items() if k in known} | {"probe_log": probes})

    def figures(self) -> dict[str, float | None]:
        """The answer's figures by name (``measure.FIGURES``): the sizes and the figures at the largest."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in FIGURES}


def max_probes(cfg: BatchFinderConfig) -> int:
    """The search's bound: ceil(log2(number of sizes)) + 2."""
    lo, hi = size_range(cfg)
    return math.ceil(math.log2((hi - lo) // cfg.granularity + 1)) + 2


def size_range(cfg: BatchFinderConfig) -> tuple[int, int]:
    g = cfg.granularity
    lo = max(g, -(-cfg.min_batch_size // g) * g)
    return lo, max(lo, cfg.max_batch_size // g * g)


def is_monotone(probes: list[Probe]) -> bool:
    peaks = [(p.batch_size, p.peak_memory_mb) for p in sorted(probes, key=lambda p: p.batch_size)
             if p.outcome in ("ok", "budget") and p.peak_memory_mb is not None]
    return all(later >= earlier * (1 - MONOTONE_TOLERANCE)
               for i, (_, earlier) in enumerate(peaks) for _, later in peaks[i + 1:])


def search(
    probe: Callable[[int], Probe], cfg: BatchFinderConfig, budget_mb: float | None,
    on_probe: Callable[[Probe], None] | None = None,
) -> SearchResult:
    """Bisect the sizes for the largest that fits; then probe the recommended size."""
    g = cfg.granularity
    lo, hi = size_range(cfg)
    sizes = list(range(lo, hi + 1, g))
    probes: dict[int, Probe] = {}

    def run(b: int) -> Probe:
        if b not in probes:
            found = probe(b)
            if found.outcome not in FITS + TOO_BIG:
                raise ProbeError(f"batch_size={b}: {found.error or found.outcome}")
            probes[b] = found
            if on_probe:
                on_probe(found)
        return probes[b]

    if not run(lo).fits:
        return SearchResult(0, 0, list(probes.values()), True)
    fit_i, bad_i = 0, len(sizes)  # sizes[fit_i] fits; sizes[bad_i] is too big (len: none seen)
    while bad_i - fit_i > 1:
        mid = (fit_i + bad_i) // 2
        if run(sizes[mid]).fits:
            fit_i = mid
        else:
            bad_i = mid
    best = sizes[fit_i]
    rec = recommend(best, probes, budget_mb, cfg, run)
    return SearchResult(best, rec, sorted(probes.values(), key=lambda p: p.batch_size), is_monotone(list(probes.values())))


def recommend(best: int, probes: dict[int, Probe], budget_mb: float | None, cfg: BatchFinderConfig,
              run: Callable[[int], Probe]) -> int:
    """The largest size that leaves ``headroom`` free, probed to confirm (one probe at most).

    With a budget, the candidate is interpolated between the measured peaks on either side
    of the line budget x (1 - headroom), aiming halfway into the headroom band; without a
    budget (out-of-memory only), it is max x (1 - headroom). Where the candidate misses, the
    largest probed size under the line is taken.
    """
    g = cfg.granularity
    line = None if budget_mb is None else budget_mb * (1 - cfg.headroom)

    def fine(p: Probe) -> bool:
        if not p.fits:
            return False
        return line is None or (p.peak_memory_mb is not None and p.peak_memory_mb <= line)

    if line is None:
        candidate = max(g, int(best * (1 - cfg.headroom)) // g * g)
    else:
        under = [p for p in probes.values() if fine(p) and p.batch_size <= best]
        over = [p for p in probes.values() if p.peak_memory_mb is not None and p.peak_memory_mb > line]
        if not under:
            return 0
        below = max(under, key=lambda p: p.batch_size)
        above = min((p for p in over if p.batch_size > below.batch_size), key=lambda p: p.batch_size, default=None)
        if above is None:
            return below.batch_size
        slope = (above.peak_memory_mb - below.peak_memory_mb) / (above.batch_size - below.batch_size)
        aim = line - (budget_mb - line) / 2  # halfway into the headroom band: a chord rarely misses by that much
        candidate = below.batch_size + max(0, int((aim - below.peak_memory_mb) / slope)) // g * g
    candidate = min(candidate, best)
    if candidate not in probes:
        run(candidate)
    ok = [b for b, p in probes.items() if fine(p) and b <= candidate]
    return max(ok, default=0)


# --- probes in processes ---------------------------------------------------------------


def describe_device(config: dict, timeout_s: float, entry: Callable[[dict], dict] = answer, dataset=None) -> dict:
    """The probes' device and TensorFlow version, from a first probe process (which also checks
    a model of your own: a refused one is a ConfigError here)."""
    result = launch({"config": config, "describe": True, "dataset": dataset}, timeout_s, entry)
    if result.get("outcome") == "refused":
        raise ConfigError(result["setting"], result["value"], result["allowed"])
    if result.get("outcome") != "describe":
        raise ProbeError(f"cannot start a probe: {result.get('error', result)}")
    return result


def budget_for(device: dict, cfg: RunConfig) -> float | None:
    """The memory a batch may use: the budget setting, else the GPU's cap or total memory."""
    if cfg.device.memory_budget_mb is not None:
        return float(cfg.device.memory_budget_mb)
    if device.get("device", "").startswith("GPU"):
        if cfg.device.memory_limit_mb is not None:
            return float(cfg.device.memory_limit_mb)
        total = device.get("device_memory_mb", "unknown")
        return float(total) if total not in ("unknown", "") else None
    return None


# The finder's settings that say how the search runs, not what it answers.
NOT_DECISIVE = ("batch_finder.cache", "batch_finder.cache_dir", "batch_finder.probe_timeout_s")


def fingerprint(cfg: RunConfig, device: dict, tensorflow: str, data: str = "") -> str:
    """Everything that decides a probe's answer: the settings the search reads, the data they
    name (its content: a file that changed is searched again), the device, TensorFlow."""
    config = {k: v for k, v in settings_read(cfg, Task.max_batch).items() if k not in NOT_DECISIVE}
    model = {"model_source": factory_source(cfg.model.factory)} if cfg.model.factory else {}  # the factory's code
    decisive = {"config": config, "device": device, "tensorflow": tensorflow} | ({"data": data} if data else {}) | model
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def score(found: SearchResult, noise: NoiseScale, reference: int, say: Callable[[str], None], k: int) -> None:
    """Each probe that fits, up to the largest, gets its goodput (``goodputs``), said in one line."""
    scored = goodputs(found.probes, found.max_batch_size, noise, reference)
    for p in found.probes:
        p.goodput = scored.get(p.batch_size)
    shown = ", ".join(f"B={p.batch_size}: {GOODPUT.show(p.goodput)}" for p in found.probes if p.goodput is not None)
    if shown:
        say(f"k={k}: goodput (reference tokens/s, against batch {reference}) {shown}")


def goodputs(probes: list[Probe], best: int, noise: NoiseScale, reference: int) -> dict[int, float]:
    """Goodput by batch size: the probes that fit up to ``best``, and the warm-up's batch with
    its own tokens/s. Tokens/s enter as their non-decreasing trend in the batch size (isotonic
    regression): more streams never compute fewer tokens per second on a device they fit, and
    a probe that reads lower than a smaller one is process-to-process noise (on the embedded
    text, probes 8 rows apart read 46,145 and 36,999 tokens/s, and a size whose probe read 43,619
    trained at 36,100 for 60 s). Empty without a noise scale."""
    if noise.value is None or not best:
        return {}
    rates = {p.batch_size: p.tokens_per_s for p in probes if p.fits and p.tokens_per_s and p.batch_size <= best}
    if noise.tokens_per_s and noise.batch_size <= best:
        rates.setdefault(noise.batch_size, noise.tokens_per_s)
    sizes = sorted(rates)
    trend = isotonic_regression([rates[b] for b in sizes]).x if sizes else []
    return {b: goodput(float(rate), b, noise.value, reference) for b, rate in zip(sizes, trend)}


def noise_fields(found: SearchResult, noise: NoiseScale | None, reference: int) -> dict:
    """The frontier's useful-batch fields (``Frontier``) from the search and the noise scale."""
    useful, best_goodput = useful_batch(found.probes, found.max_batch_size, noise, reference)
    if noise is None:
        return {"noise_measured": "no gradient noise scale: batch_finder.noise_warmup_s is 0 and no "
                                  "batch_finder.noise_from"}
    return {"useful_batch_size": useful, "goodput": best_goodput, "noise_scale": noise.value,
            "critical_batch_size": None if noise.value is None else round(noise.value),
            "noise_measured": noise.where, "noise_batch_size": noise.batch_size,
            "noise_tokens_per_s": noise.tokens_per_s}


def cache_dir(cfg: BatchFinderConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_store_dir() / "batch_cache"


def measure_noise(cfg: RunConfig, batch_size: int, probe_entry: Callable[[dict], dict],
                  dataset=None) -> NoiseScale | None:
    """The gradient noise scale from a warm-up training of ``batch_finder.noise_warmup_s`` at
    ``batch_size``, in a process of its own like a probe (``probe.warm_up``); None where the
    warm-up is off. The finder warms up at its recommended size, not the reference: B_noise
    is a property of the point of training, which a larger batch reaches sooner (on the
    embedded text it trained 7% lower in 60 s at 192 streams than at 32), and a larger batch
    measures it with less noise."""
    finder = cfg.batch_finder
    if not finder.noise_warmup_s:
        return None
    request = {"config": experiment_dict(cfg), "warmup": True, "seconds": finder.noise_warmup_s, "dataset": dataset,
               "batch_size": batch_size}
    found = launch(request, finder.probe_timeout_s + finder.noise_warmup_s, probe_entry)
    if found.get("outcome") != "warmup":
        why = " ".join(str(found.get("error") or found.get("outcome")).split())[:300]
        return NoiseScale(None, f"the warm-up at batch {batch_size} ended without one: {why}", batch_size)
    where = (f"after {found[TRAINING_TIME.name]:.0f} s of training at batch {batch_size} "
             f"({found[TOKENS_TRAINED.name]:,} tokens, val_loss {VAL_LOSS.show(found[VAL_LOSS.name])})")
    if found[NOISE_SCALE.name] is None:
        where = f"not measurable {where}: no gradient signal above the noise yet"
    return NoiseScale(found[NOISE_SCALE.name], where, batch_size, found[REAL_TOKENS.name])


def useful_batch(probes: list[Probe], best: int, noise: NoiseScale | None,
                 reference: int) -> tuple[int | None, float | None]:
    """The size of highest goodput (``goodputs``), with its goodput. Sizes within
    ``GOODPUT_TIE`` of the highest count as tied, and the largest of them is taken: a smaller
    gain is within the probes' noise, and the noise scale only grows as training goes on,
    which favours the larger. (None, None) without a noise scale."""
    scored = goodputs(probes, best, noise, reference) if noise is not None else {}
    if not scored:
        return None, None
    size = max(b for b, g in scored.items() if g >= (1 - GOODPUT_TIE) * max(scored.values()))
    return size, scored[size]


def noise_for(cfg: RunConfig, found: SearchResult, noise: NoiseScale | None, probe_entry: Callable[[dict], dict],
              dataset, say: Callable[[str], None]) -> tuple[NoiseScale | None, float]:
    """The noise scale given (``batch_finder.noise_from``) or measured by a warm-up at the
    recommended size, said and scored against the probes; with the warm-up's seconds."""
    started = time.perf_counter()
    if noise is None and found.max_batch_size:
        noise = measure_noise(cfg, found.recommended_batch_size or found.max_batch_size, probe_entry, dataset)
    warmup_s = time.perf_counter() - started if cfg.batch_finder.noise_from is None else 0.0
    if noise is not None:
        say(f"k={cfg.k}: gradient noise scale {'unknown' if noise.value is None else f'{noise.value:,.1f} streams'}, "
            f"{noise.where}")
        score(found, noise, cfg.trainer.reference_batch_size, say, cfg.k)
    return noise, warmup_s


def find_max_batch(
    cfg: RunConfig,
    on_probe: Callable[[Probe], None] | None = None, say: Callable[[str], None] = print,
    probe_entry: Callable[[dict], dict] | None = None, dataset=None, device: dict | None = None,
    noise: NoiseScale | None = None,
) -> Frontier:
    """Search (or recall from the cache) the largest batch that fits ``cfg.k``, and the
    useful one; ``probe_entry`` is what a probe process runs (``PROBE_ENTRY``); ``dataset``:
    what ``train.prepare(cfg)`` gave, handed to every probe and keying the cache by its
    content (read in each probe if absent); ``device``: what ``describe_device`` answered,
    else it is asked here; ``noise``: the noise scale taken from elsewhere
    (``batch_finder.noise_from``), else measured by a warm-up (``measure_noise``)."""
    finder, probe_entry = cfg.batch_finder, probe_entry or PROBE_ENTRY
    device = device or describe_device(experiment_dict(cfg), finder.probe_timeout_s, probe_entry, dataset)
    budget = budget_for(device["device"], cfg)
    key = fingerprint(cfg, device["device"], device["tensorflow"], dataset.fingerprint if dataset else "")
    cached = cache_dir(finder) / f"{key}.json"
    if finder.cache and cached.is_file():
        say(f"k={cfg.k}: cached result {cached.name} (device {device['device']['device_name']})")
        found = Frontier.from_dict(json.loads(cached.read_text()) | {"cached": True})
        return replace(found, max_is_ceiling=found.max_batch_size == size_range(finder)[1])
    if budget is None:
        say(f"k={cfg.k}: no memory budget known (set device.memory_budget_mb): searching by real out-of-memory only")
    started = time.perf_counter()
    reference = cfg.trainer.reference_batch_size

    def probe(batch_size: int) -> Probe:
        one_epoch = replace(cfg, batch_size=batch_size, trainer=replace(cfg.trainer, epochs=1))
        request = {"config": experiment_dict(one_epoch), "seconds": finder.probe_seconds, "dataset": dataset}
        found = Probe.from_answer(batch_size, launch(request, finder.probe_timeout_s, probe_entry))
        say(found.describe(cfg.k, budget))
        return found

    found = search(probe, finder, budget, on_probe)
    noise, warmup_s = noise_for(cfg, found, noise, probe_entry, dataset, say)
    search_s = time.perf_counter() - started
    at_best = next((p for p in found.probes if p.batch_size == found.max_batch_size), None)
    if not found.memory_monotone:
        peaks = ", ".join(f"B={p.batch_size}: {p.peak_memory_mb:,.1f} MB" for p in found.probes
                          if p.peak_memory_mb is not None)
        say(f"k={cfg.k}: peak memory is not monotone in the batch size here ({peaks}); "
            "the answer is verified by probes, not predicted")
    frontier = Frontier(
        k=cfg.k, max_batch_size=found.max_batch_size, recommended_batch_size=found.recommended_batch_size,
        peak_memory_mb=at_best.peak_memory_mb if at_best else None,
        tokens_per_s=at_best.tokens_per_s if at_best else None,
        tokens_per_s_spread=at_best.tokens_per_s_spread if at_best else None,
        probes=len(found.probes), budget_mb=budget, memory_monotone=found.memory_monotone,
        max_is_ceiling=found.max_batch_size == size_range(finder)[1], probe_log=list(found.probes), fingerprint=key,
        search_s=search_s, measuring_s=sum(p.measuring_s for p in found.probes),
        reference_batch_size=reference, warmup_s=warmup_s, **noise_fields(found, noise, reference),
    )
    if finder.cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(frontier.to_dict(), indent=1))
    return frontier
