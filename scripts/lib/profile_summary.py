"""Summarise a py-spy raw recording (`scripts/bench --profile`): where the
joiner's time goes, per thread and per function.

    python scripts/lib/profile_summary.py FILE.txt [--top 30] [--thread NAME]

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


def frame_name(frame: str) -> str:
    # "func (module/file.py:123)" -> "func (module/file.py)"
    return re.sub(r":\d+\)$", ")", frame.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", help="only threads whose name contains this")
    parser.add_argument("--match", help="only stacks with a frame containing this")
    args = parser.parse_args()

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
