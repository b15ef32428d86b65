"""Search-space syntax, sampler and pruner plug-ins (no training)."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tbptt_exp.app.study.search_space import distribution, make_pruner, make_sampler, search_space


@pytest.mark.parametrize(
    "line, expected",
    [
        ("k=choice(10, 25, 50)", CategoricalDistribution([10, 25, 50])),
        ("padding=choice(dummy, pack)", CategoricalDistribution(["dummy", "pack"])),
        ("k=range(10, 50, 10)", IntDistribution(10, 40, step=10)),  # 50 excluded, as in Hydra
        ("k=range(10, 51, 10)", IntDistribution(10, 50, step=10)),
        ("x=range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
        ("lr=interval(0.001, 0.1)", FloatDistribution(0.001, 0.1)),
        ("lr=tag(log, interval(0.0001, 0.1))", FloatDistribution(0.0001, 0.1, log=True)),
        ("units=int(interval(32, 512))", IntDistribution(32, 512)),
        ("units=tag(log, int(interval(32, 512)))", IntDistribution(32, 512, log=True)),
    ],
)
def test_search_space_syntax(line, expected):
    assert distribution(line) == expected


def test_plain_values_fix_a_parameter():
    space, fixed = search_space(["k=25", "batch_size=choice(8, 16)"])
    assert fixed == ["k=25"] and list(space) == ["batch_size"]


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "nsgaii", "grid"])
def test_every_sampler_is_available(name):
    sampler = make_sampler(name, seed=0, space={"k": CategoricalDistribution([10, 25])})
    assert isinstance(sampler, optuna.samplers.BaseSampler)


def test_grid_sampler_needs_choices():
    with pytest.raises(ValueError, match="grid needs choice"):
        make_sampler("grid", 0, {"lr": FloatDistribution(0.1, 1.0)})


@pytest.mark.parametrize("name, kind", [("none", optuna.pruners.NopPruner), ("median", optuna.pruners.MedianPruner),
                                        ("hyperband", optuna.pruners.HyperbandPruner)])
def test_pruners(name, kind):
    assert isinstance(make_pruner(name, 1, 2), kind)


def test_unknown_plugin_names_say_what_exists():
    with pytest.raises(ValueError, match="use one of tpe, random"):
        make_sampler("bayes", 0, {})
    with pytest.raises(ValueError, match="use one of none, median, hyperband"):
        make_pruner("asha", 1, 1)
