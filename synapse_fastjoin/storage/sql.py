# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Small SQL helpers shared by the `_txn` functions."""

from typing import Iterable, Iterator, TypeVar

from synapse.util.iterutils import batch_iter

T = TypeVar("T")

# Values per IN list: well under SQLite's bound-variable limit (999 before
# 3.32), with room for a statement's other parameters.
IN_LIST_BATCH = 500


def in_list_batches(
    values: Iterable[T], size: int = IN_LIST_BATCH
) -> Iterator[tuple[tuple[T, ...], str]]:
    """`values` a batch at a time, each batch with its IN list of placeholders
    (`?,?,?`: Synapse's LoggingTransaction turns them into the database's own)."""
    for batch in batch_iter(values, size):
        yield batch, ",".join("?" * len(batch))
