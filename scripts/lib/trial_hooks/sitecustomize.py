"""Loaded by every Python process of `scripts/synapse-trial` (trial and its
workers: this directory is their PYTHONPATH): Synapse's own tests run with
the hook synapse-fastjoin installs in a homeserver on SQLite, patch 0035's
`execute_batch_hook` (`storage/sqlite_batch.py`: batched inserts as
multi-row statements), set on every SQLite engine Synapse creates. Off with
`scripts/synapse-trial --no-module-hooks`."""

import os

if os.environ.get("FASTJOIN_TRIAL_MODULE_HOOKS") == "1":
    from synapse.storage.engines import sqlite as _sqlite

    from synapse_fastjoin.storage.sqlite_batch import execute_batch as _execute_batch

    _init = _sqlite.Sqlite3Engine.__init__

    def _init_with_hook(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _init(self, *args, **kwargs)
        if not hasattr(self, "execute_batch_hook"):
            raise RuntimeError("patch 0035 is not applied: Sqlite3Engine has no execute_batch_hook")
        self.execute_batch_hook = _execute_batch

    _sqlite.Sqlite3Engine.__init__ = _init_with_hook  # type: ignore[method-assign]
