-- wrk: one new AlertManager alert per webhook (a unique label set and
-- fingerprint each time), with the bench's bearer token from WRK_TOKEN.
local counter = 0
local run = tostring(os.time()) .. tostring(math.random(1, 1000000000))

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_TOKEN")

function setup(thread)
  thread:set("id", tostring(math.random(1, 1000000000)))
end

request = function()
  counter = counter + 1
  local i = (id or "0") .. "-" .. counter
  local body = '{"version":"4","status":"firing","receiver":"bench","groupKey":"{}","alerts":[{"status":"firing",'
    .. '"labels":{"alertname":"WrkNew","severity":"critical","run":"' .. run .. '","i":"' .. i .. '"},'
    .. '"annotations":{"summary":"wrk bench"},"startsAt":"2026-11-27T10:00:00Z","fingerprint":"wrk-' .. run .. '-' .. i .. '"}]}'
  return wrk.format(nil, nil, nil, body)
end

-- Latency percentiles and non-2xx count as one JSON line, for bench/run.py.
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, errors, latency:percentile(50), latency:percentile(99), latency.max))
end
