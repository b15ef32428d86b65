"""Where a run opens in the MLflow UI: the address printed after every run and sweep."""

from __future__ import annotations

import base64
import json
import time
import zlib

from tbptt_exp.app.tracking.metrics import best, column
from tbptt_exp.app.tracking.stores import mask_credentials
from tbptt_exp.core.measure import MAX_BATCH, PEAK_MEMORY, REAL_TOKENS, RECOMMENDED_BATCH, VAL_ACCURACY, VAL_LOSS

LOCAL_UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store by default
# MLflow 3's UI opens an experiment in its GenAI view ("Evaluations", runs typed "Eval") unless
# the URL or the experiment's kind tag says otherwise; these runs belong in the training view.
ML_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_command(uri: str) -> str | None:
    """The command that serves a local store's UI; None for a tracking server."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {mask_credentials(uri)}"


def ui_base(uri: str) -> str:
    """The UI's address: the tracking server itself (credentials left out), or ``mlflow ui``'s."""
    if not uri.startswith(("http://", "https://")):
        return LOCAL_UI
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}".rstrip("/")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A URL that opens straight on a run in the model-training view (a sweep's parent shows
    its children beneath)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


# A saved view of the runs table (MLflow >= 3.15: "Views" on the Runs page), stored as an
# experiment tag as MLflow's UI stores it: the columns that answer "which k, which batch,
# at what cost" instead of Dataset, Source and Models.
VIEW_ID = "tbptt-exp-answer"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "tbptt-exp: the answer"
VIEW_COLUMNS = {
    "experiment": (*map(column, (VAL_LOSS.mlflow, best(VAL_LOSS.name), VAL_ACCURACY.mlflow, REAL_TOKENS.mlflow,
                                 best(REAL_TOKENS.name), PEAK_MEMORY.mlflow, best(PEAK_MEMORY.name))),
                   "params.`k`", "params.`batch_size`"),
    "max_batch": (*map(column, (MAX_BATCH.mlflow, RECOMMENDED_BATCH.mlflow, REAL_TOKENS.mlflow, PEAK_MEMORY.mlflow)),
                  "params.`k`"),
}


def saved_view(columns: tuple[str, ...]) -> str:
    """The experiment tag's value: MLflow's envelope, its state deflated and base64-encoded."""
    state = json.dumps({"selectedColumns": list(columns)}, separators=(",", ":")).encode()
    blob = "deflate;" + base64.b64encode(zlib.compress(state)).decode("ascii")
    return json.dumps({"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": blob}, separators=(",", ":"))


def view_url(uri: str, experiment_id: str) -> str:
    """The runs table in the model-training view, on the saved view's columns."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}&{ML_VIEW}"
