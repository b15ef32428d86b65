"""``python -m tbptt_exp [overrides]``: set the process up, then hand over to Hydra.

Exit codes: 0 done; 1 the training diverged, a grid job failed, a study stopped past its
failure rate or the tracking store failed mid-run (one line on stderr), or an unforeseen failure;
2 a setting cannot work (one line on stderr), or a nightly baseline cannot be used; 3 the
batch-size search stopped on an error that is not out-of-memory; 4 a nightly figure
regressed or the nightly matrix has a gap; 130 Ctrl-C; 143 SIGTERM.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tbptt_exp.app import signals
from tbptt_exp.app.console import Stopped, error, quiet_libraries, verbose_requested
from tbptt_exp.app.hydra_app import main as hydra_main
from tbptt_exp.app.hydra_app import register_configs
from tbptt_exp.app.preflight.hydra_errors import composition_error
from tbptt_exp.app.preflight.passwords import take_command_line_secrets, take_environment_secrets
from tbptt_exp.app.tracking.run import StoreFailed
from tbptt_exp.core.config import ConfigError
from tbptt_exp.core.device import prepare_tensorflow
from tbptt_exp.core.measure import Diverged


def main() -> None:
    signals.install()  # first: a SIGTERM during start-up ends as cleanly as one later
    try:
        run(sys.argv[1:])
        signals.check()  # an interrupt lost on its way (see signals) still ends the command as one
    except KeyboardInterrupt:
        stopped()
    except Exception:
        if not signals.received():
            raise
        stopped()  # raised after an interrupt, by it: a library it reached half-way (an import left half-done)


def stopped() -> NoReturn:
    """The line and exit code of a command a Ctrl-C (130) or SIGTERM (143) stopped."""
    signals.ignore()  # its runs and trials are ended: a further Ctrl-C must not turn the exit into a signal death
    print(
        "tbptt-exp: stopped by " + ("SIGTERM" if signals.terminated() else "Ctrl-C")
        + "; open MLflow runs were marked KILLED",
        file=sys.stderr,
    )
    sys.exit(143 if signals.terminated() else 130)


def run(argv: list[str]) -> None:
    """Hydra composes the config once; what it cannot compose, or what the preflight callback
    or the job refuses, ends here in one line with exit code 2."""
    quiet_libraries(verbose_requested(argv))  # before anything loads TensorFlow or MLflow
    prepare_tensorflow()
    # A tracking server that stops answering mid-run fails within seconds, not after
    # MLflow's default 7 retries with backoff (minutes); the start-up check is separate.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Hydra prints a composition error over several lines and exits 1; with this set it
    # raises the error, which is reported here as the one line that names the setting.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    try:
        check_modes(argv)
        take_environment_secrets()
        sys.argv[1:] = take_command_line_secrets(argv)  # a store password moves to the environment here
        signals.check()
        hydra_main()
    except ConfigError as bad:
        refuse(str(bad), 2)
    except (Diverged, Stopped, StoreFailed) as failed:  # its runs are recorded FAILED with this reason
        refuse(str(failed), 1)
    except (HydraException, OmegaConfBaseException) as bad:
        refuse(str(composition_error(bad, overrides(sys.argv[1:]))), 2)
    except Exception as failed:
        if type(failed).__name__ != "TerminatedWorkerError":  # joblib's (an optional launcher): by name
            raise
        codes = next((line for line in str(failed).splitlines() if "exit codes" in line), "").rstrip(".")
        refuse(f"a hydra/launcher=joblib worker process died ({codes or 'killed'}: killed, or out of host memory); "
               "the sweep stopped, and the runs it left open are closed at the next start", 1)


def refuse(message: str, code: int) -> NoReturn:
    """The one line and exit code of a refusal or failure; after a Ctrl-C or SIGTERM what was
    raised is its doing (a store build it cut short), and the command stops as interrupted."""
    signals.check()
    error(message)
    sys.exit(code)


# Hydra's modes, of which a command takes one (Hydra raises a ValueError with a traceback otherwise).
MODES = {"-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
         "-r": "--run", "--run": "--run", "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def check_modes(argv: list[str]) -> None:
    """At most one of Hydra's modes (``-m``, ``--cfg``, ``--info``...) per command, refused in one line."""
    given = sorted({MODES[arg] for arg in argv if arg in MODES})
    if len(given) > 1:
        raise ConfigError("command line", " ".join(given), "Hydra takes one of -m, --cfg, --info, --run and "
                                                           "--shell-completion at a time; drop all but one")


# Hydra's options that take a value as the next argument (``--cfg job``, ``-cn NAME``...).
VALUED_OPTIONS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                  "-cd", "--config-dir", "--experimental-rerun")


def overrides(argv: list[str]) -> list[str]:
    """The override arguments of a command line, Hydra's options and their values left out."""
    values = {i + 1 for i, arg in enumerate(argv) if arg in VALUED_OPTIONS}
    return [arg for i, arg in enumerate(argv) if not arg.startswith("-") and i not in values]
