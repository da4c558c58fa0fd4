"""``synapse-fastjoin rooms ...``: the admin API of a running Synapse, for admins.

::

    synapse-fastjoin rooms list  [--json]
    synapse-fastjoin rooms show  ROOM [--json]
    synapse-fastjoin rooms watch [ROOM ...] [--interval SECONDS]
    synapse-fastjoin rooms retry ROOM [--via SERVER ...]
    synapse-fastjoin rooms abort ROOM [--purge]

The server and the credentials come from ``--url`` / ``$SYNAPSE_URL`` (the
client listener, default ``http://localhost:8008``) and ``--token`` /
``$SYNAPSE_ADMIN_TOKEN`` (an access token of a server admin).

Like the rest of the CLI this imports neither Synapse nor, until ``watch``
draws on a terminal, ``rich``; HTTP is plain ``urllib``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Optional, TextIO

from synapse_fastjoin.util import format_duration

URL_ENV = "SYNAPSE_URL"
TOKEN_ENV = "SYNAPSE_ADMIN_TOKEN"
DEFAULT_URL = "http://localhost:8008"
API_PREFIX = "/_synapse/admin/v1/fastjoin"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 5

ROOMS_EPILOG = f"""\
environment:
  {URL_ENV}           base URL of Synapse's client listener (default {DEFAULT_URL})
  {TOKEN_ENV}   access token of a server admin

exit status:
  {EXIT_OK}  success
  {EXIT_ERROR}  error (no token, not an admin, server unreachable, bad request)
  2  invalid command line
  {EXIT_NOT_FOUND}  the room is not (or no longer) in partial state
"""


class AdminAPIError(Exception):
    """A non-2xx answer from the admin API (or no answer at all)."""

    def __init__(self, message: str, status: int | None = None, errcode: str | None = None):
        super().__init__(message)
        self.status = status
        self.errcode = errcode


class AdminClient:
    """Minimal synchronous client of the module's admin API."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base_url + API_PREFIX + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {}
            if not isinstance(err, dict):
                err = {}
            raise AdminAPIError(
                f"{method} {url}: {e.code} {err.get('errcode', '')} {err.get('error', e.reason)}".strip(),
                status=e.code,
                errcode=err.get("errcode"),
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminAPIError(f"cannot reach {self.base_url}: {reason}") from None
        return json.loads(raw) if raw else None

    @staticmethod
    def _room(room_id: str) -> str:
        return "/rooms/" + urllib.parse.quote(room_id, safe="")

    def rooms(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/rooms")["rooms"])

    def room(self, room_id: str) -> dict[str, Any]:
        return dict(self.request("GET", self._room(room_id)))

    def retry(self, room_id: str, via: list[str]) -> dict[str, Any]:
        body = {"via": via} if via else {}
        return dict(self.request("POST", self._room(room_id) + "/retry", body))

    def abort(self, room_id: str, purge: bool) -> dict[str, Any]:
        return dict(self.request("POST", self._room(room_id) + "/abort", {"purge": purge}))

    def history(self, room_id: str, limit: int = 1) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"room_id": room_id, "limit": limit})
        return list(self.request("GET", f"/history?{query}")["resyncs"])


# Formatting (pure functions: tested without a server).


def progress_of(room: dict[str, Any]) -> dict[str, Any]:
    return ((room.get("resync") or {}).get("progress")) or {}


def phase_of(room: dict[str, Any]) -> str:
    progress = progress_of(room)
    if progress.get("phase"):
        return str(progress["phase"])
    return str((room.get("resync") or {}).get("status") or "unknown")


def events_done_total(room: dict[str, Any]) -> tuple[int, int | None]:
    """Events done and expected in the current part of the resync: the state
    at the join while it is fetched, the events that arrived while partial
    during catch-up. Total None when not known yet."""
    p = progress_of(room)
    phase = p.get("phase")
    if phase in ("catching_up", "finishing") or (
        phase not in ("fetching_state", "fetching_events", "fetching_state_ids")
        and p.get("catchup_remaining") is not None
        and not p.get("expected")
    ):
        done = int(p.get("catchup_done") or 0)
        remaining = p.get("catchup_remaining")
        return done, None if remaining is None else done + int(remaining)
    expected = int(p.get("expected") or 0)
    return int(p.get("persisted") or 0), expected or None


def format_ts(ts_ms: int | None, now: float | None = None) -> str:
    """A timestamp as ``in 12s`` / ``5m00s ago``."""
    if ts_ms is None:
        return "-"
    now = time.time() if now is None else now
    delta = ts_ms / 1000 - now
    return f"in {format_duration(delta)}" if delta >= 0 else f"{format_duration(-delta)} ago"


class RateMeter:
    """Events per second from successive (time, done) samples of one room,
    smoothed; restarts when the count goes back (a new phase or resync)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self._smoothing = smoothing
        self._last: tuple[float, int] | None = None
        self.rate: float | None = None

    def add(self, now: float, done: int) -> float | None:
        if self._last is not None:
            then, before = self._last
            if done < before:
                self.rate = None
            elif now > then:
                sample = (done - before) / (now - then)
                self.rate = (
                    sample
                    if self.rate is None
                    else self._smoothing * sample + (1 - self._smoothing) * self.rate
                )
        self._last = (now, done)
        return self.rate

    def eta(self, done: int, total: int | None) -> float | None:
        if total is None or not self.rate or self.rate <= 0:
            return None
        return max(0, total - done) / self.rate


def status_line(room: dict[str, Any], rate: float | None = None, eta: float | None = None) -> str:
    """One line about a room: phase, events done/expected, rate, ETA, trouble."""
    done, total = events_done_total(room)
    parts = [room["room_id"], phase_of(room)]
    parts.append(f"{done}/{total if total is not None else '?'} events")
    if total:
        parts.append(f"{100 * done / total:.0f}%")
    if rate is not None:
        parts.append(f"{rate:.0f} ev/s")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    p = progress_of(room)
    if p.get("destination"):
        parts.append(f"via {p['destination']}")
    if p.get("retries"):
        parts.append(f"retries {p['retries']}")
    if p.get("next_retry_ts"):
        parts.append(f"next attempt {format_ts(p['next_retry_ts'])}")
    error = p.get("last_error") or (room.get("resync") or {}).get("last_error")
    if error and (p.get("phase") == "waiting_to_retry" or phase_of(room) == "failed"):
        parts.append(f"last error: {error}")
    return "  ".join(str(x) for x in parts)


def rooms_table(rooms: list[dict[str, Any]]) -> str:
    """`rooms list`: one row per room, fixed-width columns."""
    if not rooms:
        return "No room is in partial state."
    header = ("ROOM", "STATUS", "PHASE", "EVENTS", "RETRIES", "JOINED VIA", "RUNNING")
    rows = []
    for room in rooms:
        done, total = events_done_total(room)
        resync = room.get("resync") or {}
        rows.append(
            (
                room["room_id"],
                str(resync.get("status", "")),
                phase_of(room) if progress_of(room) else "-",
                f"{done}/{total if total is not None else '?'}",
                str(progress_of(room).get("retries") or 0),
                str(room.get("joined_via") or "-"),
                "yes" if resync.get("running") else "no",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.append(f"{len(rooms)} room{'s' if len(rooms) != 1 else ''} in partial state")
    return "\n".join(lines)


def room_details(room: dict[str, Any]) -> str:
    """`rooms show`: the room, key by key."""
    resync = room.get("resync") or {}
    p = progress_of(room)
    done, total = events_done_total(room)
    lines = [
        f"room:              {room['room_id']}",
        f"joined via:        {room.get('joined_via') or '-'}",
        f"joined:            {format_ts(room.get('joined_ts'))}",
        f"join event:        {room.get('join_event_id') or '-'}",
        f"servers known:     {room.get('known_servers')}",
        f"partial events:    {room.get('partial_state_events_remaining')}",
        f"resync status:     {resync.get('status')} ({'running' if resync.get('running') else 'not running here'})",
        f"resync attempts:   {resync.get('attempts')}",
        f"phase:             {phase_of(room)} (since {format_ts(p.get('phase_ts'))})",
        f"events:            {done}/{total if total is not None else '?'}",
    ]
    if p:
        lines += [
            f"asking:            {p.get('destination') or '-'}",
            f"fetched/checked:   {p.get('fetched', 0)}/{p.get('checked', 0)}"
            f" (rejected {p.get('rejected', 0)}, redacted {p.get('redacted', 0)},"
            f" bad signatures {p.get('bad_signatures', 0)}, unavailable {p.get('unavailable', 0)})",
            f"catch-up:          {p.get('catchup_done', 0)} done,"
            f" {p.get('catchup_remaining') if p.get('catchup_remaining') is not None else '?'} left",
            f"retries:           {p.get('retries', 0)}"
            + (f", next attempt {format_ts(p['next_retry_ts'])}" if p.get("next_retry_ts") else ""),
        ]
    error = p.get("last_error") or resync.get("last_error")
    if error:
        lines.append(f"last error:        {error}")
    return "\n".join(lines)


# Commands.


def _out(message: str, stream: Optional[TextIO] = None) -> None:
    print(message, file=stream or sys.stdout, flush=True)


def _client(args: argparse.Namespace) -> AdminClient:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise AdminAPIError(f"no access token: pass --token or set ${TOKEN_ENV}")
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    return AdminClient(url, token)


def cmd_list(args: argparse.Namespace) -> int:
    rooms = _client(args).rooms()
    _out(json.dumps(rooms, indent=2) if args.json else rooms_table(rooms))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    room = _client(args).room(args.room)
    _out(json.dumps(room, indent=2) if args.json else room_details(room))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    result = _client(args).retry(args.room, args.via or [])
    if result.get("started"):
        what = "no resync was running: started one"
    elif result.get("woken"):
        what = "the resync was waiting to retry: it retries now"
    else:
        what = "the resync is running: it goes on"
    via = result.get("via") or []
    _out(f"{args.room}: {what}" + (f", asking {', '.join(via)} first" if via else ""))
    return EXIT_OK


def cmd_abort(args: argparse.Namespace) -> int:
    result = _client(args).abort(args.room, args.purge)
    _out(
        f"{args.room}: resync aborted; {len(result.get('left') or [])} local users left the room"
        + (f" ({len(result['failed_to_leave'])} could not leave)" if result.get("failed_to_leave") else "")
        + f", {result.get('requests_answered', 0)} waiting requests answered"
        + ("; the room was purged" if result.get("purged") else "")
    )
    return EXIT_OK


def _poll(client: AdminClient, wanted: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rooms to draw now, and those of `wanted` that are no longer partial."""
    if not wanted:
        return client.rooms(), []
    rooms, gone = [], []
    for room_id in wanted:
        try:
            rooms.append(client.room(room_id))
        except AdminAPIError as e:
            if e.status != 404:
                raise
            gone.append(room_id)
    return rooms, gone


def _ended_how(
    client: AdminClient, room_id: str, since_ms: int, sleep: Callable[[float], None]
) -> str:
    """How the room left partial state, from the history (written a moment
    after the room's flag is cleared, so asked a few times)."""
    history: list[dict[str, Any]] = []
    for attempt in range(10):
        try:
            history = [
                h for h in client.history(room_id, 1) if (h.get("finished_ts") or 0) >= since_ms
            ]
        except AdminAPIError:
            history = []
        if history:
            break
        sleep(0.3)
    if not history:
        return "no longer in partial state"
    entry = history[0]
    return f"resync {entry.get('outcome')} after {format_duration((entry.get('duration_ms') or 0) / 1000)}"


def cmd_watch(
    args: argparse.Namespace,
    stream: Optional[TextIO] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    stream = stream or sys.stdout
    client = _client(args)
    wanted = list(dict.fromkeys(args.rooms or []))
    meters: dict[str, RateMeter] = {}
    reported: set[str] = set()
    started_ms = int(time.time() * 1000) - 60_000
    fancy = stream.isatty() and not args.plain
    display = _RichDisplay(stream) if fancy else None
    try:
        while True:
            rooms, gone = _poll(client, wanted)
            now = time.time()
            samples = []
            for room in rooms:
                meter = meters.setdefault(room["room_id"], RateMeter())
                done, total = events_done_total(room)
                rate = meter.add(now, done)
                samples.append((room, rate, meter.eta(done, total)))
            for room_id in gone:
                if room_id not in reported:
                    reported.add(room_id)
                    message = f"{room_id}: {_ended_how(client, room_id, started_ms, sleep)}"
                    if display is not None:
                        display.note(message)
                    else:
                        _out(message, stream)
            if display is not None:
                display.update(samples)
            else:
                for room, rate, eta in samples:
                    _out(time.strftime("%H:%M:%S ") + status_line(room, rate, eta), stream)
            if (wanted and len(reported) == len(wanted)) or (not wanted and not rooms):
                if not wanted:
                    _out("No room is in partial state.", stream)
                return EXIT_OK
            sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if display is not None:
            display.stop()


class _RichDisplay:
    """Live progress bars, one per room, drawn with rich."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("{task.fields[room]}", style="bold"),
            TextColumn("{task.fields[phase]}", style="cyan"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.fields[total_text]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[note]}", style="yellow"),
            console=Console(file=stream),
            auto_refresh=False,
        )
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def update(self, samples: Iterable[tuple[dict[str, Any], float | None, float | None]]) -> None:
        seen = set()
        for room, rate, eta in samples:
            room_id = room["room_id"]
            seen.add(room_id)
            done, total = events_done_total(room)
            p = progress_of(room)
            note = ""
            if p.get("phase") == "waiting_to_retry":
                note = f"retry {format_ts(p.get('next_retry_ts'))}: {p.get('last_error') or ''}"
            fields = dict(
                room=room_id,
                phase=phase_of(room),
                total_text=str(total) if total is not None else "?",
                rate=f"{rate:.0f} ev/s" if rate is not None else "- ev/s",
                eta=format_duration(eta),
                note=note[:80],
            )
            if room_id not in self._tasks:
                self._tasks[room_id] = self._progress.add_task("", total=total, completed=done, **fields)
            else:
                self._progress.update(self._tasks[room_id], total=total, completed=done, **fields)
        for room_id in list(self._tasks):
            if room_id not in seen:
                self._progress.remove_task(self._tasks.pop(room_id))
        self._progress.refresh()

    def note(self, message: str) -> None:
        self._progress.console.print(message)

    def stop(self) -> None:
        self._progress.stop()


def add_rooms_parser(commands: Any, error: Callable[[str], int]) -> None:
    """Add the `rooms` command group to the top-level subparsers."""
    rooms = commands.add_parser(
        "rooms",
        help="watch and control the partial-state rooms of a running Synapse",
        description="List, watch, retry or abort the resyncs of partial-state rooms "
        "through the admin API of a running Synapse with synapse-fastjoin.",
        epilog=ROOMS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help=f"Synapse's client listener (default: ${URL_ENV}, else {DEFAULT_URL})"
    )
    common.add_argument(
        "--token", help=f"access token of a server admin (default: ${TOKEN_ENV})"
    )
    actions = rooms.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        p = actions.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=ROOMS_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=_guarded(func, error))
        return p

    p = add("list", cmd_list, "list every room in partial state")
    p.add_argument("--json", action="store_true", help="print the admin API's answer")
    p = add("show", cmd_show, "show one partial-state room and its resync")
    p.add_argument("room", metavar="ROOM")
    p.add_argument("--json", action="store_true", help="print the admin API's answer")
    p = add("watch", cmd_watch, "draw the progress of the resyncs until they end")
    p.add_argument("rooms", metavar="ROOM", nargs="*", help="rooms to watch (default: all)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    p = add("retry", cmd_retry, "retry a resync now (skip the backoff)")
    p.add_argument("room", metavar="ROOM")
    p.add_argument(
        "--via", action="append", metavar="SERVER", help="ask this server first (repeatable)"
    )
    p = add("abort", cmd_abort, "stop a resync for good: every local user leaves the room")
    p.add_argument("room", metavar="ROOM")
    p.add_argument("--purge", action="store_true", help="also delete the room's data")


def _guarded(
    func: Callable[[argparse.Namespace], int], error: Callable[[str], int]
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except AdminAPIError as e:
            error(str(e))
            return EXIT_NOT_FOUND if e.status == 404 else EXIT_ERROR

    return run
