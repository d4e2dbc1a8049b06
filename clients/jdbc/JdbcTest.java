// The PostgreSQL JDBC driver against a running Millrace: connect, prepared statements with
// typed parameters, typed reads, SQLSTATE of errors. Usage: java JdbcTest PORT
import java.math.BigDecimal;
import java.sql.*;

public class JdbcTest {
    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/millrace";
        try (Connection c = DriverManager.getConnection(url, "millrace", "")) {
            DatabaseMetaData md = c.getMetaData();
            check(md.getDatabaseProductName().equals("PostgreSQL"), "product name");
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS j_items");
                s.execute("CREATE TABLE j_items (id BIGINT PRIMARY KEY, name TEXT, price NUMERIC(10,2), at TIMESTAMP, ok BOOLEAN, data BYTEA)");
            }
            try (PreparedStatement p = c.prepareStatement("INSERT INTO j_items VALUES (?, ?, ?, ?, ?, ?)")) {
                p.setLong(1, 1);
                p.setString(2, "one");
                p.setBigDecimal(3, new BigDecimal("1.50"));
                p.setTimestamp(4, Timestamp.valueOf("2024-01-02 03:04:05"));
                p.setBoolean(5, true);
                p.setBytes(6, new byte[] {0, 1});
                check(p.executeUpdate() == 1, "insert count");
                p.setLong(1, 2);
                p.setNull(2, Types.VARCHAR);
                p.setNull(3, Types.NUMERIC);
                p.setNull(4, Types.TIMESTAMP);
                p.setNull(5, Types.BOOLEAN);
                p.setNull(6, Types.BINARY);
                check(p.executeUpdate() == 1, "insert nulls");
            }
            try (PreparedStatement q = c.prepareStatement("SELECT id, name, price, at, ok, data FROM j_items WHERE id >= ? ORDER BY id")) {
                q.setLong(1, 1);
                try (ResultSet rs = q.executeQuery()) {
                    check(rs.next(), "row 1");
                    check(rs.getLong(1) == 1 && rs.getString(2).equals("one"), "row 1 id/name");
                    check(rs.getBigDecimal(3).compareTo(new BigDecimal("1.50")) == 0, "numeric");
                    check(rs.getTimestamp(4).equals(Timestamp.valueOf("2024-01-02 03:04:05")), "timestamp");
                    check(rs.getBoolean(5), "bool");
                    byte[] d = rs.getBytes(6);
                    check(d.length == 2 && d[0] == 0 && d[1] == 1, "bytea");
                    check(rs.next(), "row 2");
                    rs.getString(2);
                    check(rs.wasNull(), "null name");
                    check(!rs.next(), "two rows");
                }
            }
            try (Statement s = c.createStatement()) {
                s.execute("INSERT INTO j_items (id) VALUES (1)");
                throw new AssertionError("duplicate key accepted");
            } catch (SQLException e) {
                check("23505".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
            }
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE j_items");
            }
        }
        System.out.println("jdbc: ok");
    }
}
