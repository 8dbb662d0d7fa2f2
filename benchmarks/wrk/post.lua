-- POST a fixed JSON body with fixed headers; optionally rotate x-session-id and stop after N
-- responses. Used by benchmarks/run.py and benchmarks/memory.py.
--
--   wrk -t1 -c16 -d10s --latency -s benchmarks/wrk/post.lua URL -- body=FILE [sessions=N]
--       [prefix=P] [stop=N] ["Header-Name: value" ...]
--
-- body=FILE    the request body (read once per thread)
-- sessions=N   send x-session-id: <prefix><i>, i cycling over N ids (0 = no session header; the
--              request is then prebuilt once and wrk runs in its fast static mode)
-- prefix=P     session id prefix (default "s-"), so separate runs do not share history
-- stop=N       each thread stops after N responses (wrk has no request-count mode)
-- Header: v    any number of request headers

local body_file, sessions, prefix, stop_after = nil, 0, "s-", 0
local counter, responses = 0, 0
local thread_index, thread_count = 0, 1
local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
   for _, t in ipairs(threads) do
      t:set("thread_count", #threads)
   end
end

function init(args)
   for _, a in ipairs(args) do
      local k, v = a:match("^(%w+)=(.*)$")
      if k == "body" then
         body_file = v
      elseif k == "sessions" then
         sessions = tonumber(v)
      elseif k == "prefix" then
         prefix = v
      elseif k == "stop" then
         stop_after = tonumber(v)
      else
         local name, value = a:match("^([^:]+):%s*(.*)$")
         if not name then
            error("post.lua: cannot parse argument " .. a)
         end
         wrk.headers[name] = value
      end
   end
   if not body_file then
      error("post.lua: body=FILE is required")
   end
   local f = assert(io.open(body_file, "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Length"] = tostring(#wrk.body)

   thread_index = tonumber(thread_index) or 0
   thread_count = tonumber(thread_count) or 1
   counter = thread_index

   if sessions > 0 then
      -- Defined only when needed: without it wrk sends one prebuilt request.
      request = function()
         wrk.headers["x-session-id"] = prefix .. tostring(counter % sessions)
         counter = counter + thread_count
         return wrk.format()
      end
   end
   if stop_after > 0 then
      response = function(status, headers, body)
         responses = responses + 1
         if responses >= stop_after then
            wrk.thread:stop()
         end
      end
   end
end
