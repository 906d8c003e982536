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
        System.out.println("READY bolt://127.0.0.1:" + port);
        System.out.flush();
        Thread.currentThread().join();
    }
}
