"""``avbalance.registry.Registry``: a name is written once, in the decorator, and the shipped
registries agree with their classes' names."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from avbalance.errors import UserError
from avbalance.registry import Registry


def test_a_registered_class_gets_its_name_and_a_conflict_is_refused():
    things: Registry = Registry("thing")

    @things.register("alpha")
    class Alpha:
        pass

    assert Alpha.name == "alpha" and things.get("alpha") is Alpha
    with pytest.raises(ValueError, match="registered twice"):
        things.register("alpha")(type("Other", (), {}))
    with pytest.raises(ValueError, match="names itself 'gamma'"):
        things.register("beta")(type("Beta", (), {"name": "gamma"}))
    with pytest.raises(UserError, match="unknown thing 'delta'; known: alpha"):
        things.get("delta")


def test_every_shipped_registry_names_its_classes_as_registered():
    import pipelines.recipes
    from experiments.engines.base import SWEEP_ENGINES
    from pipelines.engines.base import ENGINES
    from pipelines.recipes.base import RECIPES
    from pipelines.stages.base import STAGES
    from trainer.balancing import BALANCERS
    from trainer.encoders import ENCODERS
    from trainer.fusion import FUSIONS

    for package in ("pipelines.recipes", "pipelines.stages", "pipelines.engines", "experiments.engines"):
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{module.name}")
    assert pipelines.recipes and len(RECIPES.names()) >= 6
    for registry in (RECIPES, STAGES, ENGINES, SWEEP_ENGINES, BALANCERS, ENCODERS, FUSIONS):
        for name in registry.names():
            assert registry.get(name).name == name, (registry.kind, name)
