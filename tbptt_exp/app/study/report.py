"""A finished study's summary on its MLflow parent run: best trial or Pareto front,
all trials as a table, the optimisation history and the parameter importances."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tbptt_exp.app import tables
from tbptt_exp.app.tracking import metrics
from tbptt_exp.core.measure import PEAK_MEMORY, REAL_TOKENS

# What each trial carries as user attributes, for trials.md and optuna-dashboard: its run,
# how long it trained and what it cost.
RUN_ATTR, EPOCHS_ATTR = "mlflow_run_id", "epochs_run"
COST_FIGURES = (REAL_TOKENS, PEAK_MEMORY)


MIN_TRIALS_FOR_IMPORTANCES = 8  # below this, fANOVA's importances are noise drawn as a ranking


def _param(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(study: optuna.Study) -> str:
    """Every trial: its state, values, parameters, what it cost (tokens/s, peak memory, the
    epochs it ran) and its MLflow run."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        values = ", ".join(f"{v:.4g}" for v in t.values) if t.values else ""
        constraints = ", ".join(f"{k}={v:.4g}" for k, v in t.constraints.items())
        cost = [f.show(t.user_attrs.get(f.name)) if t.user_attrs.get(f.name) is not None else "" for f in COST_FIGURES]
        note = t.user_attrs.get("fail_reason", "")
        rows.append([str(t.number), t.state.name, values, *(_param(t.params.get(k, "")) for k in keys), *cost,
                     str(t.user_attrs.get(EPOCHS_ATTR, "")), constraints, t.user_attrs.get(RUN_ATTR, ""), note])
    return tables.markdown(["trial", "state", "values", *keys, *(f.axis for f in COST_FIGURES), "epochs",
                            "constraints", "run", "note"], rows)


def study_note(study: optuna.Study, counts: dict[str, int], best) -> str:
    """The parent run's description: the answer first, in one or two lines."""
    tally = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    if best is None:
        return f"Study '{study.study_name}' ({tally}): no best trial yet."
    values = ", ".join(f"{v:.4g}" for v in best.values)
    cost = ", ".join(f"{f.show(best.user_attrs[f.name], unit=True)}" for f in COST_FIGURES
                     if best.user_attrs.get(f.name) is not None)
    params = " ".join(f"{k}={_param(v)}" for k, v in best.params.items())
    return (f"**Best: trial {best.number}, value {values}** with {params}" + (f" ({cost})" if cost else "")
            + f".\n\nStudy '{study.study_name}': {tally}. Each trial is a run beneath this one; "
            "`trials.md` lists them all with their cost.")


def log_study_summary(run, study: optuna.Study) -> None:
    """On the study's parent ``run`` (a ``TrackedRun``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _log_study_summary(run, study)


def importances(study: optuna.Study, trials: int):
    """Optuna's importances plot, its title saying how many trials it rests on."""
    from optuna.visualization import matplotlib as vis

    axes = vis.plot_param_importances(study)
    axes.set_title(f"Hyperparameter importances (from {trials} complete trials)")
    return axes


def _log_study_summary(run, study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    run.log_text(trials_table(study), "trials.md")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    run.log_metrics({metrics.trials(k): v for k, v in counts.items()})
    best = None
    if complete and len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # every complete trial is infeasible
            best = None
    run.set_tags({"mlflow.note.content": study_note(study, counts, best)})
    if not complete:
        return
    plots = []
    if len(study.directions) == 1:
        if best is not None:
            run.set_tags({"best.trial": best.number, **{f"best.{k}": _param(v) for k, v in best.params.items()}})
            run.log_metrics({metrics.STUDY_BEST_VALUE: best.value} | {
                metrics.best(f.name): best.user_attrs.get(f.name) for f in COST_FIGURES})
        plots.append(("optimization_history.png", lambda: vis.plot_optimization_history(study)))
        if len(complete) >= MIN_TRIALS_FOR_IMPORTANCES and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            plots.append(("param_importances.png", lambda: importances(study, len(complete))))
        else:
            run.log_text(f"Parameter importances are drawn from {MIN_TRIALS_FOR_IMPORTANCES} complete trials "
                         f"on; this study has {len(complete)}.", "param_importances.txt")
    else:
        front = study.best_trials
        rows = [[str(t.number), str(t.values), str(t.params)] for t in front]
        run.log_text(tables.markdown(["trial", "values", "params"], rows), "pareto_front.md")
        run.set_tags({"pareto.trials": ",".join(str(t.number) for t in front)})
        plots.append(("pareto_front.png", lambda: vis.plot_pareto_front(study)))
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in plots:
            try:
                axes = make()
            except (ValueError, RuntimeError) as error:  # e.g. importances of a constant space
                run.log_text(f"{name}: not drawn: {error}", f"{name}.txt")
                continue
            figure = getattr(axes, "figure", None) or plt.gcf()
            figure.tight_layout()
            figure.savefig(Path(tmp) / name, dpi=100)
            plt.close(figure)
            run.log_file(Path(tmp) / name)
