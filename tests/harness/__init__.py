"""End-to-end test harness: real Synapse homeserver processes federating over loopback.

* :mod:`tests.harness.synapse`  - :class:`SynapseServer` (config, process lifecycle, users)
* :mod:`tests.harness.client`   - :class:`ClientAPI`, an async treq client-server API client
* :mod:`tests.harness.postgres` - per-server PostgreSQL databases from ``$FASTJOIN_POSTGRES``
* :mod:`tests.harness.certs`    - the self-signed federation TLS certificate

The pytest fixtures (``synapse_factory``, ``db_backend``, ...) live in ``tests/conftest.py``.
"""

from .certs import TLSFiles, generate_self_signed
from .client import ClientAPI, MatrixRequestError, RequestTimeout, poll_until, sleep
from .postgres import PostgresAdmin, PostgresDatabase, PostgresUnavailable
from .synapse import (
    DELETE,
    DatabaseInfo,
    ExitResult,
    SynapseFactory,
    SynapseServer,
    SynapseStartError,
    merge_config,
    venv_python,
)

__all__ = [
    "DELETE",
    "ClientAPI",
    "DatabaseInfo",
    "ExitResult",
    "MatrixRequestError",
    "PostgresAdmin",
    "PostgresDatabase",
    "PostgresUnavailable",
    "RequestTimeout",
    "SynapseFactory",
    "SynapseServer",
    "SynapseStartError",
    "TLSFiles",
    "generate_self_signed",
    "merge_config",
    "poll_until",
    "sleep",
    "venv_python",
]
