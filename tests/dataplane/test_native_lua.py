"""The native path's Lua program, run by the real Envoy (LuaJIT): its SHA-256 and its JSON reader.

The test config loads the rendered program (``controller.native_path.lua_program``) and appends a
request hook that calls the program's own functions on the request body and answers with what
they return, so the code under test is the code Envoy runs. SHA-256 is checked against hashlib;
the reader against orjson, which extproc parses with: whatever the reader accepts, orjson must
accept with the same model and stream fields (the reader may give up more often, never less).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator

import httpx
import orjson
import pytest

from controller.envoy_config import RenderSettings
from controller.native_path import lua_program, versioned
from crdgol.pb import policy_pb2 as pb
from crdgol.stack import envoy_binary, free_port, stop_process, wait_http

HOOK = r"""
function envoy_on_request(h)
  local body = h:body(true)
  local s = body:length() > 0 and body:getBytes(0, body:length()) or ""
  if h:headers():get("x-op") == "sha" then
    h:respond({ [":status"] = "200" }, sha256_hex(s))
    return
  end
  S, N = s, #s
  local ok, facts = pcall(read_body)
  S = nil
  if not ok then
    h:respond({ [":status"] = "500" }, tostring(facts))
  elseif not facts then
    h:respond({ [":status"] = "200" }, "refused")
  else
    h:respond({ [":status"] = "200" }, table.concat({ "accepted", facts.model or "", tostring(facts.stream), tostring(facts.messages), tostring(facts.include_usage) }, "\t"))
  end
end
"""


@pytest.fixture(scope="module")
def lua(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("lua")
    port, admin = free_port(), free_port()
    program = versioned(lua_program(pb.PolicySnapshot(version=1), RenderSettings()), 1) + HOOK
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "lua_test",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": program}},
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "lua",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }
            ]
        },
    }
    path = folder / "envoy.json"
    path.write_text(json.dumps(config))
    with open(folder / "envoy.log", "wb") as log:
        proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warning", "--disable-hot-restart"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", (200,), 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


_client = httpx.Client(timeout=10)


def ask(url: str, body: bytes, **headers: str) -> str:
    r = _client.post(url + "/", content=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.text


def test_sha256_matches_hashlib_on_every_block_edge_and_beyond(lua: str) -> None:
    rng = random.Random(9)
    inputs = [b"", b"abc", b"sk-crdgol-quickstart", "clé-ключ-鍵-🔑".encode(), b"\x00" * 3, b"\xff" * 200]
    inputs += [bytes(rng.randrange(256) for _ in range(n)) for n in (*range(50, 70), 111, 112, 119, 120, 127, 128, 129, 1000, 4096)]
    inputs += [rng.randbytes(rng.randrange(1, 300)) for _ in range(40)]
    for data in inputs:
        assert ask(lua, data, **{"x-op": "sha"}) == hashlib.sha256(data).hexdigest(), data


VALID = [
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": "naïve café 鍵 🔑 \u2028", "name": "x"}], "stream": True, "stream_options": {"include_usage": True}},
    {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "a\"b\\c\n\t/"}]}], "temperature": 0.25, "n": -1, "x": 1e-7},
    {"messages": [{"role": "user", "content": "x", "model": "inner"}], "model": "outer", "metadata": {"model": "other"}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False, "max_tokens": 256, "tools": [], "k": None},
    {"model": "m", "input": ["a", "b"], "deep": [[[[{"a": [1, 2.5e10, -0.0, True, False, None]}]]]]},
    {"model": "m-ünï", "messages": [{"role": "user", "content": ""}], "stream_options": {"include_usage": False}},
]


def _serialisations(doc: object) -> list[bytes]:
    return [json.dumps(doc).encode(), json.dumps(doc, ensure_ascii=False).encode(), json.dumps(doc, indent=2).encode(), orjson.dumps(doc)]


def _verdict(text: str) -> tuple[str, ...]:
    return tuple(text.split("\t"))


def _kind(value: object) -> str:
    """The kind letter the reader gives a JSON value."""
    if isinstance(value, bool):
        return "t" if value else "f"
    kinds = ((type(None), "z"), (str, "s"), (int, "i"), (float, "n"), (dict, "o"), (list, "a"))
    return next(letter for t, letter in kinds if isinstance(value, t))


def _expected(doc: dict[str, object]) -> tuple[str, ...]:
    """What the reader should say about ``doc`` (as orjson read it), when it accepts it."""
    stream = _kind(doc["stream"]) if "stream" in doc else "nil"
    messages = doc.get("messages")
    ok = isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    opts = doc.get("stream_options")
    usage = ("true" if opts.get("include_usage") is True else "false") if isinstance(opts, dict) else "nil"
    return ("accepted", str(doc.get("model", "")), stream, str(ok).lower() if isinstance(messages, list) else "nil", usage)


def test_the_reader_accepts_ordinary_bodies_and_reads_them_as_orjson_does(lua: str) -> None:
    for doc in VALID:
        for raw in _serialisations(doc):
            # An escaped model name is extproc's to decode: the reader gives up on it.
            plain = f'"{doc["model"]}"'.encode() in raw
            assert _verdict(ask(lua, raw)) == (_expected(orjson.loads(raw)) if plain else ("refused",)), raw


def test_the_reader_never_accepts_what_orjson_refuses(lua: str) -> None:
    rng = random.Random(7)
    tricky = [b",", b"]", b"}", b"{", b"[", b":", b'"', b"\\", b"\x00", b"\x1f", b"\x7f", b"\xff", b"\xc3", b"\xed\xa0\x80", b"0", b"e", b"-", b" ", b"\\u", b"\\ud800", b"n"]
    corpus: list[bytes] = [
        b"", b"[]", b"null", b"{}", b"\xef\xbb\xbf{}", b'{"a":1}x', b'{"a":01}', b'{"a":1.}', b'{"a":.5}', b'{"a":1e400}', b'{"a":-}',
        b'{"a":"\\ud800"}', b'{"a":"\\udc00\\ud800"}', b'{"a":"\\x"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\xc0\xaf"}',
        b'{"a":1,"a":2}', b'{"\\u0061":1,"a":2}', b'{"a":[1,]}', b'{"a":1,}', b'{,}', b'{"a" 1}', b'{"a":tru}', b'{"a":nul}',
        b'{"model":"m"}' + b" " * 3 + b"\n", b"[" * 70 + b"]" * 70, b'{"a":' + b"[" * 70 + b"]" * 70 + b"}",
    ]
    for doc in VALID:
        raw = json.dumps(doc, ensure_ascii=False).encode()
        for _ in range(25):
            at = rng.randrange(len(raw))
            corpus.append(raw[:at] + rng.choice(tricky) + raw[at + 1 :])
            corpus.append(raw[:at] + rng.choice(tricky) + raw[at:])
            corpus.append(raw[:at])
    accepted = 0
    for raw in corpus:
        verdict = _verdict(ask(lua, raw))
        if verdict[0] == "refused":
            continue
        accepted += 1
        doc = orjson.loads(raw)  # raises if the reader accepted what orjson refuses
        assert isinstance(doc, dict) and verdict == _expected(doc), raw
    assert accepted > 20  # mutations that stay valid JSON are read too, not only refused


def test_a_model_that_is_not_a_plain_string_is_left_to_extproc(lua: str) -> None:
    for raw in (b'{"model": "m\\u0065"}', b'{"model": 5}', b'{"model": ["m"]}', b'{"mod\\u0065l": "m"}'):
        verdict = _verdict(ask(lua, raw))
        assert verdict[0] == "refused" or verdict[1] == "", raw


def test_the_reader_reads_a_16k_prompt(lua: str) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 3300 + "naïve 🔑"}]}, ensure_ascii=False).encode()
    assert _verdict(ask(lua, big)) == ("accepted", "m", "nil", "true", "nil")
