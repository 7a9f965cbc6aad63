"""The run config's dataclasses (trainer/run_config.py) are the one place of its keys: every
setting has a default, a type and a help line; the YAML layer's DEFAULTS and RULES, the free-form
sections and ``train --help`` derive from them; the typed view of every preset builds and
round-trips; the Conformer's settings have one set of defaults."""

from __future__ import annotations

import dataclasses
import glob
import inspect
import os
import typing

import pytest

from avbalance.errors import UserError
from avbalance.ranges import Allowed, setting
from tests.conftest import REPO
from trainer.config import DEFAULTS, FREE_FORM, RULES, load_config, merge
from trainer.data_config import DataConfig
from trainer.run_config import (ModelConfig, OptimConfig, RunConfig, TrainConfig, as_run_config, defaults, free_form,
                                leaves, rules, settings_help)

SECTIONS = (RunConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig)
PRESETS = sorted(glob.glob(os.path.join(REPO, "trainer", "configs", "*.yaml")))


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_has_a_default_a_type_and_help(cls):
    hints = typing.get_type_hints(cls)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    for f in dataclasses.fields(cls):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
        assert f.name in hints, f.name
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f.name
        allowed = f.metadata.get("allowed")
        assert allowed is None or isinstance(allowed, Allowed), f.name


def test_the_sections_of_a_run():
    sections = {f.name: f.metadata.get("section") for f in dataclasses.fields(RunConfig)}
    assert sections == {"name": None, "seed": None, "data": DataConfig, "model": ModelConfig, "balancing": None,
                        "optim": OptimConfig, "train": TrainConfig}
    assert "crop_scale" not in {f.name for f in dataclasses.fields(DataConfig)}  # not a setting
    assert "shards" not in DEFAULTS["data"]  # recorded by train, not set by the user


def test_defaults_rules_and_free_form_derive_from_the_dataclasses():
    assert DEFAULTS == defaults() and RULES == rules() and FREE_FORM == free_form()
    assert FREE_FORM == {("model", "encoders"), ("model", "fusion"), ("balancing",), ("data", "modalities")}

    def flat(node, path=()):
        for k, v in node.items():
            if isinstance(v, dict) and (*path, k) not in FREE_FORM:
                yield from flat(v, (*path, k))
            else:
                yield (*path, k)
    assert list(flat(DEFAULTS)) == [path for path, _ in leaves()]  # same keys, same order (config.yaml's)
    assert set(RULES) <= {".".join(path) for path, _ in leaves()}
    # Built from the defaults, the typed view is the dataclasses' own defaults.
    assert RunConfig.from_dict(DEFAULTS) == RunConfig()


def test_a_field_added_to_a_dataclass_is_a_key_with_its_default_and_range():
    extended = dataclasses.make_dataclass(
        "Extended", [("extra", int, setting(3, "a new setting", Allowed(lo=1)))], bases=(OptimConfig,),
        frozen=True, kw_only=True)
    assert list(defaults(extended)) == [*DEFAULTS["optim"], "extra"] and defaults(extended)["extra"] == 3
    assert rules(extended)["extra"] == Allowed(lo=1)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_the_typed_view_of_every_preset_builds_and_round_trips(path):
    cfg = load_config(path)
    run = RunConfig.from_dict(cfg)
    assert run.optim.lr == cfg["optim"]["lr"] and run.data.batch_size == cfg["data"]["batch_size"]
    assert run.model.encoders == cfg["model"]["encoders"] and run.balancing == cfg["balancing"]
    assert RunConfig.from_dict(dataclasses.asdict(run)) == run
    assert as_run_config(run) is run


def test_the_typed_view_resolves_what_the_loader_needs():
    run = RunConfig.from_dict(load_config(None, ["data.exclude_quality=[silent]"]))
    assert run.data.frame_sampling == "consecutive" and run.data.exclude_quality == ("silent",)
    assert RunConfig.from_dict(load_config(None, ["data.frame_sampling=spread"])).data.frame_sampling == "spread"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optim.lr = 1.0  # type: ignore[misc]


def test_from_dict_fills_missing_keys_drops_retired_ones_and_refuses_unknown_ones():
    # An older run's config: keys added since take their defaults; a retired key is dropped.
    run = RunConfig.from_dict({"data": {"batch_size": 8, "eval_batch_size": 32, "shards": "/s"}, "optim": {"lr": 0.5}})
    assert run.data.batch_size == 8 and run.data.shards == "/s" and run.optim.lr == 0.5
    assert run.train == TrainConfig() and run.model == ModelConfig()
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'; known keys here: clip_grad, lr, "):
        RunConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'"):
        merge(DEFAULTS, {"optim": {"lrr": 1}})  # the YAML layer says the same


def test_train_help_lists_every_key_with_its_default():
    import cli

    parser = cli.build_parser()
    train = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    text = " ".join(train.format_help().split())
    for key, what in settings_help():
        assert " ".join(f"{key}: {what}".split()) in text
    assert "optim.lr=0.001: a number > 0;" in text and "train.device=auto: one of auto, cpu, cuda;" in text


def test_the_conformer_settings_have_one_set_of_defaults():
    from trainer.encoders import ENCODERS
    from trainer.encoders.conformer import ConformerSettings

    settings = {f.name: f.default for f in dataclasses.fields(ConformerSettings)}
    assert list(settings) == ["d_model", "n_blocks", "n_heads", "ff_mult", "conv_kernel", "dropout"]
    for name in ("face_conformer", "wav2vec2_conformer"):
        params = inspect.signature(ENCODERS.get(name)).parameters
        assert {k: params[k].default for k in settings} == settings, name  # flat options, the dataclass's defaults
        assert "conformer" not in params
    enc = ENCODERS.get("face_conformer")(in_dim=8, d_model=16, n_blocks=2, n_heads=2, conv_kernel=7)
    assert enc.out_dim == 16 and len(enc.pooler.conformer.blocks) == 2
    assert enc.pooler.conformer.blocks[0].conv.depthwise.kernel_size == (7,)
    with pytest.raises(TypeError):
        ENCODERS.get("face_conformer")(dmodel=16)
