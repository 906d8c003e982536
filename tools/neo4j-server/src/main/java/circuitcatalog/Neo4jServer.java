package circuitcatalog;

import java.nio.file.Path;
import java.time.Duration;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.graphdb.GraphDatabaseService;

/**
 * Runs Neo4j Community embedded with a Bolt connector on 127.0.0.1.
 *
 * Usage: Neo4jServer HOME_DIR PORT [PAGECACHE, e.g. 256m]
 * Prints "READY bolt://127.0.0.1:PORT" once the default database answers, then blocks until
 * SIGTERM/SIGINT, when a shutdown hook closes the store cleanly.
 *
 * Two bounds a configuration cannot give, both ending this JVM so that Supervisor starts it again:
 * RunawayWatchdog (a Neo4j extension on the classpath) for a query that outlives its timeout, and
 * -XX:+ExitOnOutOfMemoryError on the command line (a query that fills the heap otherwise leaves Neo4j's own
 * scheduler threads dead). Run under Supervisor (-Dcircuitcatalog.supervised=true), the server also halts
 * when its supervisor is gone: kill -9 of the supervisor must not leave an orphan holding the port and store.
 */
public final class Neo4jServer {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: Neo4jServer HOME_DIR PORT [PAGECACHE]");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        int port = Integer.parseInt(args[1]);
        String pageCache = args.length > 2 ? args[2] : "256m";

        DatabaseManagementService service = new DatabaseManagementServiceBuilder(home)
                .setConfig(BoltConnector.enabled, true)
                .setConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", port))
                .setConfig(GraphDatabaseSettings.auth_enabled, false)
                .setConfig(GraphDatabaseSettings.pagecache_memory, org.neo4j.io.ByteUnit.parse(pageCache))
                .setConfig(GraphDatabaseSettings.transaction_timeout, Duration.ofMinutes(10))
                // one ingest batch is one transaction; large models write ~1e6 rows per batch, more
                // than the default cap (70% of heap) allows, so the cap is the heap itself
                .setConfig(GraphDatabaseSettings.memory_transaction_global_max_size, 0L)
                // a test or benchmark server writes GBs of transactions: by default Neo4j keeps
                // 2 days / 2 GB of transaction logs in 256 MB preallocated files, which filled
                // small disks; nothing here needs point-in-time recovery, so keep only the latest
                .setConfig(GraphDatabaseSettings.keep_logical_logs, "false")
                .setConfig(GraphDatabaseSettings.logical_log_rotation_threshold, 64L * 1024 * 1024)
                .setConfig(GraphDatabaseSettings.preallocate_logical_logs, false)
                // logs are pruned only at a checkpoint, by default every 15 minutes
                .setConfig(GraphDatabaseSettings.check_point_interval_time, Duration.ofMinutes(1))
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(service::shutdown, "neo4j-shutdown"));

        GraphDatabaseService db = service.database(GraphDatabaseSettings.DEFAULT_DATABASE_NAME);
        db.executeTransactionally("RETURN 1");
        if (Boolean.getBoolean("circuitcatalog.supervised")) {
            ProcessHandle parent = ProcessHandle.current().parent().orElseThrow();
            Thread watch = new Thread(() -> watchParent(parent), "supervisor-watch");
            watch.setDaemon(true);
            watch.start();
        }
        System.out.println("READY bolt://127.0.0.1:" + port);
        System.out.flush();
        Thread.currentThread().join();
    }

    private static void watchParent(ProcessHandle parent) {
        // a killed parent is a zombie (alive to isAlive) until reaped, but its children are re-parented at once
        while (parent.isAlive() && ProcessHandle.current().parent().map(ProcessHandle::pid).orElse(-1L) == parent.pid()) {
            sleep(250);
        }
        Runtime.getRuntime().halt(137);
    }

    private static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
