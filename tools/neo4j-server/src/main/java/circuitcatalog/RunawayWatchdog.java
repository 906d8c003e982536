package circuitcatalog;

import org.neo4j.kernel.api.KernelTransactionHandle;
import org.neo4j.kernel.api.TerminationMark;
import org.neo4j.kernel.database.Database;
import org.neo4j.kernel.extension.ExtensionFactory;
import org.neo4j.kernel.extension.ExtensionType;
import org.neo4j.kernel.extension.context.ExtensionContext;
import org.neo4j.kernel.impl.api.KernelTransactions;
import org.neo4j.kernel.lifecycle.Lifecycle;
import org.neo4j.kernel.lifecycle.LifecycleAdapter;

/**
 * A Neo4j extension (loaded from the classpath by the launcher, or from plugins/ by a Neo4j server) that
 * halts the JVM with exit code 75 when a transaction marked for termination (its timeout, or TERMINATE) is
 * still executing a query RUNAWAY_GRACE seconds later.
 *
 * Why: Neo4j checks a termination mark only when the query touches the store or moves to its next row, so
 * one expression over a huge list (reduce(), nested list comprehensions) runs to its end whatever the timeout
 * says, holding a core. A Java thread cannot be stopped from outside, so the process is: a supervisor
 * (Supervisor here, "restart: unless-stopped" in docker compose) starts it again, and committed data is safe
 * (recovery replays the transaction log). Grace: -Dcircuitcatalog.runawayGraceSeconds (default 10).
 */
public final class RunawayWatchdog extends ExtensionFactory<RunawayWatchdog.Dependencies> {
    static final int RUNAWAY_EXIT = 75;

    public interface Dependencies {
        Database database();
    }

    public RunawayWatchdog() {
        super(ExtensionType.DATABASE, "circuit-catalog-runaway-watchdog");
    }

    @Override
    public Lifecycle newInstance(ExtensionContext context, Dependencies dependencies) {
        long graceNanos = Long.getLong("circuitcatalog.runawayGraceSeconds", 10) * 1_000_000_000L;
        return new LifecycleAdapter() {
            private Thread thread;

            @Override
            public void start() {
                thread = new Thread(() -> watch(dependencies.database(), graceNanos),
                        "runaway-watchdog-" + dependencies.database().getNamedDatabaseId().name());
                thread.setDaemon(true);
                thread.start();
            }

            @Override
            public void stop() {
                thread.interrupt();
            }
        };
    }

    private static void watch(Database database, long graceNanos) {
        KernelTransactions transactions = null;
        while (!Thread.currentThread().isInterrupted()) {
            try {
                Thread.sleep(1000);
            } catch (InterruptedException e) {
                return;
            }
            if (transactions == null) {
                try {  // registered while the database starts, after its extensions
                    transactions = database.getDependencyResolver().resolveDependency(KernelTransactions.class);
                } catch (RuntimeException notYet) {
                    continue;
                }
            }
            long now = System.nanoTime();
            for (KernelTransactionHandle handle : transactions.activeTransactions()) {
                TerminationMark mark = handle.terminationMark().orElse(null);
                if (mark == null || handle.isClosing() || handle.executingQuery().isEmpty()
                        || now - mark.getTimestampNanos() <= graceNanos) {
                    continue;
                }
                String query = handle.executingQuery().get().rawQueryText().replace('\n', ' ');
                System.out.println("RUNAWAY a query still ran " + graceNanos / 1_000_000_000L + " s after it was stopped ("
                        + mark.getReason().code().serialize() + "); halting so that the server restarts: "
                        + query.substring(0, Math.min(200, query.length())));
                System.out.flush();
                Runtime.getRuntime().halt(RUNAWAY_EXIT);
            }
        }
    }
}
