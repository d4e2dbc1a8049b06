"""SUBSCRIBE from psycopg 3 against a running Millrace. Usage: python3 test_subscribe.py PORT

- Three subscribers read `COPY (SUBSCRIBE TO v) TO STDOUT` while a seeded random sequence of
  inserts, updates and deletes runs; each feed (snapshot, then (epoch, diff, row) changes)
  must replay to exactly the view's contents after every statement, in order.
- A subscriber that stops reading is cut off with SQLSTATE 54000 once it is more than
  `subscribe_max_buffer` epochs behind, while another subscriber receives every epoch.
- A cancel (what psql's Ctrl-C sends) ends a SUBSCRIBE with 57014 and leaves the connection
  usable.
"""
import collections
import random
import sys
import threading
import time

import psycopg

SEED = 7


def connect(port):
    return psycopg.connect(host="127.0.0.1", port=port, user="millrace", dbname="millrace", autocommit=True)


def parse(line):
    """A feed row: (epoch, diff, row tuple), NULL as None."""
    fields = [None if f == "\\N" else f for f in line.rstrip("\n").split("\t")]
    return int(fields[0]), int(fields[1]), tuple(fields[2:])


class Subscriber(threading.Thread):
    """Reads one feed until it ends (view dropped) or fails."""

    def __init__(self, port, view, setup=(), pause_after=None):
        super().__init__(daemon=True)
        self.conn = connect(port)
        for sql in setup:
            self.conn.execute(sql)
        self.view = view
        self.rows = []
        self.error = None
        self.started = threading.Event()
        self.pause_after = pause_after
        self.resume = threading.Event()

    def run(self):
        try:
            with self.conn.cursor().copy(f"COPY (SUBSCRIBE TO {self.view}) TO STDOUT") as copy:
                self.started.set()
                for data in copy:
                    for line in bytes(data).decode().splitlines():
                        self.rows.append(parse(line))
                    if self.pause_after is not None and len(self.rows) >= self.pause_after:
                        self.resume.wait()
                        self.pause_after = None
        except psycopg.Error as e:
            self.error = e
        finally:
            self.started.set()


def replay(feed):
    """The contents after each epoch of a feed, as sorted row lists, in epoch order."""
    state = collections.Counter()
    states = []
    by_epoch = collections.OrderedDict()
    for epoch, diff, row in feed:
        by_epoch.setdefault(epoch, []).append((diff, row))
    for epoch, changes in by_epoch.items():
        for diff, row in changes:
            state[row] += diff
            assert state[row] >= 0, f"row {row} below zero at epoch {epoch}"
        states.append(sorted((+state).elements(), key=repr))
    return list(by_epoch), states


def view_rows(cur):
    cur.execute("SELECT * FROM v")
    return sorted((tuple(None if v is None else str(v) for v in r) for r in cur.fetchall()), key=repr)


def dedup_consecutive(xs):
    out = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


def exact_sequence(port):
    rng = random.Random(SEED)
    main = connect(port)
    cur = main.cursor()
    cur.execute("CREATE TABLE sub_t (k INT, g TEXT, n INT)")
    cur.execute("INSERT INTO sub_t VALUES (1, 'a', 1), (2, 'b', 2), (3, NULL, 3)")
    cur.execute("CREATE MATERIALIZED VIEW v AS SELECT g, count(*) AS c, sum(n) AS s FROM sub_t GROUP BY g")
    subs = [Subscriber(port, "v") for _ in range(3)]
    for s in subs:
        s.start()
        s.started.wait(10)
    # NOTE: a subscriber's snapshot is read when its COPY starts; wait until each has it.
    deadline = time.time() + 10
    while any(not s.rows for s in subs) and time.time() < deadline:
        time.sleep(0.02)
    expected = [view_rows(cur)]
    for step in range(60):
        k = rng.randrange(12)
        action = rng.random()
        if action < 0.5:
            g = rng.choice(["'a'", "'b'", "'c'", "NULL"])
            cur.execute(f"INSERT INTO sub_t VALUES ({k}, {g}, {rng.randrange(10)})")
        elif action < 0.75:
            cur.execute(f"UPDATE sub_t SET n = n + 1 WHERE k = {k}")
        else:
            cur.execute(f"DELETE FROM sub_t WHERE k = {k}")
        expected.append(view_rows(cur))
    cur.execute("DROP MATERIALIZED VIEW v")
    for s in subs:
        s.join(20)
        assert not s.is_alive(), "a feed did not end when its view was dropped"
        assert s.error is None, f"subscriber failed: {s.error}"
    want = dedup_consecutive(expected)
    for i, s in enumerate(subs):
        epochs, states = replay(s.rows)
        assert epochs == sorted(epochs), f"subscriber {i}: epochs out of order {epochs}"
        assert states == want, f"subscriber {i}: feed replays to\n{states}\nwant\n{want}"
    assert len(want) > 10, "the random sequence changed the view too rarely to test anything"
    cur.execute("DROP TABLE sub_t")
    print(f"subscribe: {len(subs)} feeds replay {len(want)} states exactly")


def slow_reader_is_cut_off(port):
    main = connect(port)
    cur = main.cursor()
    cur.execute("CREATE TABLE big (id INT, body TEXT)")
    cur.execute("CREATE MATERIALIZED VIEW bv AS SELECT id, body FROM big")
    slow = Subscriber(port, "bv", setup=["SET subscribe_max_buffer = 3"], pause_after=1)
    fast = Subscriber(port, "bv")
    cur.execute("INSERT INTO big VALUES (0, 'first')")
    slow.start()
    fast.start()
    slow.started.wait(10)
    fast.started.wait(10)
    # ~40 MB of changes: more than loopback socket buffers hold for the paused reader.
    body = "x" * 200_000
    for i in range(1, 201):
        cur.execute(f"INSERT INTO big VALUES ({i}, '{body}')")
    deadline = time.time() + 60
    while time.time() < deadline and not any(r[2][0] == "200" for r in fast.rows):
        time.sleep(0.05)
    assert any(r[2][0] == "200" for r in fast.rows), "the fast subscriber stopped advancing"
    assert slow.is_alive(), "the paused subscriber ended before it resumed reading"
    slow.resume.set()
    slow.join(60)
    assert slow.error is not None, "a subscriber far behind was not cut off"
    assert slow.error.sqlstate == "54000", f"wrong error for a slow subscriber: {slow.error.sqlstate} {slow.error}"
    assert "subscribe_max_buffer" in str(slow.error), str(slow.error)
    got = max(int(r[2][0]) for r in slow.rows)
    assert got < 200, "the slow subscriber read everything, so nothing was tested"
    cur.execute("DROP MATERIALIZED VIEW bv")
    fast.join(20)
    assert fast.error is None, f"fast subscriber failed: {fast.error}"
    cur.execute("DROP TABLE big")
    print(f"subscribe: slow reader cut off after row {got}; fast reader got all 200")


def cancel_ends_subscribe(port):
    main = connect(port)
    cur = main.cursor()
    cur.execute("CREATE TABLE ct (a INT)")
    cur.execute("CREATE MATERIALIZED VIEW cv AS SELECT a FROM ct")
    sub = Subscriber(port, "cv")
    sub.start()
    sub.started.wait(10)
    time.sleep(0.3)
    sub.conn.cancel()
    sub.join(20)
    assert isinstance(sub.error, psycopg.errors.QueryCanceled), f"cancel gave {sub.error!r}"
    assert sub.conn.execute("SELECT 1").fetchone()[0] == 1
    cur.execute("DROP MATERIALIZED VIEW cv")
    cur.execute("DROP TABLE ct")
    print("subscribe: cancel ends the feed, connection still usable")


def main(port):
    exact_sequence(port)
    slow_reader_is_cut_off(port)
    cancel_ends_subscribe(port)
    print("subscribe: ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
