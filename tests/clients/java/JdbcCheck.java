// pgjdbc through pgsluice: WORKERS threads, one connection each.
// prepareThreshold=1: a PreparedStatement becomes a named server-side
// statement (S_1, S_2, ... per connection) from its first execution on, so
// every later execution is Bind/Execute of a statement parsed earlier.
//
//   javac -cp /usr/share/java/postgresql.jar -d OUT JdbcCheck.java
//   java -cp OUT:/usr/share/java/postgresql.jar JdbcCheck postgres://user:pass@host:port/db

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    static final int WORKERS = Integer.parseInt(env("WORKERS", "20"));
    static final int ITERS = Integer.parseInt(env("ITERS", "100"));
    static final double DEADLINE = Double.parseDouble(env("CHECK_DEADLINE", "90"));
    static final int BIG_ROWS = 10_000;
    static final int BIG_WIDTH = 1_000;
    static final int COPY_ROWS = 500;
    static final String T = "sluice_jdbc";
    static final boolean TIMING = !env("CHECK_TIMING", "").isEmpty();

    static String jdbcUrl;
    static Properties baseProps = new Properties();

    // ------------------------------------------------------------- tally
    static final AtomicInteger passed = new AtomicInteger();
    static final AtomicInteger failed = new AtomicInteger();
    static final Map<String, Integer> failures = new TreeMap<>();
    static final long started = System.nanoTime();

    static String env(String k, String d) {
        String v = System.getenv(k);
        return v == null || v.isEmpty() ? d : v;
    }

    // check name -> {passed, failed}, in the order first seen
    static final Map<String, int[]> byName = new java.util.LinkedHashMap<>();

    static void ok(String name) {
        passed.incrementAndGet();
        synchronized (failures) {
            byName.computeIfAbsent(name, k -> new int[2])[0]++;
        }
    }

    static void fail(String name, String detail) {
        failed.incrementAndGet();
        int n;
        synchronized (failures) {
            n = failures.getOrDefault(name, 0);
            failures.put(name, n + 1);
            byName.computeIfAbsent(name, k -> new int[2])[1]++;
        }
        if (n < 3) {
            System.out.println("FAIL " + name + ": " + detail);
            System.out.flush();
        }
    }

    static void finish(int unfinished) {
        if (unfinished > 0) {
            failed.addAndGet(unfinished);
            System.out.printf("FAIL deadline: %d worker(s) still running after %.0fs%n", unfinished, DEADLINE);
        }
        synchronized (failures) {
            if (failed.get() > 0) {
                StringBuilder sb = new StringBuilder();
                byName.forEach((k, v) -> sb.append(sb.length() > 0 ? ", " : "").append(k).append(' ')
                        .append(v[0]).append('/').append(v[0] + v[1]));
                System.out.println("jdbc: by check (passed/total): " + sb);
            }
        }
        System.out.printf("jdbc: %.1fs%n", (System.nanoTime() - started) / 1e9);
        System.out.println(passed.get() + " passed, " + failed.get() + " failed");
        System.out.flush();
        Runtime.getRuntime().halt(failed.get() > 0 || passed.get() == 0 ? 1 : 0);
    }

    static void expect(boolean cond, String detail) {
        if (!cond) throw new AssertionError(detail);
    }

    interface Check {
        void run(Connection c, int w) throws Exception;
    }

    static boolean run(String name, Check fn, Connection c, int w) {
        try {
            fn.run(c, w);
            ok(name);
            return true;
        } catch (SQLException e) {
            fail(name, "SQLSTATE " + e.getSQLState() + " " + e.getMessage());
        } catch (Throwable e) {
            fail(name, e.getClass().getSimpleName() + ": " + e.getMessage());
        }
        return false;
    }

    static void expectError(String sqlstate, Check fn, Connection c, int w, String what) throws Exception {
        try {
            fn.run(c, w);
        } catch (SQLException e) {
            expect(sqlstate.equals(e.getSQLState()),
                    what + ": expected SQLSTATE " + sqlstate + ", got " + e.getSQLState() + " " + e.getMessage());
            return;
        }
        throw new AssertionError(what + ": no error (expected SQLSTATE " + sqlstate + ")");
    }

    static <X> List<X> rotated(List<X> items, int w) {
        int k = w % items.size();
        List<X> out = new ArrayList<>(items.subList(k, items.size()));
        out.addAll(items.subList(0, k));
        return out;
    }

    static Connection connect(int w) throws SQLException {
        Properties p = new Properties();
        p.putAll(baseProps);
        p.setProperty("ApplicationName", "jdbc-w" + w);
        return DriverManager.getConnection(jdbcUrl, p);
    }

    // ------------------------------------------------------------- data
    // Statement SQL and the expected text of its single value for (i, w).
    static final List<String[]> SELECTS = Arrays.asList(
            new String[] {"add", "SELECT ?::int * 2 + ?::int"},
            new String[] {"concat", "SELECT ?::text || '-' || ?::int"},
            new String[] {"count", "SELECT count(*)::int FROM generate_series(1, ?::int)"},
            new String[] {"nulls", "SELECT (?::int IS NULL)::text || ?::text"});

    static void bind(String name, PreparedStatement ps, int i, int w) throws SQLException {
        switch (name) {
            case "add": ps.setInt(1, i); ps.setInt(2, w); break;
            case "concat": ps.setString(1, "w" + w); ps.setInt(2, i); break;
            case "count": ps.setInt(1, i); break;
            default: ps.setNull(1, java.sql.Types.INTEGER); ps.setString(2, "-" + w); break;
        }
    }

    static String expected(String name, int i, int w) {
        switch (name) {
            case "add": return Integer.toString(i * 2 + w);
            case "concat": return "w" + w + "-" + i;
            case "count": return Integer.toString(i);
            default: return "true-" + w;
        }
    }

    static String one(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            expect(rs.next(), "no row");
            String v = rs.getString(1);
            expect(!rs.next(), "more than one row");
            return v;
        }
    }

    static int intQuery(Connection c, String sql, Object... args) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int k = 0; k < args.length; k++) ps.setObject(k + 1, args[k]);
            return Integer.parseInt(one(ps));
        }
    }

    static String copyRow(int w, int i) {
        return "copy\t" + w + "/" + i + " \\ é";
    }

    static String copyField(String s) {
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n");
    }

    // ------------------------------------------------------------- checks
    static void checkPrepared(Connection c, int w) throws Exception {
        List<String[]> order = rotated(SELECTS, w);
        List<PreparedStatement> stmts = new ArrayList<>();
        try {
            for (String[] s : order) stmts.add(c.prepareStatement(s[1]));
            for (int i = 0; i < ITERS; i++) {
                for (int k = 0; k < order.size(); k++) {
                    String name = order.get(k)[0];
                    PreparedStatement ps = stmts.get(k);
                    bind(name, ps, i, w);
                    String got = one(ps);
                    expect(expected(name, i, w).equals(got), name + " i=" + i + ": expected " + expected(name, i, w) + ", got " + got);
                }
            }
            for (PreparedStatement ps : stmts) {
                expect(ps.unwrap(PGStatement.class).isUseServerPrepare(), "statement not server-prepared");
            }
        } finally {
            for (PreparedStatement ps : stmts) ps.close();
        }
        // The same SQL prepared anew each time (pgjdbc's statement cache).
        for (int i = 0; i < 20; i++) {
            expect(intQuery(c, "SELECT ?::int + 1000", i) == i + 1000, "re-prepared i=" + i);
        }
    }

    static void checkBatch(Connection c, int w) throws Exception {
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + T + " (w, i, s, kind) VALUES (?, ?, ?, 'batch')")) {
            for (int i = 0; i < 50; i++) {
                ps.setInt(1, w);
                ps.setInt(2, i);
                ps.setString(3, "b" + i);
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            expect(counts.length == 50, counts.length + " batch results");
        }
        expect(intQuery(c, "SELECT count(*)::int FROM " + T + " WHERE w = ? AND kind = 'batch'", w) == 50, "batch rows");
        expect(intQuery(c, "SELECT sum(i)::int FROM " + T + " WHERE w = ? AND kind = 'batch'", w) == 1225, "batch sum");
    }

    static void checkRollback(Connection c, int w) throws Exception {
        String ins = "INSERT INTO " + T + " (w, i, s, kind) VALUES (?, ?, 'x', ?)";
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement(ins)) {
            ps.setInt(1, w); ps.setInt(2, 1); ps.setString(3, "rolled-back");
            ps.executeUpdate();
            c.rollback();
            ps.setInt(2, 2); ps.setString(3, "committed");
            ps.executeUpdate();
            Savepoint sp = c.setSavepoint();
            ps.setInt(2, 3); ps.setString(3, "savepoint");
            ps.executeUpdate();
            c.rollback(sp);
            ps.setInt(2, 4); ps.setString(3, "committed");
            ps.executeUpdate();
            c.commit();
        } finally {
            c.setAutoCommit(true);
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT kind, count(*)::int FROM " + T
                + " WHERE w = ? AND kind IN ('rolled-back', 'committed', 'savepoint') GROUP BY kind ORDER BY kind")) {
            ps.setInt(1, w);
            StringBuilder sb = new StringBuilder();
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) sb.append(rs.getString(1)).append('=').append(rs.getInt(2)).append(' ');
            }
            expect(sb.toString().equals("committed=2 "), "expected only 2 committed rows, got " + sb);
        }
    }

    static void checkErrorInTransaction(Connection c, int w) throws Exception {
        c.setAutoCommit(false);
        try {
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + T + " (w, i, s, kind) VALUES (?, 1, 'x', 'doomed')")) {
                ps.setInt(1, w);
                ps.executeUpdate();
            }
            expectError("22012", (cc, ww) -> intQuery(cc, "SELECT 100 / ?::int", 0), c, w, "division");
            expectError("25P02", (cc, ww) -> intQuery(cc, "SELECT 1"), c, w, "query in failed transaction");
            c.rollback();
        } finally {
            c.setAutoCommit(true);
        }
        int n = intQuery(c, "SELECT count(*)::int FROM " + T + " WHERE w = ? AND kind = 'doomed'", w);
        expect(n == 0, n + " rows of a rolled-back transaction are visible");
    }

    static void checkPortalFetch(Connection c, int w) throws Exception {
        // A fetch size inside a transaction: a named portal, Execute with a row limit.
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("SELECT i, ?::int FROM generate_series(0, ? - 1) i")) {
            ps.setFetchSize(100);
            ps.setInt(1, w);
            ps.setInt(2, 5000);
            int i = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    expect(rs.getInt(1) == i && rs.getInt(2) == w, "portal row " + i);
                    i++;
                }
            }
            expect(i == 5000, "portal gave " + i + " rows");
            c.commit();
        } finally {
            c.setAutoCommit(true);
        }
    }

    static void checkCopy(Connection c, int w) throws Exception {
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder in = new StringBuilder();
        StringBuilder want = new StringBuilder();
        for (int i = 0; i < COPY_ROWS; i++) {
            String s = copyField(copyRow(w, i));
            in.append(w).append('\t').append(i).append('\t').append(s).append("\tcopy\n");
            want.append(w).append('\t').append(i).append('\t').append(s).append('\n');
        }
        long n = cm.copyIn("COPY " + T + " (w, i, s, kind) FROM STDIN",
                new ByteArrayInputStream(in.toString().getBytes(StandardCharsets.UTF_8)));
        expect(n == COPY_ROWS, "COPY FROM reported " + n + " rows");
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        long m = cm.copyOut("COPY (SELECT w, i, s FROM " + T + " WHERE w = " + w + " AND kind = 'copy' ORDER BY i) TO STDOUT", out);
        expect(m == COPY_ROWS, "COPY TO reported " + m + " rows");
        String got = out.toString(StandardCharsets.UTF_8);
        expect(got.equals(want.toString()), "COPY TO: " + got.length() + " chars, expected " + want.length());
    }

    static void checkBigResult(Connection c, int w) throws Exception {
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT i, repeat(chr(65 + mod(i, 26)), ?) FROM generate_series(0, ? - 1) i ORDER BY i")) {
            ps.setInt(1, BIG_WIDTH);
            ps.setInt(2, BIG_ROWS);
            int i = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    String s = rs.getString(2);
                    expect(rs.getInt(1) == i && s.length() == BIG_WIDTH && s.charAt(0) == (char) (65 + i % 26)
                            && s.charAt(BIG_WIDTH - 1) == (char) (65 + i % 26), "row " + i + " wrong");
                    i++;
                }
            }
            expect(i == BIG_ROWS, i + " rows");
        }
    }

    static void checkErrorRecovery(Connection c, int w) throws Exception {
        expectError("22012", (cc, ww) -> {
            try (Statement st = cc.createStatement()) {
                st.executeQuery("SELECT 1/0");
            }
        }, c, w, "simple 1/0");
        expect(intQuery(c, "SELECT ?::int + 1", 41) == 42, "query after error");
        try (PreparedStatement ps = c.prepareStatement("SELECT 100 / ?::int")) {
            int[][] cases = {{0, -1}, {4, 25}, {0, -1}, {5, 20}};
            for (int[] cs : cases) {
                ps.setInt(1, cs[0]);
                if (cs[1] < 0) {
                    expectError("22012", (cc, ww) -> one(ps), c, w, "100/" + cs[0]);
                } else {
                    expect(Integer.parseInt(one(ps)) == cs[1], "100/" + cs[0]);
                }
            }
        }
        expectError("42601", (cc, ww) -> intQuery(cc, "SELEC ?::int", 1), c, w, "syntax error");
        expectError("42703", (cc, ww) -> intQuery(cc, "SELECT no_such_column FROM " + T + " WHERE w = ?", ww), c, w,
                "undefined column");
        expect(intQuery(c, "SELECT ?::int * 2 + ?::int", 5, w) == 10 + w, "prepared statement after errors");
    }

    static final ScheduledExecutorService timer = Executors.newScheduledThreadPool(2, r -> {
        Thread t = new Thread(r, "canceller");
        t.setDaemon(true);
        return t;
    });

    static void checkCancelInTransaction(Connection c, int w) throws Exception {
        long start = System.nanoTime();
        c.setAutoCommit(false);
        // In a transaction the server is attached before pg_sleep is sent, so
        // one cancel (all pgjdbc sends per execution) 300 ms later hits it.
        try (Statement st = c.createStatement()) {
            st.executeQuery("SELECT 1").close();
            AtomicBoolean cancelFailed = new AtomicBoolean();
            ScheduledFuture<?> f = timer.schedule(() -> {
                try {
                    st.cancel();
                } catch (SQLException e) {
                    cancelFailed.set(true);
                }
            }, 300, TimeUnit.MILLISECONDS);
            try {
                expectError("57014", (cc, ww) -> st.executeQuery("SELECT pg_sleep(30)"), c, w, "cancelled pg_sleep");
            } finally {
                if (!f.cancel(false)) f.get();
            }
            expect(!cancelFailed.get(), "Statement.cancel() threw");
            c.rollback();
        } finally {
            c.setAutoCommit(true);
        }
        expect(intQuery(c, "SELECT ?::int * 2 + ?::int", 7, w) == 14 + w, "query after cancel");
        double secs = (System.nanoTime() - start) / 1e9;
        expect(secs < 15, "cancel took " + secs + "s");
    }

    static void checkCancelAutocommit(Connection c, int w) throws Exception {
        // Outside a transaction the query may still wait for a server, where a
        // cancel has nothing to hit, and pgjdbc sends one cancel per execution
        // (a second Statement.cancel() is a no-op). So cancel once the query
        // has shown it runs: its function raises a NOTICE before it sleeps,
        // which pgjdbc adds to the statement's warnings as it arrives.
        long start = System.nanoTime();
        try (PreparedStatement ps = c.prepareStatement("SELECT " + T + "_sleep(?)")) {
            ps.setDouble(1, 30.0);
            AtomicBoolean done = new AtomicBoolean();
            AtomicBoolean noticed = new AtomicBoolean();
            CountDownLatch stopped = new CountDownLatch(1);
            Thread t = new Thread(() -> {
                try {
                    long until = System.nanoTime() + 10_000_000_000L;
                    while (!done.get() && ps.getWarnings() == null && System.nanoTime() < until) Thread.sleep(20);
                    noticed.set(ps.getWarnings() != null);
                    if (!done.get()) ps.cancel();
                } catch (Exception e) {
                    // reported through the query's outcome
                } finally {
                    stopped.countDown();
                }
            });
            t.setDaemon(true);
            t.start();
            try {
                expectError("57014", (cc, ww) -> ps.executeQuery(), c, w, "cancelled pg_sleep");
            } finally {
                done.set(true);
                stopped.await();
            }
            expect(noticed.get(), "no NOTICE from the running query before the cancel");
        }
        expect(intQuery(c, "SELECT ?::int * 2 + ?::int", 9, w) == 18 + w, "query after cancel");
        double secs = (System.nanoTime() - start) / 1e9;
        expect(secs < 20, "cancel took " + secs + "s");
    }

    static final Object[][] WORKER_CHECKS = {
        {"prepared", (Check) JdbcCheck::checkPrepared},
        {"batch", (Check) JdbcCheck::checkBatch},
        {"rollback", (Check) JdbcCheck::checkRollback},
        {"error-in-transaction", (Check) JdbcCheck::checkErrorInTransaction},
        {"portal-fetch", (Check) JdbcCheck::checkPortalFetch},
        {"copy", (Check) JdbcCheck::checkCopy},
        {"big-result", (Check) JdbcCheck::checkBigResult},
        {"error-recovery", (Check) JdbcCheck::checkErrorRecovery},
        {"cancel-in-transaction", (Check) JdbcCheck::checkCancelInTransaction},
        {"cancel-autocommit", (Check) JdbcCheck::checkCancelAutocommit},
        {"prepared-again", (Check) JdbcCheck::checkPrepared},
    };

    static void worker(int w) {
        Connection c;
        try {
            c = connect(w);
        } catch (SQLException e) {
            fail("connect", "worker " + w + ": " + e.getMessage());
            return;
        }
        ok("connect");
        try {
            for (Object[] chk : WORKER_CHECKS) {
                String name = (String) chk[0];
                try {
                    if (c.isClosed()) {
                        fail(name, "worker " + w + ": connection closed");
                        continue;
                    }
                    if (!c.getAutoCommit()) c.setAutoCommit(true);
                } catch (SQLException e) {
                    fail(name, "worker " + w + ": " + e.getMessage());
                    continue;
                }
                long t0 = System.nanoTime();
                boolean passedCheck = run(name, (Check) chk[1], c, w);
                if (TIMING) System.out.printf("timing: worker %d %s %.2fs%n", w, name, (System.nanoTime() - t0) / 1e9);
                if (!passedCheck) {
                    try {
                        if (!c.isClosed() && !c.getAutoCommit()) c.rollback();
                    } catch (SQLException ignored) {
                        // the next check reports a broken connection
                    }
                }
            }
        } finally {
            try {
                c.close();
            } catch (SQLException ignored) {
                // closing is not a check
            }
        }
    }

    static void parseUrl(String url) throws Exception {
        URI u = new URI(url);
        String[] userInfo = (u.getRawUserInfo() == null ? "" : u.getRawUserInfo()).split(":", 2);
        jdbcUrl = "jdbc:postgresql://" + u.getHost() + ":" + (u.getPort() < 0 ? 5432 : u.getPort()) + u.getRawPath();
        if (!userInfo[0].isEmpty()) baseProps.setProperty("user", URLDecoder.decode(userInfo[0], StandardCharsets.UTF_8));
        if (userInfo.length > 1) baseProps.setProperty("password", URLDecoder.decode(userInfo[1], StandardCharsets.UTF_8));
        baseProps.setProperty("prepareThreshold", "1");
        baseProps.setProperty("connectTimeout", "60");
        baseProps.setProperty("sslmode", "disable");
    }

    public static void main(String[] args) throws Exception {
        String url = args.length > 0 ? args[0] : System.getenv("DATABASE_URL");
        if (url == null) {
            System.err.println("usage: java JdbcCheck postgres://user:pass@host:port/db");
            System.exit(2);
        }
        parseUrl(url);
        Check setup = (c, w) -> {
            try (Connection sc = connect(-1); Statement st = sc.createStatement()) {
                st.execute("DROP TABLE IF EXISTS " + T);
                st.execute("CREATE TABLE " + T + " (w int NOT NULL, i int NOT NULL, s text NOT NULL, kind text NOT NULL)");
                st.execute("CREATE OR REPLACE FUNCTION " + T + "_sleep(s float8) RETURNS void LANGUAGE plpgsql AS "
                        + "$$BEGIN RAISE NOTICE 'sleeping'; PERFORM pg_sleep(s); END$$");
            }
        };
        if (!run("setup", setup, null, -1)) finish(0);

        CountDownLatch start = new CountDownLatch(1);
        CountDownLatch finished = new CountDownLatch(WORKERS);
        for (int w = 0; w < WORKERS; w++) {
            final int ww = w;
            Thread t = new Thread(() -> {
                try {
                    start.await();
                    worker(ww);
                } catch (InterruptedException ignored) {
                    // not reached
                } finally {
                    finished.countDown();
                }
            }, "worker-" + w);
            t.setDaemon(true);
            t.start();
        }
        start.countDown();
        if (!finished.await((long) (DEADLINE * 1000), TimeUnit.MILLISECONDS)) {
            finish((int) finished.getCount());
        }
        Check totals = (c, w) -> {
            try (Connection sc = connect(-1); Statement st = sc.createStatement();
                    ResultSet rs = st.executeQuery("SELECT kind, count(*)::int FROM " + T + " GROUP BY kind ORDER BY kind")) {
                StringBuilder sb = new StringBuilder();
                while (rs.next()) sb.append(rs.getString(1)).append('=').append(rs.getInt(2)).append(' ');
                String want = "batch=" + 50 * WORKERS + " committed=" + 2 * WORKERS + " copy=" + COPY_ROWS * WORKERS + " ";
                expect(sb.toString().equals(want), "table totals " + sb + ", expected " + want);
            }
        };
        run("totals", totals, null, -1);
        finish(0);
    }
}
