// node-postgres against a running Millrace: parameters (extended protocol), typed values,
// errors with SQLSTATE. Usage: node test_pg.js PORT
const { Client } = require("pg");

async function main(port) {
  const c = new Client({ host: "127.0.0.1", port, user: "millrace", database: "millrace" });
  await c.connect();
  await c.query("DROP TABLE IF EXISTS js_items");
  await c.query("CREATE TABLE js_items (id BIGINT PRIMARY KEY, name TEXT, price NUMERIC(10,2), at TIMESTAMP, ok BOOLEAN, data BYTEA)");
  await c.query("INSERT INTO js_items VALUES ($1, $2, $3, $4, $5, $6)", [1, "one", "1.50", "2024-01-02 03:04:05", true, Buffer.from([0, 1])]);
  await c.query("INSERT INTO js_items VALUES ($1, $2, $3, $4, $5, $6)", [2, null, null, null, null, null]);
  const r = await c.query("SELECT id, name, price, at, ok, data FROM js_items ORDER BY id");
  const [a, b] = r.rows;
  const check = (cond, what) => { if (!cond) { throw new Error(`${what}: ${JSON.stringify(r.rows)}`); } };
  check(String(a.id) === "1" && a.name === "one" && a.price === "1.50", "row 1 values");
  check(a.at instanceof Date && a.at.getFullYear() === 2024 && a.at.getMinutes() === 4, "timestamp");
  check(a.ok === true && Buffer.compare(a.data, Buffer.from([0, 1])) === 0, "bool/bytea");
  check(b.name === null && b.price === null && b.at === null && b.ok === null && b.data === null, "nulls");
  const n = await c.query("SELECT count(*) AS n FROM js_items WHERE id > $1", [1]);
  check(String(n.rows[0].n) === "1", "count with parameter");
  try {
    await c.query("INSERT INTO js_items (id) VALUES (1)");
    throw new Error("duplicate key accepted");
  } catch (e) {
    if (e.code !== "23505") { throw e; }
  }
  await c.query("DROP TABLE js_items");
  await c.end();
  console.log("node-pg: ok");
}

main(Number(process.argv[2])).catch((e) => { console.error(e); process.exit(1); });
