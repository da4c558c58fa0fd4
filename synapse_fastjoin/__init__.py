"""synapse-fastjoin: partial-state ("faster") remote room joins for Synapse.

Enable it in homeserver.yaml::

    modules:
      - module: synapse_fastjoin.FastJoinModule
        config: {}

`FastJoinModule` is imported lazily so that the command-line tool (which
patches Synapse) works without importing Synapse itself.
"""

from typing import Any

__version__ = "0.7.0"

__all__ = ["FastJoinModule", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "FastJoinModule":
        from synapse_fastjoin.module import FastJoinModule

        return FastJoinModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
