# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""An experiment (docs/benchmarks.md, "The state written in key order"): rows
of N random 44-character event ids written into five of Synapse's tables
with their indexes, in batches of 500, in arrival order or sorted within
pools, SQLite in WAL mode; prints the time, the commits' share and the log's
size.   python3 walsort.py N random | python3 walsort.py N sorted POOL"""
import sqlite3, os, time, random, string, sys, json
def rid(): return '$'+''.join(random.choice(string.ascii_letters+string.digits) for _ in range(43))
N=int(sys.argv[1]); mode=sys.argv[2]; pool=int(sys.argv[3]) if len(sys.argv)>3 else 500
random.seed(1)
ids=[rid() for _ in range(N)]
users=['@u%d:s%d.test'%(i, i%1000) for i in range(N)]
path='/tmp/exp/t.db'
for s in ('','-wal','-shm'):
    try: os.remove(path+s)
    except FileNotFoundError: pass
c=sqlite3.connect(path, isolation_level=None)
c.execute('PRAGMA journal_mode=WAL')
c.executescript('''
CREATE TABLE events(stream_ordering INTEGER PRIMARY KEY, topological_ordering BIGINT, event_id TEXT UNIQUE, room_id TEXT, type TEXT, ts BIGINT, sender TEXT, state_key TEXT);
CREATE INDEX events_order_room ON events(room_id, topological_ordering, stream_ordering);
CREATE INDEX events_ts ON events(ts, stream_ordering);
CREATE INDEX events_room_stream ON events(room_id, stream_ordering);
CREATE TABLE event_json(event_id TEXT UNIQUE, room_id TEXT, json TEXT);
CREATE TABLE state_events(event_id TEXT UNIQUE, room_id TEXT, type TEXT, state_key TEXT);
CREATE TABLE event_auth(event_id TEXT, auth_id TEXT, room_id TEXT);
CREATE INDEX evauth_edges_id ON event_auth(event_id);
CREATE TABLE room_memberships(event_id TEXT UNIQUE, user_id TEXT, room_id TEXT, so BIGINT);
CREATE INDEX rm_user ON room_memberships(user_id);
CREATE INDEX rm_user_room ON room_memberships(user_id, room_id);
CREATE INDEX rm_so ON room_memberships(so);
''')
order=list(range(N))
so=0
def write(batch):
    global so
    c.execute('BEGIN')
    rows=[]
    for i in batch:
        so+=1
        rows.append((so, 1, ids[i], '!r', 'm.room.member', 1700000000000+i, users[i], users[i]))
    c.executemany('INSERT INTO events VALUES (?,?,?,?,?,?,?,?)', rows)
    c.executemany('INSERT INTO event_json VALUES (?,?,?)', [(ids[i], '!r', 'x'*900) for i in batch])
    c.executemany('INSERT INTO state_events VALUES (?,?,?,?)', [(ids[i], '!r', 'm.room.member', users[i]) for i in batch])
    c.executemany('INSERT INTO event_auth VALUES (?,?,?)', [(ids[i], a, '!r') for i in batch for a in ('$create','$pl','$jr')])
    c.executemany('INSERT INTO room_memberships VALUES (?,?,?,?)', [(ids[i], users[i], '!r', i) for i in batch])
    t=time.perf_counter(); c.execute('COMMIT'); return time.perf_counter()-t
t0=time.perf_counter(); commit=0
if mode=='random':
    for k in range(0,N,500): commit+=write(order[k:k+500])
else:
    for p in range(0,N,pool):
        chunk=sorted(order[p:p+pool], key=lambda i: ids[i])
        for k in range(0,len(chunk),500): commit+=write(chunk[k:k+500])
tot=time.perf_counter()-t0
print(json.dumps(dict(N=N,mode=mode,pool=pool,total=round(tot,2),commit=round(commit,2), wal_mb=round(os.path.getsize(path+'-wal')/1e6,1))))
