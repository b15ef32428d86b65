import pytest

from tbptt_exp.core.device import prepare_tensorflow

prepare_tensorflow()  # before any test module imports TensorFlow, as the entry points do


@pytest.fixture(scope="session", autouse=True)
def hydra_registered():
    """What ``python -m tbptt_exp`` registers with Hydra before composing any config."""
    from tbptt_exp.app.hydra_app import register_configs

    register_configs()
