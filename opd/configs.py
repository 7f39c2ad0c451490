"""Loading the ml_collections config files under experiments/ (plain files, not a package)."""

import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a config file, from "path/to/file.py[:variant]" (the launcher's
    --config syntax), e.g. `load_config("experiments/quickstart.py:tiny")` in a notebook."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}")
    mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(variant)


def sibling_config(here: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `name` in the folder of `here` (a config file's
    `__file__`), so that one config can build on another."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(here)), name) + ":" + variant)
