"""The module's configuration, as given under `config:` in homeserver.yaml.

Every key is validated: an unknown key or a value of the wrong type stops
Synapse's start-up with a `ConfigError` that names the key.
"""

from typing import Any, Mapping

import attr

from synapse.config._base import ConfigError

# Path prefix Synapse puts in front of our keys in its error messages.
_CONFIG_PATH = ("modules", "synapse_fastjoin.FastJoinModule", "config")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FastJoinConfig:
    """Validated configuration of `synapse_fastjoin.FastJoinModule`."""

    admin_api: bool = True
    """Serve the admin API under /_synapse/admin/v1/fastjoin/."""

    history_retention_days: int = 90
    """How long finished resyncs are kept in the history; 0 keeps them forever."""

    history_prune_interval_minutes: int = 60
    """How often expired history rows are deleted."""


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"'{key}' must be true or false, not {value!r}", path=_CONFIG_PATH + (key,)
        )
    return value


def _int(key: str, value: Any, minimum: int) -> int:
    # bool is a subclass of int in Python: `true` is not a number of days.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"'{key}' must be a whole number, not {value!r}", path=_CONFIG_PATH + (key,)
        )
    if value < minimum:
        raise ConfigError(
            f"'{key}' must be at least {minimum}, not {value}", path=_CONFIG_PATH + (key,)
        )
    return value


_PARSERS = {
    "admin_api": lambda key, v: _bool(key, v),
    "history_retention_days": lambda key, v: _int(key, v, 0),
    "history_prune_interval_minutes": lambda key, v: _int(key, v, 1),
}


def parse_config(raw: Mapping[str, Any] | None) -> FastJoinConfig:
    """Validate the module's config block and return it as a `FastJoinConfig`.

    Args:
        raw: the `config:` mapping from homeserver.yaml; None or {} for defaults.

    Raises:
        ConfigError: naming the first unknown or ill-typed key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"the module config must be a mapping, not {type(raw).__name__}",
            path=_CONFIG_PATH,
        )
    unknown = sorted(str(k) for k in raw if k not in _PARSERS)
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}'; known keys are: {', '.join(sorted(_PARSERS))}",
            path=_CONFIG_PATH + (unknown[0],),
        )
    return FastJoinConfig(**{key: _PARSERS[key](key, value) for key, value in raw.items()})
