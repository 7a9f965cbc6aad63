"""Registries: every registered stage builds by name and states its contract."""

import dataclasses

import pytest

from avbalance.errors import UserError
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
