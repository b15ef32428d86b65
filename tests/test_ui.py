"""What a person sees: sweep parents that summarise, grouped metric names, params a task
reads, links into the MLflow UI, a progress bar on a terminal and a quiet console."""

import dataclasses
import io

import pytest

from tbptt_exp.app.console import Progress, verbose_requested
from tbptt_exp.app.jobs import run_params
from tbptt_exp.app.settings import NightlyConfig, RunConfig
from tbptt_exp.app.sweep import summary as sweep_summary
from tbptt_exp.app.sweep.summary import results_table
from tbptt_exp.app.sweep.sweep import JobResult
from tbptt_exp.app.tracking.ui import run_url, ui_base
from tbptt_exp.core.measure import FIGURES, mlflow_names
from tbptt_exp.core.train import EpochMetrics, RunResult


def test_every_epoch_figure_has_a_grouped_mlflow_name_and_none_repeats():
    fields = {f.name for f in dataclasses.fields(EpochMetrics)} - {"epoch"}
    assert fields <= set(FIGURES)  # a new figure needs a registry entry before it can be logged
    assert {"compile_time_s", "padding_waste", "num_params"} <= {f.name for f in dataclasses.fields(RunResult)} & set(FIGURES)
    names = [f.mlflow for f in FIGURES.values()]
    assert len(names) == len(set(names))
    assert all("/" in name for name in names)
    m = EpochMetrics(1, 2.0, 1.5, 1000.0, 1100.0, 50.0, 12.0, 900.0, 3.0, 1.0, 2.1)
    logged = mlflow_names(m.figures())
    assert logged["loss/val"] == 1.5 and logged["memory/allocator_peak_mb"] == 12.0
    with pytest.raises(KeyError):
        mlflow_names({"not_a_figure": 1.0})


def test_a_training_runs_chart_view_opens_on_its_loss_curves():
    """MLflow's run page draws one section per name prefix, in alphabetical order: the first
    section of a training run is ``loss/`` (its curves), not a single-valued figure."""
    training = {f.mlflow.split("/")[0] for f in FIGURES.values() if not f.mlflow.startswith("batch/")}
    assert min(training) == "loss", sorted(training)


def test_a_training_run_records_the_settings_training_reads_and_a_batch_finder_run_its_own():
    train = run_params(RunConfig())
    assert "model.units" in train and "trainer.precision" in train and "batch_size" in train
    assert not [k for k in train if k.startswith(("tracking.", "batch_finder.", "nightly.", "task", "verbose"))]
    finder = run_params(RunConfig(task="max_batch"))
    assert "batch_finder.headroom" in finder and "k" in finder
    assert "batch_size" not in finder and "trainer.epochs" not in finder and "objective" not in finder
    nightly = run_params(RunConfig(nightly=NightlyConfig(record=True)))
    assert "nightly.rounds" in nightly  # a nightly entry is judged by these


def test_a_sweep_is_named_after_what_it_swept_and_keeps_where_it_records_out():
    overrides = ["k=10,25,50", "trainer.epochs=1", "tracking.uri=sqlite:////tmp/x.db",
                 "hydra.job.env_set.TBPTT_EXP_PARENT_RUN_ID=abc", "~nightly.thresholds.peak_memory_mb"]
    swept, fixed = sweep_summary.settings(overrides, {})
    assert swept == {"k": "10,25,50"}
    assert fixed == {"trainer.epochs": "1", "nightly.thresholds.peak_memory_mb": "(deleted)"}
    assert sweep_summary.name(swept, fixed, "train", None) == "k=10,25,50"

    swept, fixed = sweep_summary.settings(["sweep=max_batch", "k=10,25", "device.memory_budget_mb=300"], {"k": "10,25,50"})
    assert swept == {"k": "10,25"}  # the command line overrides the preset's list
    assert sweep_summary.name(swept, fixed, "max_batch", 300.0) == "max_batch k=10,25 budget 300 MB"
    swept, fixed = sweep_summary.settings(["sweep=max_batch", "k=25", "device.memory_budget_mb=300"], {"k": "10,25,50"})
    assert swept == {"k": "25"} and "k" not in fixed  # one value on the command line: the sweep ran k=25 only
    assert sweep_summary.name(swept, fixed, "max_batch", 300.0) == "max_batch k=25 budget 300 MB"


def test_the_results_table_labels_jobs_by_their_swept_values_and_the_best_job_wins_by_direction():
    jobs = [(["k=10", "trainer.epochs=1", "tracking.uri=sqlite:////tmp/x.db"],
             JobResult([2.0], "r1", {"val_loss": 2.0, "tokens_per_s": 900.0})),
            (["k=25", "trainer.epochs=1", "tracking.uri=sqlite:////tmp/x.db"],
             JobResult([1.5], "r2", {"val_loss": 1.5, "tokens_per_s": 800.0})),
            (["k=50", "trainer.epochs=1", "tracking.uri=sqlite:////tmp/x.db"], None)]
    swept = {"k": "10,25,50"}
    table = results_table(jobs, swept)
    assert "| k=25 | FINISHED |" in table and "| k=50 | FAILED |" in table and "tracking.uri" not in table
    values, tags = sweep_summary.summary_metrics(jobs, "val_loss", swept)
    assert values["best/val_loss"] == 1.5 and tags == {"best.settings": "k=25", "best.run_id": "r2"}
    assert values["sweep/failed_jobs"] == 1 and values["best/tokens_per_s"] == 800.0
    fast = [(o, dataclasses.replace(out, values=[out.summary["tokens_per_s"]])) for o, out in jobs[:2]]
    assert sweep_summary.summary_metrics(fast, "tokens_per_s", swept)[1]["best.settings"] == "k=10"  # maximised


def test_sweep_plots_draw_every_job_against_each_swept_setting(tmp_path):
    jobs = [([f"k={k}", f"padding={p}"], JobResult([1.0 + k / 100], f"r{k}{p}",
                                                   {"tokens_per_s": 1000.0 * k, "peak_memory_mb": 10.0 + k}))
            for k in (10, 25, 50) for p in ("dummy", "pack")]
    paths = sweep_summary.plots(jobs, {"k": "10,25,50", "padding": "dummy,pack"}, "val_loss", tmp_path)
    assert [p.name for p in paths] == ["sweep_k.png", "sweep_padding.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_links_open_the_run_in_the_ui_without_credentials():
    assert ui_base("sqlite:////tmp/m.db") == "http://127.0.0.1:5000"
    assert ui_base("https://alice:s3cret@mlflow.example.com:5000/") == "https://mlflow.example.com:5000"
    assert run_url("http://host:5000", "7", "abc") == "http://host:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(capsys):
    tty = Terminal()
    bar = Progress(stream=tty)
    for done in (10, 50, 100):
        bar(1, done, 100)
    assert bar.bar.n == 100
    bar.close()
    assert "epoch 1" in tty.getvalue() and "batch" in tty.getvalue()  # tqdm redraws at most every 0.1 s

    log = io.StringIO()
    lines = Progress(stream=log, every_s=0.0)
    lines(2, 30, 100)
    assert "epoch 2: 30/100 batches" in capsys.readouterr().out and log.getvalue() == ""


def test_verbose_is_read_from_the_command_line_before_anything_loads():
    assert not verbose_requested(["k=10"])
    assert verbose_requested(["k=10", "verbose=true"])
    assert not verbose_requested(["verbose=true", "verbose=false"])


def frontier_row(**given):
    """A frontier row with what a test sets apart, the rest as an answer with nothing measured."""
    from tbptt_exp.app.batch.frontier import FrontierRow

    unset = {"max_batch_size": 0, "recommended_batch_size": 0, "peak_memory_mb": None, "tokens_per_s": None,
             "tokens_per_s_spread": None, "probes": 0, "budget_mb": None}
    return FrontierRow(**unset | given)


def test_the_frontier_tells_precisions_apart():
    from tbptt_exp.app.batch.frontier import line_label, table

    rows = [frontier_row(k=25, precision=p, unroll="auto", job=str(i), max_batch_size=b)
            for i, (p, b) in enumerate((("float32", 256), ("mixed_bfloat16", 384)))]
    assert [line_label(r, rows) for r in rows] == ["k=25 precision=float32", "k=25 precision=mixed_bfloat16"]
    assert "| 25 | mixed_bfloat16 | auto | 384 |" in table(rows)
    assert line_label(rows[0], rows[:1]) == "k=25"


def test_a_frontier_parent_states_the_answer_per_k_and_flags_a_ceiling():
    from tbptt_exp.app.batch.frontier import note

    rows = [frontier_row(k=25, max_batch_size=48, recommended_batch_size=40, peak_memory_mb=42.25,
                         tokens_per_s=23456.0, tokens_per_s_spread=100.0, probes=6, budget_mb=50.0,
                         max_is_ceiling=False, job="1", useful_batch_size=24, critical_batch_size=41,
                         noise_measured="after 20 s of training at batch 40", goodput=20000.0),
            frontier_row(k=10, max_batch_size=224, recommended_batch_size=200, peak_memory_mb=30.0,
                         tokens_per_s=51000.0, tokens_per_s_spread=None, probes=4, budget_mb=50.0,
                         max_is_ceiling=True, job="0")]
    text = note(rows)
    assert text.startswith("**Largest and useful batch per k, within a budget of 50 MB:**")
    k10, k25 = [line for line in text.splitlines() if line.startswith("- k=")]
    assert k10.startswith("- k=10: largest 224 (every probe fitted") and "raise batch_finder.max_batch_size" in k10
    assert "useful unknown (no gradient noise scale)" in k10
    assert k25 == ("- k=25: largest 48, recommended 40, useful 24 (goodput 20,000 tokens/s; critical batch ≈ 41 "
                   "streams, its noise scale after 20 s of training at batch 40), 23,456 tokens/s, 42.2 MB")


def test_a_frontier_round_trips_through_its_cache_file_with_its_probes_typed():
    import json

    from tbptt_exp.app.batch.finder import Frontier, Probe

    found = Frontier(25, 48, 40, 42.25, 23456.0, 100.0, probes=2, budget_mb=50.0,
                     probe_log=[Probe(32, "ok", peak_memory_mb=30.0, phases={"training": 1.5}), Probe(64, "budget")])
    again = Frontier.from_dict(json.loads(json.dumps(found.to_dict())))
    assert again == found and isinstance(again.probe_log[1], Probe) and again.probe_log[1].fits is False


def test_a_grid_parent_states_the_best_job_with_its_cost():
    jobs = [(["k=10"], JobResult([2.0], "r1", {"val_loss": 2.0, "tokens_per_s": 900.0, "peak_memory_mb": 30.0})),
            (["k=25"], JobResult([1.5], "r2", {"val_loss": 1.5, "tokens_per_s": 800.0, "peak_memory_mb": 40.0})),
            (["k=50"], None)]
    swept = {"k": "10,25,50"}
    metrics, tags = sweep_summary.summary_metrics(jobs, "val_loss", swept)
    text = sweep_summary.grid_note(jobs, swept, "val_loss", metrics, tags)
    assert text.startswith("**Best val_loss 1.5000 with k=25** (800 tokens/s, 40.0 MB) of 3 jobs, 1 failed")
    points = sweep_summary.by_swept_value(jobs, swept)
    assert points == {10: {"by_k/val_loss": 2.0, "by_k/tokens_per_s": 900.0, "by_k/peak_memory_mb": 30.0},
                      25: {"by_k/val_loss": 1.5, "by_k/tokens_per_s": 800.0, "by_k/peak_memory_mb": 40.0}}
    assert sweep_summary.by_swept_value(jobs, {"k": "10,25", "padding": "dummy,pack"}) == {}  # steps would collide
