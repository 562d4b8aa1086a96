"""Loading ml_collections configs: `path.py[:arg]` plus `--config.a.b=value` overrides.

Every config file defines `get_config(arg: str | None = None) -> ConfigDict`. The
command line goes through ml_collections' config flags, so an unknown field or a
value of the wrong type stops with an error that names the field.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(ValueError):
    """A config file, variant or override that cannot be applied."""


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Defines --config (with --config.<field>=value overrides) for an absl program."""
    return config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with a variant: configs/demo.py:tiny.",
        flag_values=flag_values, lock_config=True,
    )


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `spec` ("configs/demo.py" or "configs/demo.py:tiny") and applies
    overrides given as command-line strings ("--config.train.steps=10" or
    "train.steps=10")."""
    fv = flags.FlagValues()
    holder = define_config_flag(fv)
    argv = ["glipjax", f"--config={spec}"]
    for item in overrides:
        item = item if item.startswith("--") else f"--config.{item}"
        argv.append(item)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return holder.value
