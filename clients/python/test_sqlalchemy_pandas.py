"""SQLAlchemy (psycopg dialect) and pandas.read_sql against a running Millrace.
Usage: python3 test_sqlalchemy_pandas.py PORT"""
import sys

import pandas as pd
import sqlalchemy as sa


def main(port: int) -> None:
    eng = sa.create_engine(f"postgresql+psycopg://millrace@127.0.0.1:{port}/millrace")
    # DDL runs outside a transaction block (Millrace refuses DDL inside one, with 0A000).
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS sa_t"))
        conn.execute(sa.text("CREATE TABLE sa_t (id INT PRIMARY KEY, name TEXT, score DOUBLE PRECISION)"))
    with eng.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO sa_t VALUES (:i, :n, :s)"),
            [{"i": 1, "n": "a", "s": 1.5}, {"i": 2, "n": None, "s": None}, {"i": 3, "n": "c", "s": -2.25}],
        )
    df = pd.read_sql("SELECT id, name, score FROM sa_t ORDER BY id", eng)
    assert list(df["id"]) == [1, 2, 3], df
    assert df["name"].tolist()[0] == "a" and df["name"].isna().tolist() == [False, True, False], df
    assert df["score"].tolist()[0] == 1.5 and pd.isna(df["score"].tolist()[1]), df
    assert "sa_t" in sa.inspect(eng).get_table_names()
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("DROP TABLE sa_t"))
    print("sqlalchemy+pandas: ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
