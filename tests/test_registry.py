"""Registries: every registered stage builds by name and states its contract; a name is written
once, in the decorator, and every shipped registry agrees with its classes' names."""

import dataclasses
import importlib
import pkgutil

import pytest

from avbalance.errors import UserError
from avbalance.registry import Registry
from pipelines.config import PreprocessConfig
from pipelines.stages.base import STAGES, stable_hash
import pipelines.runner  # noqa: F401  (imports every stage module)


def test_every_pipeline_stage_is_registered():
    assert STAGES.names() == ["audio", "face_features", "faces", "flow", "frames", "pack"]


@pytest.mark.parametrize("name", STAGES.names())
def test_stage_contract(name):
    stage = STAGES.get(name)
    assert stage.name == name and isinstance(stage.version, int) and isinstance(stage.inputs, tuple)
    config = getattr(PreprocessConfig(root=".", out="."), name)
    assert dataclasses.is_dataclass(config)


def test_stage_keys_change_with_config_version_and_input():
    frames = STAGES.get("frames")
    from pipelines.stages.frames import FramesConfig

    base = frames(FramesConfig()).key({"video": "a"})
    assert base == frames(FramesConfig()).key({"video": "a"})
    assert base != frames(FramesConfig(jpeg_quality=80)).key({"video": "a"})
    assert base != frames(FramesConfig()).key({"video": "b"})
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown stage"):
        STAGES.get("warp")


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
