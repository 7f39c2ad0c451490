"""Helpers for the ml_collections config files under experiments/ (plain files, not a package)."""

import importlib.util
import os

import ml_collections


def sibling_config(here: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `name` in the folder of `here` (a config file's
    `__file__`), so that one config can build on another."""
    path = os.path.join(os.path.dirname(os.path.abspath(here)), name)
    spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)
