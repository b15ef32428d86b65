"""``python -m tbptt_exp [overrides]``: check the settings and the stores, then hand over to Hydra.

Exit codes: 0 done; 2 a setting cannot work (one line on stderr), or a nightly baseline
cannot be used; 3 the batch-size search stopped on an error that is not out-of-memory;
4 a nightly figure regressed or the nightly matrix has a gap; 130 Ctrl-C; 143 SIGTERM.
"""

from __future__ import annotations

import os
import sys

from tbptt_exp.app import signals


def main() -> None:
    signals.install()  # first: a SIGTERM during start-up ends as cleanly as one later
    try:
        _main()
    except KeyboardInterrupt:
        print(
            "tbptt-exp: stopped by " + ("SIGTERM" if signals.terminated() else "Ctrl-C")
            + "; open MLflow runs were marked KILLED",
            file=sys.stderr,
        )
        sys.exit(143 if signals.terminated() else 130)


def _main() -> None:
    from tbptt_exp.app.console import quiet_libraries, verbose_requested
    from tbptt_exp.core.device import prepare_tensorflow

    quiet_libraries(verbose_requested(sys.argv[1:]))  # before anything loads TensorFlow or MLflow
    prepare_tensorflow()
    # A tracking server that stops answering mid-run fails within seconds, not after
    # MLflow's default 7 retries with backoff (minutes); the start-up check is separate.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from tbptt_exp.app.console import error
    from tbptt_exp.app.hydra_app import main as hydra_main
    from tbptt_exp.app.hydra_app import register_configs
    from tbptt_exp.app.preflight import preflight
    from tbptt_exp.core.config import ConfigError

    register_configs()
    try:
        sys.argv[1:] = preflight(sys.argv[1:])  # store passwords move to the environment here
    except ConfigError as bad:
        error(str(bad))
        sys.exit(2)
    hydra_main()
