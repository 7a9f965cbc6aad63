"""Corpus recipes, one module each, registered by name in ``RECIPES`` (see ``base.py``)."""

from __future__ import annotations

import importlib
import pkgutil

from pipelines.recipes.base import RECIPES, Recipe


def load_all() -> None:
    """Import every module of this package so that each recipe registers itself (a new
    corpus is one new file here, nothing else to edit). Recipe modules import media
    libraries inside functions only, so this stays cheap."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (a clear error naming the known ones)."""
    load_all()
    return RECIPES.get(name)


def recipe_names() -> list[str]:
    load_all()
    return RECIPES.names()


__all__ = ["RECIPES", "Recipe", "get_recipe", "load_all", "recipe_names"]
