"""Running a coroutine that must not wait on anything (the fakes it talks to
answer at once), for unit tests of async module code without a reactor."""

from typing import Any


def run(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine waited on something")
