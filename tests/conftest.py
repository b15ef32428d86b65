import pytest

from tbptt_exp.core.device import prepare_tensorflow

prepare_tensorflow()  # before any test module imports TensorFlow, as the entry points do


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest.ini) spreads the fast tests over every core; the slow ones run in
    this process alone: they compare throughput at equal wall time and read allocator peaks
    that a neighbour's load moves."""
    return None if config.option.markexpr == "not slow" else 0


@pytest.fixture(scope="session", autouse=True)
def hydra_registered():
    """What ``python -m tbptt_exp`` registers with Hydra before composing any config."""
    from tbptt_exp.app.hydra_app import register_configs

    register_configs()
