-- The usage reader: token usage read from a provider's answer into dynamic metadata.
--
-- controller/usage_filters.py renders this program behind a prelude naming the metadata
-- namespace and keys (NS, INPUT, OUTPUT, CACHE_CREATION, CACHE_READ, MODEL, LAST_EVENT) and the
-- largest JSON answer it reads (MAX_JSON). It runs in Envoy's Lua filter (LuaJIT) where the
-- native json_to_metadata / sse_to_metadata filters ran, behind the response filter, so it sees
-- the provider's answer as it came (before any translation or usage-chunk stripping), and writes
-- what they wrote (crdgol.usage_log; extproc.usage_log settles from it):
--
-- * application/json: the top-level `usage` object's prompt_tokens / input_tokens (INPUT),
--   completion_tokens / output_tokens (OUTPUT), cache_creation_input_tokens,
--   cache_read_input_tokens, and the top-level `model` (OpenAI and Anthropic answers, embeddings);
-- * text/event-stream, per `data:` event: `usage.prompt_tokens` / `usage.completion_tokens`
--   (OpenAI's final chunk), `message.usage.input_tokens` and its cache counts (Anthropic's
--   message_start), `usage.output_tokens` (message_delta), the event's `type` (LAST_EVENT: the
--   last one seen), and the first `model` or `message.model`. Each is written as soon as its
--   event is read, so a stream cut short keeps what arrived.
--
-- It never holds a byte back: it watches the body chunks as they pass (bodyChunks) and keeps
-- only a copy of what it still needs (a JSON answer up to MAX_JSON, an SSE line cut by a chunk).

local byte, sub, find, lower = string.byte, string.sub, string.find, string.lower
local concat, tonumber = table.concat, tonumber

local S -- the text being read

local function skip(i)
  local c = byte(S, i)
  while c == 32 or c == 10 or c == 13 or c == 9 do
    i = i + 1
    c = byte(S, i)
  end
  return i
end

-- The string at ``i`` (its opening quote): the index after it, and whether it holds an escape.
local function string_end(i)
  local k, escaped = i + 1, false
  while true do
    local c = byte(S, k)
    if c == nil then return nil end
    if c == 34 then return k + 1, escaped end
    if c == 92 then
      escaped = true
      k = k + 2
    else
      k = k + 1
    end
  end
end

-- The value at ``i``: the index after it (strings skipped whole, so a bracket in one is text).
local function value_end(i)
  local c = byte(S, i)
  if c == 34 then return (string_end(i)) end
  if c == 123 or c == 91 then
    local depth, k = 0, i
    while true do
      c = byte(S, k)
      if c == nil then return nil end
      if c == 34 then
        k = string_end(k)
        if not k then return nil end
      else
        if c == 123 or c == 91 then
          depth = depth + 1
        elseif c == 125 or c == 93 then
          depth = depth - 1
          if depth == 0 then return k + 1 end
        end
        k = k + 1
      end
    end
  end
  local k = i
  while c and c ~= 44 and c ~= 125 and c ~= 93 and c ~= 32 and c ~= 10 and c ~= 13 and c ~= 9 do
    k = k + 1
    c = byte(S, k)
  end
  if k == i then return nil end
  return k
end

-- The members of the object at ``i`` that ``want`` names: key -> start index of its value, and
-- key -> index after it (in ``at`` and ``to``); false if ``i`` holds no well-formed object.
local function members(i, want, at, to)
  if byte(S, i) ~= 123 then return false end
  i = skip(i + 1)
  if byte(S, i) == 125 then return true end
  while true do
    if byte(S, i) ~= 34 then return false end
    local e = string_end(i)
    if not e then return false end
    local key = sub(S, i + 1, e - 2)
    i = skip(e)
    if byte(S, i) ~= 58 then return false end
    i = skip(i + 1)
    local after = value_end(i)
    if not after then return false end
    if want[key] then
      at[key], to[key] = i, after
    end
    i = skip(after)
    local c = byte(S, i)
    if c == 44 then
      i = skip(i + 1)
    elseif c == 125 then
      return true
    else
      return false
    end
  end
end

local function number_at(s, e)
  if not s then return nil end
  local c = byte(S, s)
  if c ~= 45 and (c == nil or c < 48 or c > 57) then return nil end
  return tonumber(sub(S, s, e - 1))
end

local function text_at(s, e)
  if not s or byte(S, s) ~= 34 then return nil end
  local after, escaped = string_end(s)
  if escaped or after ~= e then return nil end -- an escaped name: left out, as a doubt
  return sub(S, s + 1, e - 2)
end

local TOP = { usage = true, model = true, message = true, type = true }
local USAGE = {
  prompt_tokens = true, completion_tokens = true, input_tokens = true, output_tokens = true,
  cache_creation_input_tokens = true, cache_read_input_tokens = true,
}
local MESSAGE = { usage = true, model = true }

-- ``out`` is one chunk's writer: Envoy's wrappers do not outlive a yield (the next chunk), so
-- the metadata object is taken again per chunk, and only when there is something to write.
local function put(out, key, value)
  if value == nil then return end
  local md = out.md
  if not md then
    md = out.handle:streamInfo():dynamicMetadata()
    out.md = md
  end
  md:set(NS, key, value)
end

-- A whole JSON answer (json_to_metadata's rules).
local function read_json(out, text)
  S = text
  local at, to = {}, {}
  local ok = members(skip(1), TOP, at, to)
  if ok and at.usage then
    local uat, uto = {}, {}
    if members(at.usage, USAGE, uat, uto) then
      put(out, INPUT, number_at(uat.prompt_tokens, uto.prompt_tokens) or number_at(uat.input_tokens, uto.input_tokens))
      put(out, OUTPUT, number_at(uat.completion_tokens, uto.completion_tokens) or number_at(uat.output_tokens, uto.output_tokens))
      put(out, CACHE_CREATION, number_at(uat.cache_creation_input_tokens, uto.cache_creation_input_tokens))
      put(out, CACHE_READ, number_at(uat.cache_read_input_tokens, uto.cache_read_input_tokens))
    end
  end
  if ok then put(out, MODEL, text_at(at.model, to.model)) end
  S = nil
end

-- One SSE event's JSON (sse_to_metadata's rules); ``state`` carries what a stream keeps across
-- events (whether its model was written, the last event type written).
local function read_event(out, text, state)
  S = text
  local at, to = {}, {}
  if members(skip(1), TOP, at, to) then
    if at.usage then
      local uat, uto = {}, {}
      if members(at.usage, USAGE, uat, uto) then
        put(out, INPUT, number_at(uat.prompt_tokens, uto.prompt_tokens))
        put(out, OUTPUT, number_at(uat.completion_tokens, uto.completion_tokens) or number_at(uat.output_tokens, uto.output_tokens))
      end
    end
    local mat, mto = {}, {}
    local message = at.message and members(at.message, MESSAGE, mat, mto)
    if message and mat.usage then
      local uat, uto = {}, {}
      if members(mat.usage, USAGE, uat, uto) then
        put(out, INPUT, number_at(uat.input_tokens, uto.input_tokens))
        put(out, CACHE_CREATION, number_at(uat.cache_creation_input_tokens, uto.cache_creation_input_tokens))
        put(out, CACHE_READ, number_at(uat.cache_read_input_tokens, uto.cache_read_input_tokens))
      end
    end
    local kind = text_at(at.type, to.type)
    if kind and kind ~= state.last then
      state.last = kind
      put(out, LAST_EVENT, kind)
    end
    if not state.model then
      local model = text_at(at.model, to.model) or (message and text_at(mat.model, mto.model))
      if model then
        state.model = true
        put(out, MODEL, model)
      end
    end
  end
  S = nil
end

-- The complete lines of ``text`` from ``from``: each `data: {...}` event read; returns the
-- index where an unfinished line starts.
local function read_lines(out, text, from, state)
  while true do
    local nl = find(text, "\n", from, true)
    if not nl then return from end
    if sub(text, from, from + 4) == "data:" then
      local s = from + 5
      if byte(text, s) == 32 then s = s + 1 end
      local e = nl - 1
      if byte(text, e) == 13 then e = e - 1 end
      if byte(text, s) == 123 then read_event(out, sub(text, s, e), state) end
    end
    from = nl + 1
  end
end

local function media_type(headers)
  local ct = headers:get("content-type")
  if not ct then return nil end
  ct = lower(ct)
  local semi = find(ct, ";", 1, true)
  if semi then ct = sub(ct, 1, semi - 1) end
  return (ct:gsub("^%s+", ""):gsub("%s+$", ""))
end

function envoy_on_response(handle)
  local kind = media_type(handle:headers())
  if kind == "application/json" then
    local parts, n, size = {}, 0, 0
    for chunk in handle:bodyChunks() do
      local len = chunk:length()
      size = size + len
      if size > MAX_JSON then return end -- too large to read on Envoy's worker: no usage
      if len > 0 then
        n = n + 1
        parts[n] = chunk:getBytes(0, len)
      end
    end
    if n > 0 then read_json({ handle = handle }, n == 1 and parts[1] or concat(parts)) end
  elseif kind == "text/event-stream" then
    local state = { model = false, last = nil }
    local rest = ""
    for chunk in handle:bodyChunks() do
      local len = chunk:length()
      if len > 0 then
        local text = chunk:getBytes(0, len)
        if rest ~= "" then text = rest .. text end
        local from = read_lines({ handle = handle }, text, 1, state)
        rest = from <= #text and sub(text, from) or ""
        if #rest > MAX_JSON then rest = "" end
      end
    end
    if rest ~= "" then read_lines({ handle = handle }, rest .. "\n", 1, state) end
  end
end
