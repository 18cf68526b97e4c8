-- wrk: create+confirm with automatic capture, a fresh Idempotency-Key per request.
-- Keys are "<tag><thread>-<run start>-<counter>": distinct across threads, runs and tagged
-- processes.
local counter = 0
local prefix = ""
local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
    thread:set("started", os.time())
end

function init(args)
    -- An optional tag (wrk … -- <tag>) keeps several wrk processes' keys apart.
    prefix = (args[1] or "") .. tostring(tid) .. "-" .. tostring(started)
end

function request()
    counter = counter + 1
    local headers = {
        ["Authorization"] = "Bearer sk_test_demo",
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = prefix .. "-" .. counter,
    }
    local body = '{"order_id":"ord_bench","amount":{"value":1999,"currency":"USD"},'
        .. '"payment_method":"pm_card_visa","capture_strategy":"automatic","confirm":true}'
    return wrk.format("POST", "/api/v1/payments", headers, body)
end

local statuses = {}
function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
    io.write(string.format("non-2xx responses: %d\n", summary.errors.status))
    for _, p in pairs({ 50, 90, 99, 99.9 }) do
        io.write(string.format("latency p%s: %.2f ms\n", p, latency:percentile(p) / 1000))
    end
end
