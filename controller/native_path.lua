-- The native request path: a model call Envoy decides alone, with no ext_proc message.
--
-- controller/native_path.py renders this program behind a generated prelude that defines its
-- tables (API-key digests -> tenant, model -> the bindings serving it) and the names it shares
-- with extproc (metadata namespaces and keys). It runs in Envoy's Lua filter (LuaJIT) on the
-- model-call route, before the ext_proc filter, and does one of two things:
--
-- * the happy case it can decide exactly as extproc would (an API key with one tenant, a valid
--   JSON body, a binding of that model the tenant may call and that needs nothing but routing,
--   credential injection and usage metering, no translation, no usage chunk to strip): it
--   rewrites the model name in the body, writes the dynamic metadata extproc's body reply would
--   write (route, settle record, response-side state, access-log fields), and clears the route
--   cache; the binding's native route then runs with the ext_proc filter off;
-- * anything else, or any doubt: it changes nothing and returns. The request goes on to the
--   ext_proc filter exactly as before, so every refusal keeps extproc's status and message.
--
-- The prelude defines: KEY_DATA, BINDING_DATA (data, one record per line, tab-separated
-- percent-encoded fields), VERSION, ACCESS, MAX_HEADERS, MAX_HEADER_BYTES, MAX_BODY, MODEL_ROUTE and NAME
-- (the namespaces and keys of the metadata).

local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, ror, tobit, tohex = bit.lshift, bit.rshift, bit.ror, bit.tobit, bit.tohex
local byte, char, sub, find, match = string.byte, string.char, string.sub, string.find, string.match
local gsub, gmatch, lower, rep = string.gsub, string.gmatch, string.lower, string.rep
local floor, tonumber, tostring, pairs = math.floor, tonumber, tostring, pairs

-- SHA-256 (FIPS 180-4) ----------------------------------------------------------------------

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end
local W = {}

local function be32(x)
  return char(band(rshift(x, 24), 255), band(rshift(x, 16), 255), band(rshift(x, 8), 255), band(x, 255))
end

-- The SHA-256 digest of the bytes of ``msg``, as 64 lowercase hex digits.
local function sha256_hex(msg)
  local len = #msg
  local bits = len * 8
  msg = msg .. "\128" .. rep("\0", (55 - len) % 64) .. be32(floor(bits / 4294967296)) .. be32(bits % 4294967296)
  local h0, h1, h2, h3 = tobit(0x6a09e667), tobit(0xbb67ae85), tobit(0x3c6ef372), tobit(0xa54ff53a)
  local h4, h5, h6, h7 = tobit(0x510e527f), tobit(0x9b05688c), tobit(0x1f83d9ab), tobit(0x5be0cd19)
  for off = 1, #msg, 64 do
    for t = 0, 15 do
      local a, b, c, d = byte(msg, off + t * 4, off + t * 4 + 3)
      W[t] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for t = 16, 63 do
      local w15, w2 = W[t - 15], W[t - 2]
      local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
      local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
      W[t] = tobit(W[t - 16] + s0 + W[t - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for t = 0, 63 do
      local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g)) + K[t + 1] + W[t]
      local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return tohex(h0, 8) .. tohex(h1, 8) .. tohex(h2, 8) .. tohex(h3, 8) .. tohex(h4, 8) .. tohex(h5, 8) .. tohex(h6, 8) .. tohex(h7, 8)
end

-- The tables ----------------------------------------------------------------------------------

local function decoded(field)
  return (gsub(field, "%%(%x%x)", function(x) return char(tonumber(x, 16)) end))
end

-- sha256(key) hex -> the caller: its tenant, and that tenant's namespace wildcard.
local KEYS = {}
for digest, tenant in gmatch(KEY_DATA, "(%x+)\t([^\n]+)") do
  tenant = decoded(tenant)
  KEYS[digest] = { tenant = tenant, ns = match(tenant, "^[^/]*"), wildcard = match(tenant, "^[^/]*") .. "/*" }
end

-- model -> the bindings serving it, sorted by key (as extproc's policy holds them).
local MODELS = {}
for line in gmatch(BINDING_DATA, "[^\n]+") do
  local model, key, ns, route, api, target, embeddings, patterns =
    match(line, "^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$")
  if model then
    local allow = {}
    for p in gmatch(patterns, "[^ ]+") do allow[decoded(p)] = true end
    local b = {
      key = decoded(key), ns = decoded(ns), allow = allow, route = decoded(route), api = api,
      target = decoded(target), embeddings = embeddings == "1",
    }
    model = decoded(model)
    local list = MODELS[model]
    if list == nil then list = {}; MODELS[model] = list end
    list[#list + 1] = b
  end
end

-- The binding ``who`` reaches for a model served by ``bindings`` (Policy.resolution, for a
-- caller with one tenant), or nil when extproc must answer (not found, not allowed).
local function resolve(bindings, who)
  for i = 1, #bindings do
    local b = bindings[i]
    if b.ns == who.ns then
      if b.allow[who.tenant] or b.allow[who.wildcard] then return b end
      return nil -- the tenant's own namespace serves the model, not to it: extproc's 403
    end
  end
  for i = 1, #bindings do
    local b = bindings[i]
    if b.allow[who.tenant] or b.allow[who.wildcard] then return b end
  end
  return nil
end

-- The credential (extproc.auth.credential_from_headers), in the only shapes taken here:
-- "Authorization: Bearer <token>" with one space, or x-api-key alone; printable ASCII only.
local function credential(headers)
  local n = headers:getNumValues("authorization")
  if n == 1 then
    return match(headers:get("authorization"), "^[Bb][Ee][Aa][Rr][Ee][Rr] ([!-~]+)$")
  end
  if n == 0 and headers:getNumValues("x-api-key") == 1 then
    return match(headers:get("x-api-key"), "^([!-~]+)$")
  end
  return nil
end

-- A strict JSON reader over the body (RFC 8259, at least as strict as orjson) ------------------
--
-- It validates the whole document and records what the decision reads at the top level. A
-- duplicate key, a key with an escape, deep nesting or a number that might not fit a double
-- make it give up (nil): extproc then reads the body itself.

local S, N -- the body being read, and its length
local MAX_DEPTH = 64

-- Byte loops throughout: LuaJIT compiles them to machine code (~1 ns a byte), where its pattern
-- matcher (string.find with a class) takes ~25 ns a byte and is never compiled.

local function skip(i)
  local c = byte(S, i)
  while c == 32 or c == 10 or c == 13 or c == 9 do
    i = i + 1
    c = byte(S, i)
  end
  return i
end

local function hex_digit(x)
  if x >= 48 and x <= 57 then return x - 48 end
  if x >= 97 and x <= 102 then return x - 87 end
  if x >= 65 and x <= 70 then return x - 55 end
  return nil
end

-- The four hex digits at ``k`` as a number, or nil.
local function hex4(k)
  local a, b, c, d = byte(S, k, k + 3)
  a, b, c, d = a and hex_digit(a), b and hex_digit(b), c and hex_digit(c), d and hex_digit(d)
  if not (a and b and c and d) then return nil end
  return ((a * 16 + b) * 16 + c) * 16 + d
end

-- The length of the UTF-8 sequence starting at ``k`` (first byte ``c``), or nil if invalid.
local function utf8_length(k, c)
  local c2, c3, c4 = byte(S, k + 1, k + 3)
  if c >= 0xC2 and c <= 0xDF then
    if c2 and c2 >= 0x80 and c2 <= 0xBF then return 2 end
  elseif c >= 0xE0 and c <= 0xEF then
    local lo, hi = 0x80, 0xBF
    if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    if c2 and c2 >= lo and c2 <= hi and c3 and c3 >= 0x80 and c3 <= 0xBF then return 3 end
  elseif c >= 0xF0 and c <= 0xF4 then
    local lo, hi = 0x80, 0xBF
    if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    if c2 and c2 >= lo and c2 <= hi and c3 and c3 >= 0x80 and c3 <= 0xBF and c4 and c4 >= 0x80 and c4 <= 0xBF then
      return 4
    end
  end
  return nil
end

local ESCAPES = { [34] = true, [92] = true, [47] = true, [98] = true, [102] = true, [110] = true, [114] = true, [116] = true }

-- An escape at ``k`` (its backslash): the index after it, or nil if invalid.
local function escape_end(k)
  local e = byte(S, k + 1)
  if e ~= 117 then
    if ESCAPES[e] then return k + 2 end
    return nil
  end
  local cp = hex4(k + 2)
  if not cp then return nil end
  if cp >= 0xD800 and cp <= 0xDBFF then
    -- a high surrogate: a low one must follow (orjson refuses a lone one)
    if byte(S, k + 6) ~= 92 or byte(S, k + 7) ~= 117 then return nil end
    local low = hex4(k + 8)
    if not low or low < 0xDC00 or low > 0xDFFF then return nil end
    return k + 12
  end
  if cp >= 0xDC00 and cp <= 0xDFFF then return nil end
  return k + 6
end

-- The string at ``i`` (its opening quote): the index after it, and whether it holds an escape.
local function string_end(i)
  local k, escaped = i + 1, false
  while true do
    local c = byte(S, k)
    if c == nil then
      return nil
    elseif c == 34 then
      return k + 1, escaped
    elseif c < 32 then
      return nil -- a control character
    elseif c == 92 then
      escaped = true
      k = escape_end(k)
      if not k then return nil end
    elseif c < 128 then
      k = k + 1
    else
      local n = utf8_length(k, c)
      if not n then return nil end
      k = k + n
    end
  end
end

local function digits_end(j)
  local c = byte(S, j)
  while c and c >= 48 and c <= 57 do
    j = j + 1
    c = byte(S, j)
  end
  return j
end

-- The number at ``i``: the index after it, and "i" (an integer) or "n" (any other number).
local function number_end(i)
  local j = i
  if byte(S, j) == 45 then j = j + 1 end
  local c = byte(S, j)
  if c == 48 then
    j = j + 1
  elseif c and c >= 49 and c <= 57 then
    j = digits_end(j + 1)
  else
    return nil
  end
  local kind = "i"
  if byte(S, j) == 46 then
    local e = digits_end(j + 1)
    if e == j + 1 then return nil end
    j, kind = e, "n"
  end
  c = byte(S, j)
  if c == 101 or c == 69 then
    local k = j + 1
    local sign = byte(S, k)
    if sign == 43 or sign == 45 then k = k + 1 end
    local e = digits_end(k)
    if e == k or e - k > 2 then return nil end -- three exponent digits may overflow a double
    j, kind = e, "n"
  end
  if j - i > 32 then return nil end
  return j, kind
end

local value -- (i, depth) -> index after the value, its kind ("s", "i", "n", "t", "f", "z", "o", "a")

-- The object at ``i``: the index after it. With ``rec``, the kind of each member goes there.
local function object_end(i, depth, rec)
  if depth > MAX_DEPTH then return nil end
  local seen = rec or {}
  i = skip(i + 1)
  if byte(S, i) == 125 then return i + 1 end
  while true do
    if byte(S, i) ~= 34 then return nil end
    local e, escaped = string_end(i)
    if not e or escaped then return nil end
    local key = sub(S, i + 1, e - 2)
    if seen[key] ~= nil then return nil end
    i = skip(e)
    if byte(S, i) ~= 58 then return nil end
    i = skip(i + 1)
    local after, kind = value(i, depth + 1)
    if not after then return nil end
    seen[key] = kind
    i = skip(after)
    local c = byte(S, i)
    if c == 44 then
      i = skip(i + 1)
    elseif c == 125 then
      return i + 1
    else
      return nil
    end
  end
end

local function array_end(i, depth)
  if depth > MAX_DEPTH then return nil end
  i = skip(i + 1)
  if byte(S, i) == 93 then return i + 1 end
  while true do
    local after = value(i, depth + 1)
    if not after then return nil end
    i = skip(after)
    local c = byte(S, i)
    if c == 44 then
      i = skip(i + 1)
    elseif c == 93 then
      return i + 1
    else
      return nil
    end
  end
end

value = function(i, depth)
  local c = byte(S, i)
  if c == 34 then
    return (string_end(i)), "s"
  elseif c == 123 then
    return object_end(i, depth, nil), "o"
  elseif c == 91 then
    return array_end(i, depth), "a"
  elseif c == 116 then
    if sub(S, i, i + 3) == "true" then return i + 4, "t" end
  elseif c == 102 then
    if sub(S, i, i + 4) == "false" then return i + 5, "f" end
  elseif c == 110 then
    if sub(S, i, i + 3) == "null" then return i + 4, "z" end
  elseif c == 45 or (c and c >= 48 and c <= 57) then
    return number_end(i)
  end
  return nil
end

-- ``messages``: the index after the array, and whether it is a non-empty list of objects that
-- each have a string ``role`` (Completion._validate).
local function messages_end(i, depth)
  i = skip(i + 1)
  if byte(S, i) == 93 then return i + 1, false end
  local ok = true
  while true do
    local after
    if byte(S, i) == 123 then
      local rec = {}
      after = object_end(i, depth + 1, rec)
      ok = ok and rec.role == "s"
    else
      after = value(i, depth + 1)
      ok = false
    end
    if not after then return nil end
    i = skip(after)
    local c = byte(S, i)
    if c == 44 then
      i = skip(i + 1)
    elseif c == 93 then
      return i + 1, ok
    else
      return nil
    end
  end
end

-- What the decision reads from the body, or nil when it is not a JSON object this reader is sure
-- of: the model's raw value and where it is, stream, stream_options.include_usage, messages,
-- max_tokens, input.
local function read_body()
  local i = skip(1)
  if byte(S, i) ~= 123 then return nil end
  local facts, seen = {}, {}
  i = skip(i + 1)
  if byte(S, i) ~= 125 then
    while true do
      if byte(S, i) ~= 34 then return nil end
      local e, escaped = string_end(i)
      if not e or escaped then return nil end
      local key = sub(S, i + 1, e - 2)
      if seen[key] then return nil end
      seen[key] = true
      i = skip(e)
      if byte(S, i) ~= 58 then return nil end
      i = skip(i + 1)
      local c, after, kind = byte(S, i), nil, nil
      if key == "messages" and c == 91 then
        after, facts.messages = messages_end(i, 1)
        kind = "a"
      elseif key == "stream_options" and c == 123 then
        local rec = {}
        after, kind = object_end(i, 2, rec), "o"
        facts.include_usage = rec.include_usage == "t"
      else
        after, kind = value(i, 2)
      end
      if not after then return nil end
      if key == "model" then
        if kind ~= "s" then return nil end
        local model = sub(S, i + 1, after - 2)
        if find(model, "\\", 1, true) then return nil end -- an escaped name: extproc decodes it
        facts.model, facts.model_at, facts.model_after = model, i, after
      elseif #key == 5 and lower(key) == "model" then
        return nil -- "Model" beside "model": an upstream matching keys in any case could read it (extproc refuses it)
      elseif key == "stream" then
        facts.stream = kind
      elseif key == "max_tokens" then
        -- Anthropic's: a positive integer
        local raw = sub(S, i, after - 1)
        facts.max_tokens = kind == "i" and #raw <= 15 and find(raw, "^[1-9]") ~= nil
      elseif key == "input" then
        facts.input = true
      end
      i = skip(after)
      c = byte(S, i)
      if c == 44 then
        i = skip(i + 1)
      elseif c == 125 then
        break
      else
        return nil
      end
    end
  end
  if skip(i + 1) ~= N + 1 then return nil end
  return facts
end

-- The decision ---------------------------------------------------------------------------------

local ENDPOINTS = {
  ["/v1/chat/completions"] = { op = "chat", api = "openai" },
  ["/v1/messages"] = { op = "chat", api = "anthropic" },
  ["/v1/embeddings"] = { op = "embeddings", api = "openai" },
}

function envoy_on_request(handle)
  local info = handle:streamInfo()
  if info:routeName() ~= MODEL_ROUTE then return end
  local headers = handle:headers()
  local path = match(headers:get(":path") or "", "^[^?]*")
  if sub(path, -1) == "/" then path = sub(path, 1, -2) end
  local endpoint = ENDPOINTS[path]
  if not endpoint or headers:getNumValues("x-session-id") ~= 0 then return end
  if headers:getNumValues("content-type") ~= 1 then return end
  if sub(lower(headers:get("content-type")), 1, 16) ~= "application/json" then return end
  local key = credential(headers)
  if not key or #key > 1024 then return end
  -- extproc answers 431 above the gateway's header limits: anything near them goes to it.
  local count, size = 0, 0
  for k, v in pairs(headers) do
    count = count + 1
    size = size + #k + #v
  end
  if count > MAX_HEADERS or size > MAX_HEADER_BYTES then return end
  local who = KEYS[sha256_hex(key)]
  if not who then return end

  local body = handle:body()
  if not body then return end
  N = body:length()
  if N == 0 or N > MAX_BODY then return end -- a large body is extproc's to read (off Envoy's worker)
  S = body:getBytes(0, N)
  local ok, facts = pcall(read_body)
  local text = S
  S = nil
  if not ok or not facts or not facts.model then return end
  local bindings = MODELS[facts.model]
  local b = bindings and resolve(bindings, who)
  if not b or b.route == "" then return end

  local op, api = endpoint.op, endpoint.api
  local stream = facts.stream
  if op == "chat" then
    if not facts.messages or b.api ~= api then return end -- invalid, or translated
    if stream ~= nil and stream ~= "t" and stream ~= "f" then return end
    if api == "anthropic" and not facts.max_tokens then return end
    -- An OpenAI stream's usage chunk is forced upstream and stripped for a client that did not
    -- ask for it: extproc's response side.
    if api == "openai" and stream == "t" and not facts.include_usage then return end
  elseif not b.embeddings or not facts.input then
    return
  end

  local rewritten -- the body with the backend's model name (``target``: a JSON string)
  if b.target ~= '"' .. facts.model .. '"' then
    rewritten = sub(text, 1, facts.model_at - 1) .. b.target .. sub(text, facts.model_after)
  end

  -- (Envoy's wrappers taken before body() waited are out of scope now: take them again.)
  headers = handle:headers()
  local md = handle:streamInfo():dynamicMetadata()
  -- (The APIs extproc also names there are constants on a native route: never translated.)
  md:set(NAME.route_ns, NAME.route, b.route)
  -- The settle record (extproc.route_reply.settle_record) and the response side's state
  -- (ModelCall.state): the access log settles the call, a provider's error is mapped.
  md:set(NAME.settle_ns, "tenant", who.tenant)
  md:set(NAME.settle_ns, "binding", b.key)
  md:set(NAME.settle_ns, "operation", op)
  md:set(NAME.settle_ns, "request_model", facts.model)
  md:set(NAME.settle_ns, "api", api)
  md:set(NAME.state_ns, "started", tonumber(handle:timestampString(EnvoyTimestampResolution.MICROSECOND)) / 1e6)
  -- (An absent key reads as "", as extproc's empty strings do.)
  if stream == "t" then md:set(NAME.state_ns, "stream", "1") end
  if op == "chat" and api == "openai" and facts.include_usage then md:set(NAME.state_ns, "include_usage", "1") end
  if ACCESS then
    md:set(NAME.access_ns, "operation", op)
    md:set(NAME.access_ns, "api", api)
    md:set(NAME.access_ns, "policy_version", VERSION)
    md:set(NAME.access_ns, "tenant", who.tenant)
    md:set(NAME.access_ns, "binding", b.key)
    md:set(NAME.access_ns, "model_requested", facts.model)
  end
  if rewritten then
    body:setBytes(rewritten)
    if headers:get("content-length") then headers:replace("content-length", tostring(#rewritten)) end
  end
  handle:clearRouteCache()
end
