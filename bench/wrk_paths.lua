-- wrk script for bench/api_load.py: each connection's requests walk a list of paths (one a line, in the
-- order the benchmark drew them), each thread from its own offset; done() prints one JSON line of
-- figures (latencies in microseconds) and the count of non-2xx answers, which the benchmark refuses.
local paths, next_index = {}, 1
local thread_count = 0

function setup(thread)
  thread:set("thread_number", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  next_index = (thread_number * 7919) % #paths + 1
end

function request()
  local path = paths[next_index]
  next_index = next_index % #paths + 1
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
