"""A check process: `python -m synapse_fastjoin.resync.checkworker`.

Started by `resync.checkpool`. It reads requests from stdin and writes the
answers to stdout, one frame each (an 8-byte big-endian length, then a
pickle), in order:

    request  (request id, pdus, room version id, raw keys, received time)
    answer   (request id, "ok", [verdict, ...]) or (request id, "error", text)

Its first frame is `(0, "ready", pid)`, once its imports are done. It exits
when stdin closes. Only the parent writes to it: pickles from anywhere else
are never read.
"""

import os
import pickle
import struct
import sys
from typing import Any, BinaryIO

_HEADER = struct.Struct(">Q")


def write_frame(out: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    parts = []
    while n:
        part = stream.read(n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def main() -> int:
    # Synapse's own modules, imported once, before the parent is told we are ready.
    from synapse_fastjoin.resync.checks import check_pdus_in_worker

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Anything printed by accident must not corrupt the frames.
    sys.stdout = sys.stderr
    write_frame(stdout, (0, "ready", os.getpid()))
    while True:
        header = _read_exactly(stdin, _HEADER.size)
        if header is None:
            return 0
        body = _read_exactly(stdin, _HEADER.unpack(header)[0])
        if body is None:
            return 0
        request_id, *args = pickle.loads(body)
        try:
            answer = (request_id, "ok", check_pdus_in_worker(*args))
        except Exception as e:  # a bug, not bad input: that gives verdicts
            answer = (request_id, "error", f"{type(e).__name__}: {e}")
        write_frame(stdout, answer)


if __name__ == "__main__":
    sys.exit(main())
