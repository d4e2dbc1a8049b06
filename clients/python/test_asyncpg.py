"""asyncpg against a running Millrace: its binary protocol with server-side prepared
statements. Usage: python3 test_asyncpg.py PORT"""
import asyncio
import datetime
import decimal
import sys

import asyncpg


async def main(port: int) -> None:
    c = await asyncpg.connect(host="127.0.0.1", port=port, user="millrace", database="millrace")
    await c.execute("DROP TABLE IF EXISTS a_items")
    await c.execute(
        "CREATE TABLE a_items (id BIGINT PRIMARY KEY, name TEXT, price NUMERIC(10,2),"
        " at TIMESTAMP, data BYTEA, ok BOOLEAN)"
    )
    rows = [
        (1, "one", decimal.Decimal("1.50"), datetime.datetime(2024, 1, 2, 3, 4, 5), b"\x00\x01", True),
        (2, None, None, None, None, None),
    ]
    for r in rows:
        await c.execute("INSERT INTO a_items VALUES ($1, $2, $3, $4, $5, $6)", *r)
    got = [tuple(r) for r in await c.fetch("SELECT id, name, price, at, data, ok FROM a_items ORDER BY id")]
    assert got == rows, f"round trip differs:\n{got}\n{rows}"
    assert await c.fetchval("SELECT count(*) FROM a_items WHERE id > $1", 1) == 1
    try:
        await c.execute("INSERT INTO a_items (id) VALUES (1)")
        raise AssertionError("duplicate key accepted")
    except asyncpg.UniqueViolationError:
        pass
    await c.execute("DROP TABLE a_items")
    await c.close()
    print("asyncpg: ok")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
