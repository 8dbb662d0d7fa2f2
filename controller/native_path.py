"""The native request path: model calls Envoy decides alone, with no ext_proc message (issue 9).

One ext_proc message costs a Python gRPC stream (~1.5 ms added, ~600 µs of CPU per request on the
benchmark machine), more than bare Envoy's whole request. A call that needs no decision only
extproc can make skips it: Envoy's Lua filter (``native_path.lua``, LuaJIT) authenticates the API
key by its SHA-256, checks the tenant, picks the binding and rewrites the model name, and writes
the dynamic metadata extproc's body reply would (``extproc.route_reply``); the binding's native
route then reaches the first backend with the ext_proc filter off, the cluster injects the
provider credential, Envoy's filters read the usage and the gRPC access log brings it to extproc,
which settles and counts it like any other call (``extproc.usage_log``).

The eligibility rule, in one place
----------------------------------
A **binding** is native (``native_binding``) when it needs nothing per request but auth, the
tenant check, routing, credential injection and usage metering: a single first-priority backend
(rewritten by the route and its cluster), no quotas of any kind, no context (system prompt,
profile, knowledge, history, MCP sources), no response cache. A **call** to it is served natively
when the Lua program is sure extproc would let it through unchanged, and otherwise goes to
extproc exactly as before (so every error keeps its status and message):

* ``POST /v1/chat/completions``, ``/v1/messages`` or ``/v1/embeddings`` without ``x-session-id``,
  a single ``application/json`` content type, headers well under the gateway's limits, a body of
  at most 256 KiB;
* an API key (``Authorization: Bearer <key>`` or ``x-api-key``, printable ASCII) whose SHA-256 is
  one Secret's, acting as one tenant (JWTs, unknown or ambiguous keys go to extproc);
* a body this strict reader accepts (valid UTF-8 JSON object, no duplicate or escaped keys, at
  most 64 levels deep), with a plain string ``model``; the model resolves, as extproc's
  ``Policy.resolution`` would, to a native binding the tenant may call;
* a chat call in the backend's own API (no translation) with valid ``messages`` (and
  ``max_tokens`` for the Anthropic API), not streamed, or an OpenAI stream whose client asked for
  ``stream_options.include_usage`` (nothing to strip); an embeddings call with ``input`` to a
  binding without an Anthropic backend.

It is off with ``RenderSettings.native_path`` false (``--no-native-path``), without the
one-message path, and when tracing is on (extproc's spans would be missing).

What travels where
------------------
The program and its tables (``lua_program``: API-key digests -> tenant, model -> the bindings
serving it with their tenant patterns) are rendered from the policy snapshot extproc receives, so
both decide alike. No key appears, only SHA-256 digests (as in the snapshot). Over xDS they are
their own ECDS resource (``native_extension``), sent before extproc gets the policy: a removed key
stops working natively when Envoy has the new config, no later than on the ext_proc path, and a
route table Envoy refuses cannot hold the revocation back (a call naming a route Envoy lacks falls
back to the ext_proc path). A static config (``crdgol render``) carries the program inline.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import quote

from controller.envoy_json import Json, typed
from controller.one_message import one_message
from crdgol.access_log import NAMESPACE as ACCESS_NAMESPACE
from crdgol.pb import policy_pb2 as pb
from crdgol.replies import MAX_REQUEST_HEADER_BYTES, MAX_REQUEST_HEADERS
from crdgol.request_path import (
    NATIVE_FILTER,
    NATIVE_SUFFIX,
    ROUTE_KEY,
    ROUTE_NAMESPACE,
    STATE_NAMESPACE,
)
from crdgol.usage_log import SETTLE_NAMESPACE

if TYPE_CHECKING:
    from controller.envoy_config import RenderSettings

__all__ = [
    "MODEL_CALL_ROUTE",
    "binding_fields",
    "enabled",
    "lua_program",
    "native_binding",
    "native_extension",
    "native_filter",
    "native_route",
    "versioned",
]

# The largest body the Lua reader reads (~7 ns a byte on Envoy's worker thread): a larger one goes
# to extproc, so a caller cannot hold a worker for long with one request.
NATIVE_MAX_BODY = 256 * 1024
# The route a model call matches before anyone decided (``one_message.model_path_routes``).
MODEL_CALL_ROUTE = "model-call"
_LUA = "envoy.extensions.filters.http.lua.v3.Lua"
ECDS_TYPE = "type.googleapis.com/" + _LUA


def enabled(settings: RenderSettings) -> bool:
    """Whether the native path is rendered at all (see the module docstring)."""
    return settings.native_path and one_message(settings) and not settings.tracing.enabled


def native_binding(b: pb.Binding) -> bool:
    """Whether calls to ``b`` may be decided by Envoy alone: one first-priority backend, no
    quotas, no context, no cache (the rule in the module docstring)."""
    c, q = b.context, b.quotas
    context = bool(c.system_template or c.profile or c.knowledge or c.history.enabled or c.mcp_sources)
    quotas = q.HasField("default_quota") or bool(q.tenants)
    return sum(1 for be in b.backends if be.direct) == 1 and not quotas and not context and not b.cache.enabled


_PLAIN = re.compile(r"[A-Za-z0-9_.~:@+=*/-]*")


def _field(text: str) -> str:
    # Percent-encoded: the data lines hold no tab, newline, space or bracket of their own. Most
    # names need nothing (a regular expression is ~10x faster than quote() at 5,000 bindings).
    return text if _PLAIN.fullmatch(text) else quote(text, safe=":@+=*/")


def _key_lines(snapshot: pb.PolicySnapshot) -> list[str]:
    tenants: dict[bytes, set[str]] = defaultdict(set)
    for k in snapshot.api_keys:
        tenants[k.sha256].add(k.tenant)
    # A key that acts as several tenants is extproc's to resolve (ambiguity, 403).
    return sorted(f"{d.hex()}\t{_field(next(iter(ts)))}" for d, ts in tenants.items() if len(ts) == 1)


def binding_fields(b: pb.Binding) -> str:
    """A binding's record in the program's table but its tenant patterns (which depend on other
    namespaces' acceptances: ``_binding_line``); the render caches it per binding."""
    direct = next((be for be in b.backends if be.direct), None)
    native = direct is not None and native_binding(b)
    fields = [
        b.model,
        b.key,
        b.key.partition("/")[0],
        b.route + NATIVE_SUFFIX if native else "",
        "anthropic" if direct is not None and direct.provider == pb.ANTHROPIC else "openai",
        # The body's new model value, as a JSON string.
        json.dumps(direct.model) if direct is not None else "",
    ]
    embeddings = "0" if any(be.provider == pb.ANTHROPIC for be in b.backends) else "1"
    return "\t".join([*(_field(f) for f in fields), embeddings])


def _binding_line(b: pb.Binding, fields: Callable[[pb.Binding], str]) -> str:
    return fields(b) + "\t" + " ".join(_field(t) for t in b.tenants)


def _lua_text(value: str) -> str:
    """A Lua string literal of ``value`` (decimal escapes for everything but letters and digits)."""
    return '"' + "".join(c if c.isascii() and c.isalnum() else "".join(f"\\{b}" for b in c.encode()) for c in value) + '"'


def _long_string(data: str) -> str:
    # The data holds no ']' (percent-encoded), so the long bracket cannot close early.
    assert "]" not in data
    return "[[\n" + data + "\n]]"


@functools.cache
def _program_text() -> str:
    return resources.files("controller").joinpath("native_path.lua").read_text(encoding="utf-8")


def versioned(program: str, version: int) -> str:
    """``program`` (from ``lua_program``) as Envoy runs it: told the policy version it decides
    with (the access log's ``policy_version``). Kept apart so that two renders of the same policy
    compare equal whatever their versions (``controller.state``)."""
    return f"local VERSION = {int(version)}\n{program}" if program else ""


def lua_program(snapshot: pb.PolicySnapshot, settings: RenderSettings, fields: Callable[[pb.Binding], str] = binding_fields) -> str:
    """The Lua program with its tables, rendered from the policy ``snapshot`` extproc gets
    (without its version: ``versioned``); ``fields`` is ``binding_fields``, or a cache of it."""
    bindings = sorted(snapshot.bindings, key=lambda b: (b.model, b.key))
    names = {
        "route_ns": ROUTE_NAMESPACE,
        "route": ROUTE_KEY,
        "settle_ns": SETTLE_NAMESPACE,
        "state_ns": STATE_NAMESPACE,
        "access_ns": ACCESS_NAMESPACE,
    }
    prelude = [
        "-- Rendered by controller/native_path.py from the policy snapshot; the program follows.",
        f"local ACCESS = {'true' if settings.access_log else 'false'}",
        f"local MAX_HEADERS = {MAX_REQUEST_HEADERS // 2}",
        f"local MAX_HEADER_BYTES = {MAX_REQUEST_HEADER_BYTES // 2}",
        f"local MAX_BODY = {NATIVE_MAX_BODY}",
        f"local MODEL_ROUTE = {_lua_text(MODEL_CALL_ROUTE)}",
        "local NAME = {" + ", ".join(f"{k} = {_lua_text(v)}" for k, v in names.items()) + "}",
        f"local KEY_DATA = {_long_string(chr(10).join(_key_lines(snapshot)))}",
        f"local BINDING_DATA = {_long_string(chr(10).join(_binding_line(b, fields) for b in bindings))}",
    ]
    return "\n".join(prelude) + "\n" + _program_text()


def _lua_config(program: str) -> Json:
    return typed(_LUA, default_source_code={"inline_string": program}, stat_prefix="native")


def native_filter(program: str, *, discovered: bool) -> Json:
    """The Lua filter, first on the gateway listener: its config ``discovered`` over ECDS (the
    controller serves ``native_extension``; until it arrives the filter does nothing), or inline."""
    if not discovered:
        return {"name": NATIVE_FILTER, "typed_config": _lua_config(program)}
    return {
        "name": NATIVE_FILTER,
        "config_discovery": {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "default_config": typed(_LUA),
            "apply_default_config_without_warming": True,
            "type_urls": [ECDS_TYPE],
        },
    }


def native_extension(program: str) -> Json:
    """The ECDS resource (a ``TypedExtensionConfig``) carrying the program and its tables."""
    return {"name": NATIVE_FILTER, "typed_config": _lua_config(program)}


# On a native route neither the ext_proc filter nor the buffer filter runs (Lua held the body).
_NATIVE_ROUTE_FILTERS: Json = {
    "envoy.filters.http.ext_proc": typed("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", disabled=True),
    "envoy.filters.http.buffer": typed("envoy.extensions.filters.http.buffer.v3.BufferPerRoute", disabled=True),
}


def native_route(lean: Json, binding: pb.Binding) -> Json:
    """A native ``binding``'s fourth route, beside its plain one (``lean``, from
    ``one_message.metadata_routes``): the same target with the ext_proc filter off, and no header
    formatter that would only write what a native call never has (rate-limit headers); the APIs a
    fallback attempt's filter reads are constants here (a native call is never translated). A
    provider's error still goes to the response filter, as on the plain route."""
    name = str(lean["name"]) + NATIVE_SUFFIX
    metadata = lean["match"]["dynamic_metadata"][0]
    direct = next(be for be in binding.backends if be.direct)
    api = "anthropic" if direct.provider == pb.ANTHROPIC else "openai"
    fallback = len(binding.backends) > 1
    add = []
    for h in lean["request_headers_to_add"]:
        if "%DYNAMIC_METADATA(" not in h["header"]["value"]:
            add.append(h)  # anthropic-version
        elif fallback:
            add.append({**h, "header": {**h["header"], "value": api}})
    route: Json = {
        "name": name,
        "match": {**lean["match"], "dynamic_metadata": [{**metadata, "value": {"string_match": {"exact": name}}}]},
        "route": lean["route"],
        "request_headers_to_remove": lean["request_headers_to_remove"],
        "typed_per_filter_config": _NATIVE_ROUTE_FILTERS,
    }
    if add:
        route["request_headers_to_add"] = add
    if fallback:
        route["response_headers_to_remove"] = lean["response_headers_to_remove"]
    return route
