"""Summarise a py-spy raw recording (`scripts/bench --profile`): where the
joiner's time goes, per thread and per function.

    python scripts/lib/profile_summary.py FILE.txt [--top 30] [--thread NAME] [--match TEXT]
    python scripts/lib/profile_summary.py FILE.txt --areas [--detail AREA]
    python scripts/lib/profile_summary.py FILE.txt --transactions

`--areas`: seconds of the reactor thread (MainThread) by what it ran, each
stack going to the first area of `AREAS` one of its frames names ("idle":
the reactor's wait; "other": none of them); `--detail AREA` lists that
area's functions by self time. `--transactions`: seconds of Synapse's
database thread (its pool's threads) by transaction, commits apart.
Seconds assume py-spy's `--rate 50`, as `scripts/bench --profile` records.

A raw recording has one line per distinct stack, `frame;frame;... count`,
root first; with --threads the first frame names the thread. Stacks whose
innermost frame is a wait (epoll, a lock, a condition, a queue) are idle and
counted apart, so the shares below are of the busy samples.
"""

import argparse
import collections
import re
import sys

IDLE_LEAVES = re.compile(
    r"^(poll|select|epoll|wait|acquire|_wait_for_tstate_lock|get|sleep|doPoll|_doReadOrWrite|accept|recv|read"
    r"|readinto|_worker|join)\b"
)


RATE = 50  # samples a second (scripts/bench --profile)

# (area, text a frame of the stack holds), first match wins.
AREAS = [
    ("gc", "_maybe_gc"),
    ("staged runs", "staged_runs"),
    ("persistence queue", "_EventPeristenceQueue"),
    ("/send staging", "stage_received"),
    ("/send", "on_incoming_transaction"),
    ("resync", "synapse_fastjoin/resync"),
    ("auth chains fetched", "fetch_auth_chains"),
    ("keys", "keyring"),
    ("notifier", "notifier.py"),
    ("user directory", "user_directory"),
    ("federation requests", "matrixfederationclient"),
    ("http server", "synapse/http/server.py"),
    ("tls and i/o", "twisted/protocols/tls"),
    ("event fetches", "events_worker"),
    ("presence", "presence"),
]


def _stacks(path: str):
    """(thread, frames, count) of each line of a raw recording."""
    with open(path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread = next((fr for fr in frames[:2] if fr.startswith("thread")), frames[0])
            yield thread, [fr for fr in frames if not fr.startswith(("thread", "process"))], int(count_s)


def _is_idle(frames: list[str]) -> bool:
    leaf = frames[-1] if frames else ""
    return bool(IDLE_LEAVES.match(leaf.strip().split(" (")[0].rsplit(".", 1)[-1])) or "_reactor_metrics" in leaf


def areas(path: str, detail: str | None, top: int) -> None:
    totals: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for thread, frames, count in _stacks(path):
        if "MainThread" not in thread:
            continue
        if _is_idle(frames):
            totals["idle"] += count
            continue
        area = next((name for name, text in AREAS if any(text in fr for fr in frames)), "other")
        totals[area] += count
        if area == detail:
            functions[frame_name(frames[-1])] += count
    print(f"reactor thread, {sum(totals.values()) / RATE:.1f} s")
    for name, count in totals.most_common():
        print(f"  {count / RATE:7.1f} s  {name}")
    if detail:
        print(f"\"{detail}\" by self time:")
        for name, count in functions.most_common(top):
            print(f"  {count / RATE:7.2f} s  {name}")


def transactions(path: str, top: int) -> None:
    totals: collections.Counter[str] = collections.Counter()
    for thread, frames, count in _stacks(path):
        # Synapse's database pool's threads are named after the pool's id.
        if not re.search(r"PoolThread-\d+-", thread):
            continue
        if _is_idle(frames):
            totals["(idle)"] += count
            continue
        if any(fr.startswith("LoggingDatabaseConnection.commit (") for fr in frames):
            totals["(commits)"] += count
            continue
        name = "(other)"
        for i, fr in enumerate(frames[:-1]):
            if "new_transaction (" in fr:
                name = frames[i + 1].split(" (")[0]
                break
        totals[name] += count
    print(f"database threads, {sum(totals.values()) / RATE:.1f} s")
    for name, count in totals.most_common(top):
        print(f"  {count / RATE:7.1f} s  {name}")


def frame_name(frame: str) -> str:
    # "func (module/file.py:123)" -> "func (module/file.py)"
    return re.sub(r":\d+\)$", ")", frame.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", help="only threads whose name contains this")
    parser.add_argument("--match", help="only stacks with a frame containing this")
    parser.add_argument("--areas", action="store_true", help="the reactor thread's seconds by area")
    parser.add_argument("--detail", metavar="AREA", help="with --areas: that area's functions")
    parser.add_argument("--transactions", action="store_true", help="the database thread's seconds by transaction")
    args = parser.parse_args()
    if args.areas:
        areas(args.file, args.detail, args.top)
        return 0
    if args.transactions:
        transactions(args.file, args.top)
        return 0

    threads: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_s)
            frames = stack.split(";")
            thread = next((fr for fr in frames[:2] if fr.startswith("thread")), frames[0])
            frames = [fr for fr in frames if not fr.startswith(("thread", "process"))]
            if args.thread and args.thread not in thread:
                continue
            if args.match and not any(args.match in fr for fr in frames):
                continue
            leaf = frames[-1] if frames else ""
            if IDLE_LEAVES.match(leaf.strip().split(" (")[0].rsplit(".", 1)[-1]) or "_reactor_metrics" in leaf:
                idle[thread] += count
                continue
            threads[thread] += count
            busy += count
            self_time[frame_name(leaf)] += count
            for name in {frame_name(fr) for fr in frames}:
                inclusive[name] += count
    total = busy + sum(idle.values())
    print(f"samples: {total}, busy: {busy} ({100 * busy / max(1, total):.0f} %)")
    print("\nbusy samples per thread:")
    for thread, count in threads.most_common(12):
        print(f"  {100 * count / max(1, busy):5.1f} %  {count:7d}  {thread}")
    print(f"\ntop {args.top} by self time (% of busy samples):")
    for name, count in self_time.most_common(args.top):
        print(f"  {100 * count / max(1, busy):5.1f} %  {name}")
    print(f"\ntop {args.top} by inclusive time:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {100 * count / max(1, busy):5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
