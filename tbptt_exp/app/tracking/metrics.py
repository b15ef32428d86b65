"""MLflow's names for what the app logs besides a run's figures (those are named once, in
``core.measure.FIGURES``): a sweep's or a study's best, its curve over a swept setting, the
frontier across k, a study's trial counts, a night's verdict, a probe's outcome. Named here
once, so the logging, the saved views of the runs table and the run descriptions agree."""

from tbptt_exp.core.measure import PROBE_SECTION

PROBE_FITS = PROBE_SECTION + "fits"  # 1: the probe fits the budget, 0: too big
PROBE_SECONDS = PROBE_SECTION + "seconds"  # the probe's wall time
SWEEP_JOBS = "sweep/jobs"
SWEEP_FAILED_JOBS = "sweep/failed_jobs"
STUDY_BEST_VALUE = "best_value"  # a single-objective study's best trial's value
NIGHTLY_ENTRIES = "nightly/entries"
NIGHTLY_RED_FIGURES = "nightly/red_figures"
NIGHTLY_GREEN = "nightly/green"  # 1: no figure regressed and none is missing


def best(figure: str) -> str:
    """A sweep parent's (or a study's) figure of its best job: ``best/val_loss``."""
    return f"best/{figure}"


def by_value(setting: str, figure: str) -> str:
    """A grid parent's figure at step = each job's value of the one swept setting: ``by_k/val_loss``."""
    return f"by_{setting}/{figure}"


def frontier(column: str) -> str:
    """A batch-frontier parent's column at step = k: ``frontier/useful_batch_size``."""
    return f"frontier/{column}"


def trials(state: str) -> str:
    """A study's count of trials in ``state``: ``trials_complete``."""
    return f"trials_{state}"


def column(metric: str) -> str:
    """The runs table's column of a metric, as MLflow's search syntax and saved views name it."""
    return f"metrics.`{metric}`"
