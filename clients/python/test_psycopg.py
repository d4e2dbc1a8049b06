"""psycopg 3 against a running Millrace: connect, create, insert with parameters (server-side
binding), read typed values back. Usage: python3 test_psycopg.py PORT"""
import datetime
import decimal
import sys

import psycopg


def main(port: int) -> None:
    with psycopg.connect(host="127.0.0.1", port=port, user="millrace", dbname="millrace", autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS py_items")
        cur.execute(
            "CREATE TABLE py_items (id BIGINT PRIMARY KEY, name TEXT, price NUMERIC(10,2),"
            " at TIMESTAMP, data BYTEA, ok BOOLEAN)"
        )
        rows = [
            (1, "one", decimal.Decimal("1.50"), datetime.datetime(2024, 1, 2, 3, 4, 5), b"\x00\x01", True),
            (2, None, None, None, None, None),
            (3, "three", decimal.Decimal("-7.25"), datetime.datetime(1999, 12, 31, 23, 59, 59), b"xyz", False),
        ]
        for r in rows:
            cur.execute("INSERT INTO py_items VALUES (%s, %s, %s, %s, %s, %s)", r)
        cur.execute("SELECT id, name, price, at, data, ok FROM py_items ORDER BY id")
        got = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in cur.fetchall()]
        assert got == rows, f"round trip differs:\n{got}\n{rows}"
        cur.execute("SELECT count(*) FROM py_items WHERE price > %s", (decimal.Decimal("0"),))
        assert cur.fetchone()[0] == 1
        try:
            cur.execute("INSERT INTO py_items VALUES (1, 'dup', 1, NULL, NULL, NULL)")
            raise AssertionError("duplicate key accepted")
        except psycopg.errors.UniqueViolation:
            pass
        cur.execute("SELECT current_database(), version()")
        db, version = cur.fetchone()
        assert db == "millrace" and version.startswith("PostgreSQL 15"), (db, version)
        # A transaction through the driver.
        conn.autocommit = False
        cur.execute("INSERT INTO py_items VALUES (4, 'four', 4, NULL, NULL, NULL)")
        conn.rollback()
        conn.autocommit = True
        cur.execute("SELECT count(*) FROM py_items")
        assert cur.fetchone()[0] == 3
        cur.execute("DROP TABLE py_items")
    print("psycopg: ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
