"""The Hydra config tree composes, matches the schema, and bad input fails in one line."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tbptt_exp.app.hydra_app import to_experiment
from tbptt_exp.app.preflight.combinations import GROUPS, group_options
from tbptt_exp.app.preflight.preflight import preflight
from tbptt_exp.app.settings import PRESETS, RunConfig
from tbptt_exp.core.config import ConfigError, ModelConfig, flatten, seed_model
from tbptt_exp.paths import conf_dir


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


def test_default_config_is_the_schema_defaults(hydra_conf):
    experiment = to_experiment(compose("config"))
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        assert getattr(experiment, f.name) == getattr(defaults, f.name), f.name


@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in group_options(g)]
)
def test_every_group_option_composes_and_validates(hydra_conf, group, option):
    experiment = to_experiment(compose("config", overrides=[f"{group}={option}"]))  # validates
    chosen = getattr(experiment, group)
    assert chosen == PRESETS[group][option](), f"{group}={option}"  # the preset, every setting of it
    if group == "data":
        assert chosen.name == option


def test_seed_preset_is_the_questions_model():
    assert seed_model() == ModelConfig(
        preset="seed", embedding_dim=200, units=512, layers=1, dropout=0.5,
        activation="relu", recurrent_activation="sigmoid", mask_zero=True, softmax_output=True,
    )


@pytest.mark.parametrize("preset", group_options("sweep"))
def test_sweep_presets_compose(hydra_conf, preset):
    cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, f"{preset} sweeps nothing"


@pytest.mark.parametrize("preset", group_options("sweep"))
def test_every_combination_of_a_sweep_preset_is_valid(preset):
    preflight(["-m", f"sweep={preset}"])


def test_preflight_checks_the_presets_values():
    with pytest.raises(ConfigError, match="k=50 .*data.sequence_length=30"):
        preflight(["-m", "sweep=k_batch", "data.sequence_length=30"])  # the preset sweeps k=10,25,50
    preflight(["-m", "sweep=k_batch", "data.sequence_length=30", "k=10"])  # the command line wins


def test_device_presets_cap_gpu_memory(hydra_conf):
    cfg = to_experiment(compose("config", overrides=["device=k2200"]))
    assert cfg.device.memory_limit_mb == 4096 and not cfg.device.memory_growth


@pytest.mark.parametrize(
    "argv, setting",
    [
        (["k=0"], "k"),
        (["k=abc"], "k"),
        (["batch_size=-1"], "batch_size"),
        (["padding=zeros"], "padding"),
        (["reset=sometimes"], "reset"),
        (["engine=torch"], "engine"),
        (["model=gru"], "model"),
        (["data.path=/no/such/dir"], "data.path"),
        (["k=500"], "k"),  # longer than data.sequence_length
        (["engine=keras_fit", "padding=pack"], "padding"),
        (["trainer.epoch=3"], "trainer.epoch"),
        (["-m", "k=10,25,0"], "k"),  # the bad value of a sweep is found before any job runs
        (["-m", "engine=graph,keras_fit", "padding=dummy,pack"], "padding"),
        (["-m", "sweep=nope"], "sweep"),
        (["k=10,25"], "k"),  # a sweep without -m
        (["k=("], "override"),
        (["-m", "sweep=tune", "hydra.sweeper.sampler=bayes"], "hydra.sweeper.sampler"),
        (["-m", "sweep=tune", "hydra.sweeper.pruner=asha"], "hydra.sweeper.pruner"),
        (["-m", "sweep=tune", "objective='val_loss,tokens_per_s'"], "hydra.sweeper.direction"),
        (["-m", "sweep=tune", "objective=accuracy"], "objective"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_setting(argv, setting):
    with pytest.raises(ConfigError) as err:
        preflight(argv)
    assert err.value.setting == setting
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{setting}=")


def test_good_sweeps_pass():
    preflight(["-m", "k=10,25,50", "batch_size=8,16"])
    preflight(["--help"])  # Hydra's own commands are left alone


def test_every_config_leaf_becomes_a_dotted_param(hydra_conf):
    params = flatten(OmegaConf.to_container(compose("config"), resolve=True))
    for name in ("k", "batch_size", "padding", "reset", "seed", "model.units", "data.name", "trainer.epochs"):
        assert name in params
