"""``python -m tbptt_exp [overrides]``: check the settings, then hand over to Hydra."""

from __future__ import annotations

import sys

from tbptt_exp import signals
from tbptt_exp.config import ConfigError


def main() -> None:
    signals.install()
    from tbptt_exp.preflight import preflight

    try:
        preflight(sys.argv[1:])
    except ConfigError as error:
        print(f"tbptt-exp: error: {error}", file=sys.stderr)
        sys.exit(2)

    from tbptt_exp.app import main as app_main

    try:
        app_main()
        from tbptt_exp import nightly

        sys.exit(nightly.exit_code())  # a regressed nightly run marks the night red
    except KeyboardInterrupt:
        print(
            "tbptt-exp: stopped by " + ("SIGTERM" if signals.terminated() else "Ctrl-C")
            + "; the MLflow run was marked KILLED",
            file=sys.stderr,
        )
        sys.exit(143 if signals.terminated() else 130)


if __name__ == "__main__":
    main()
