"""`synapse-fastjoin rooms`: what it prints for the admin API's answers.
(Against a real server: tests/e2e/test_cli_rooms.py.)"""

import io
import math

import pytest

from synapse_fastjoin import cli, cli_rooms
from synapse_fastjoin.cli_rooms import (
    RateMeter,
    events_done_total,
    format_duration,
    room_details,
    rooms_table,
    status_line,
)


def room(**progress):
    return {
        "room_id": "!r:example.org",
        "join_event_id": "$j",
        "joined_via": "example.org",
        "joined_ts": 1_000,
        "known_servers": 3,
        "partial_state_events_remaining": 2,
        "resync": {
            "status": "resyncing",
            "attempts": 1,
            "running": bool(progress),
            "last_error": None,
            "progress": progress or None,
        },
    }


def test_events_counted_are_the_state_while_fetching_and_the_backlog_while_catching_up():
    assert events_done_total(room(phase="fetching_state", expected=200, persisted=50)) == (50, 200)
    assert events_done_total(room(phase="fetching_state_ids", expected=0, persisted=0)) == (0, None)
    assert events_done_total(
        room(phase="catching_up", expected=200, persisted=200, catchup_done=30, catchup_remaining=70)
    ) == (30, 100)
    assert events_done_total(room()) == (0, None)


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (0, 42.4, 60, 185, 7620)] == [
        "0s", "42s", "1m00s", "3m05s", "2h07m"
    ]
    assert format_duration(None) == format_duration(-1) == format_duration(math.inf) == "?"


def test_rate_is_smoothed_and_restarts_when_the_count_goes_back():
    meter = RateMeter(smoothing=0.5)
    assert meter.add(0.0, 0) is None
    assert meter.add(1.0, 100) == 100
    assert meter.add(2.0, 300) == 150  # halfway between 100 and 200
    assert meter.eta(300, 600) == 2
    assert meter.eta(300, None) is None
    assert meter.add(3.0, 10) is None  # a new phase counts from 0 again
    assert meter.eta(10, 600) is None


def test_status_line_has_phase_counts_rate_eta_and_trouble():
    line = status_line(
        room(phase="fetching_state", expected=1000, persisted=250, destination="a.org"), 50.0, 15
    )
    assert line.split("  ") == [
        "!r:example.org", "fetching_state", "250/1000 events", "25%", "50 ev/s", "ETA 15s", "via a.org"
    ]
    waiting = status_line(
        room(phase="waiting_to_retry", retries=3, last_error="NoServerAnswered: all failed")
    )
    assert "retries 3" in waiting and "last error: NoServerAnswered: all failed" in waiting


def test_rooms_table_lines_up_and_counts():
    rooms = [
        room(phase="fetching_state", expected=10, persisted=5),
        {**room(), "room_id": "!longer-room-id:example.org"},
    ]
    lines = rooms_table(rooms).splitlines()
    assert lines[0].split() == ["ROOM", "STATUS", "PHASE", "EVENTS", "RETRIES", "JOINED", "VIA", "RUNNING"]
    assert lines[1].split()[:4] == ["!r:example.org", "resyncing", "fetching_state", "5/10"]
    assert lines[2].split()[2:4] == ["-", "0/?"]
    # Columns start at the same offsets on every row.
    assert lines[1].index("resyncing") == lines[2].index("resyncing") == lines[0].index("STATUS")
    assert lines[-1] == "2 rooms in partial state"
    assert rooms_table([]) == "No room is in partial state."


def test_room_details_show_the_error():
    text = room_details(
        room(phase="waiting_to_retry", last_error="boom", retries=2, next_retry_ts=None)
    )
    assert "phase:             waiting_to_retry" in text
    assert "last error:        boom" in text


def test_rich_bars_are_drawn_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    display = cli_rooms._RichDisplay(out)
    display.update([(room(phase="fetching_state", expected=400, persisted=100), 20.0, 15.0)])
    display.note("!gone:example.org: resync complete after 3s")
    display.stop()
    text = out.getvalue()
    assert "!r:example.org" in text and "fetching_state" in text
    assert "100/400" in text and "20 ev/s" in text and "ETA 15s" in text
    assert "━" in text  # the bar
    assert "resync complete after 3s" in text


def test_parser_has_the_rooms_group(monkeypatch, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["rooms", "retry", "!r:x", "--via", "a.org", "--via", "b.org"])
    assert args.via == ["a.org", "b.org"]
    args = parser.parse_args(["rooms", "abort", "!r:x", "--purge"])
    assert args.purge is True
    args = parser.parse_args(["rooms", "watch"])
    assert args.rooms == [] and args.interval == 1.0
    monkeypatch.delenv(cli_rooms.TOKEN_ENV, raising=False)
    assert cli.main(["rooms", "list"]) == cli_rooms.EXIT_ERROR
    assert "no access token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["rooms", "frobnicate"])
