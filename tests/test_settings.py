"""Settings check themselves as they are built: a bad value names the setting and what is allowed."""

import dataclasses

import pytest

from tbptt_exp.core.config import (
    CharsDataConfig,
    ConfigError,
    EngineConfig,
    ExperimentConfig,
    KeyRecallDataConfig,
    ModelConfig,
    TrainerConfig,
    validate,
)


def test_defaults_are_valid():
    validate(ExperimentConfig())
    validate(ExperimentConfig(data=KeyRecallDataConfig()))


def test_a_config_changed_in_place_is_checked_again_by_validate():
    cfg = ExperimentConfig()
    cfg.k = 0
    with pytest.raises(ConfigError, match=r"^k=0 is not allowed"):
        validate(cfg)


@pytest.mark.parametrize(
    "change, setting",
    [
        (lambda: {"k": 0}, "k"),
        (lambda: {"k": 201}, "k"),  # longer than data.sequence_length
        (lambda: {"batch_size": -3}, "batch_size"),
        (lambda: {"padding": "zeros"}, "padding"),
        (lambda: {"reset": "sometimes"}, "reset"),
        (lambda: {"data": CharsDataConfig(cut="words")}, "data.cut"),
        (lambda: {"data": CharsDataConfig(val_fraction=1.0)}, "data.val_fraction"),
        (lambda: {"data": KeyRecallDataConfig(num_keys=0)}, "data.num_keys"),
        (lambda: {"model": ModelConfig(units=0)}, "model.units"),
        (lambda: {"model": ModelConfig(dropout=1.5)}, "model.dropout"),
        (lambda: {"model": ModelConfig(activation="swish2")}, "model.activation"),
        (lambda: {"trainer": TrainerConfig(optimizer="lbfgs")}, "trainer.optimizer"),
        (lambda: {"trainer": TrainerConfig(learning_rate=0)}, "trainer.learning_rate"),
        (lambda: {"trainer": TrainerConfig(precision="float16")}, "trainer.precision"),
        (lambda: {"model": ModelConfig(unroll=1)}, "model.unroll"),  # 1 == True, but not a setting
        (lambda: {"model": ModelConfig(unroll="yes")}, "model.unroll"),
        (lambda: {"engine": EngineConfig("torch")}, "engine"),
        (lambda: {"engine": EngineConfig("keras_fit"), "padding": "pack"}, "padding"),
        (
            lambda: {"engine": EngineConfig("keras_fit"), "trainer": TrainerConfig(steps_per_execution=4)},
            "trainer.steps_per_execution",
        ),
    ],
)
def test_bad_values_name_the_setting_and_what_is_allowed(change, setting):
    """A config checks itself as it is built (Hydra builds it the same way, with ``OmegaConf.to_object``)."""
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(ExperimentConfig(), **change())
    message = str(err.value)
    assert err.value.setting == setting
    assert message.startswith(f"{setting}=") and "\n" not in message
    assert "use" in message  # says what to do instead


def test_a_config_survives_the_trip_to_a_probe_process_and_is_validated_there():
    import json

    from tbptt_exp.core.config import from_dict, to_dict

    cfg = ExperimentConfig(k=10, data=KeyRecallDataConfig(num_keys=3), model=ModelConfig(units=16))
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert from_dict(to_dict(ExperimentConfig())) == ExperimentConfig()
    with pytest.raises(ConfigError, match=r"^model.unit=16 is not allowed: use one of preset, embedding_dim"):
        from_dict(to_dict(cfg) | {"model": {"unit": 16}})
    with pytest.raises(ConfigError, match=r"^k=0 is not allowed"):
        from_dict(to_dict(cfg) | {"k": 0})
    with pytest.raises(ConfigError, match=r"^data='wiki' is not allowed: use one of chars, key_recall"):
        from_dict(to_dict(cfg) | {"data": {"name": "wiki"}})
