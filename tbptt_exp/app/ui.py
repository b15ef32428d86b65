"""Where a run opens in the MLflow UI: the address printed after every run and sweep."""

from __future__ import annotations

from tbptt_exp.app.stores import mask_credentials

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
