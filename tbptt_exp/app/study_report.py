"""A finished study's summary on its MLflow parent run: best trial or Pareto front,
all trials as a table, the optimisation history and the parameter importances."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tbptt_exp.app import tables


def trials_table(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        values = ", ".join(f"{v:.4g}" for v in t.values) if t.values else ""
        constraints = ", ".join(f"{k}={v:.4g}" for k, v in t.constraints.items())
        note = t.user_attrs.get("fail_reason", "")
        rows.append([str(t.number), t.state.name, values, *(str(t.params.get(k, "")) for k in keys), constraints, note])
    return tables.markdown(["trial", "state", "values", *keys, "constraints", "note"], rows)


def log_study_summary(run, study: optuna.Study) -> None:
    """On the study's parent ``run`` (a ``TrackedRun``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _log_study_summary(run, study)


def _log_study_summary(run, study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    run.log_text(trials_table(study), "trials.md")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    run.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    if not complete:
        return
    plots = []
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # every complete trial is infeasible
            best = None
        if best is not None:
            run.set_tags({"best.trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
            run.log_metrics({"best_value": best.value})
        plots.append(("optimization_history.png", lambda: vis.plot_optimization_history(study)))
        if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            plots.append(("param_importances.png", lambda: vis.plot_param_importances(study)))
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
