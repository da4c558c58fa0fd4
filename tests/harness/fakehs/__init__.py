"""A fake resident homeserver for tests and the benchmark.

It plays *remote* servers that a test must control (hold, fail, lie) and rooms
of Matrix HQ's size that no real Synapse could build in reasonable time: a
generated, validly signed room (`room`), served over TLS on loopback with the
federation endpoints a joining server uses (`server`), controlled over a small
HTTP API when it runs as its own process (`python -m tests.harness.fakehs`).
"""
