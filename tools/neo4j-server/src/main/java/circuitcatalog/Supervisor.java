package circuitcatalog;

import java.util.ArrayDeque;
import java.util.Arrays;
import java.util.List;

/**
 * Runs the server command given after "--" and starts it again when it exits with 3 (the JVM ran out of
 * heap: -XX:+ExitOnOutOfMemoryError) or 75 (RunawayWatchdog halted it), so one hostile
 * read query costs a restart, not the server. Any other exit ends the supervisor with the same code;
 * SIGTERM/SIGINT stop the server cleanly first. More than MAX_RESTARTS restarts within a minute end the
 * supervisor with the server's code: a server that cannot stay up (a heap too small to start) must not
 * restart forever.
 *
 * Usage: Supervisor -- java [JVM flags] -Dcircuitcatalog.supervised=true -cp CP circuitcatalog.Neo4jServer ...
 */
public final class Supervisor {
    static final int MAX_RESTARTS = 5;
    private static volatile Process child;
    private static volatile boolean stopping;

    public static void main(String[] args) throws Exception {
        int dash = Arrays.asList(args).indexOf("--");
        if (dash < 0 || dash == args.length - 1) {
            System.err.println("usage: Supervisor -- COMMAND...");
            System.exit(2);
        }
        List<String> command = Arrays.asList(args).subList(dash + 1, args.length);
        Runtime.getRuntime().addShutdownHook(new Thread(Supervisor::stopChild, "supervisor-stop"));
        ArrayDeque<Long> restarts = new ArrayDeque<>();
        while (true) {
            child = new ProcessBuilder(command).inheritIO().start();
            int code = child.waitFor();
            if (stopping) {
                return;
            }
            long now = System.nanoTime();
            while (!restarts.isEmpty() && now - restarts.peekFirst() > 60_000_000_000L) {
                restarts.pollFirst();
            }
            if (code != 3 && code != RunawayWatchdog.RUNAWAY_EXIT) {
                System.exit(code);
            }
            if (restarts.size() >= MAX_RESTARTS) {
                System.out.println("GAVE UP the server exited with " + code + " again after " + MAX_RESTARTS
                        + " restarts within a minute");
                System.out.flush();
                System.exit(code);
            }
            restarts.addLast(now);
            System.out.println("RESTARTING the server exited with " + code
                    + (code == 3 ? " (out of heap)" : " (runaway query)"));
            System.out.flush();
        }
    }

    private static void stopChild() {
        stopping = true;
        Process running = child;
        if (running == null) {
            return;
        }
        running.destroy();
        try {
            running.waitFor();
        } catch (InterruptedException e) {
            running.destroyForcibly();
        }
    }
}
