"""``python -m tbptt_exp [overrides]``: check the settings, then hand over to Hydra.

Exit codes: 0 done; 2 a setting cannot work (one line on stderr), or a nightly baseline
cannot be used; 3 the batch-size search stopped on an error that is not out-of-memory;
4 a nightly figure regressed; 130 Ctrl-C; 143 SIGTERM.
"""

from __future__ import annotations

import sys

from tbptt_exp.app import signals


def main() -> None:
    from tbptt_exp.core.device import prepare_tensorflow

    prepare_tensorflow()
    signals.install()
    from tbptt_exp.app.console import error
    from tbptt_exp.app.hydra_app import main as hydra_main
    from tbptt_exp.app.hydra_app import register_configs
    from tbptt_exp.app.preflight import preflight
    from tbptt_exp.core.config import ConfigError

    register_configs()
    try:
        preflight(sys.argv[1:])
    except ConfigError as bad:
        error(str(bad))
        sys.exit(2)
    try:
        hydra_main()
    except KeyboardInterrupt:
        print(
            "tbptt-exp: stopped by " + ("SIGTERM" if signals.terminated() else "Ctrl-C")
            + "; the MLflow run was marked KILLED",
            file=sys.stderr,
        )
        sys.exit(143 if signals.terminated() else 130)
