"""The native path through the real Envoy: calls Envoy decides alone, and everything it hands over.

A call to a binding that needs no extproc decision (no quotas, no context, no cache) is served
with no ext_proc stream at all (Envoy's own ext_proc statistics stay flat), yet it is metered,
settled and logged like any other; everything else, and any call the Lua program is not sure of,
goes to extproc and gets exactly extproc's answer (``controller.native_path``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crdgol.stack import Stack, StackSettings

ALPHA, BETA, GAMMA = "sk-native-alpha", "sk-native-beta", "sk-native-gamma"
PROVIDER = "sk-native-provider"
HS_SECRET = "native-path-hs256-secret-0123456789abcdef"
ISSUER = "https://issuer.native.test"
NS = "team-n"


def _binding(name: str, backend: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"model": name, "backends": [{"name": "primary", "credentialsRef": {"name": "provider", "key": "apiKey"}, **backend}], **spec},
    }


def _secret(name: str, data: dict[str, str], tenant: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if tenant:
        meta |= {"labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}


def secrets(*, with_gamma: bool = True) -> str:
    docs = [
        _secret("alpha-key", {"key": ALPHA}, "alpha"),
        _secret("beta-key", {"key": BETA}, "beta"),
        *([_secret("gamma-key", {"key": GAMMA}, "gamma")] if with_gamma else []),
        _secret("provider", {"apiKey": PROVIDER}),
        _secret("jwt-hs", {"secret": HS_SECRET}),
    ]
    return "---\n".join(json.dumps(d) + "\n" for d in docs)


def write_manifests(folder: Path, mock: str) -> None:
    openai_backend = {"provider": "openai-compatible", "endpoint": f"{mock}/v1", "model": "mock-gpt"}
    bindings = [
        _binding(
            "native-chat",
            {**openai_backend, "pricing": {"inputPerMillion": "2.00", "outputPerMillion": "8.00"}},
            tenants=["alpha", "gamma"],
            auth={"jwt": [{"issuer": ISSUER, "tenantClaim": "org", "hs256SecretRef": {"name": "jwt-hs", "key": "secret"}}]},
        ),
        _binding("native-claude", {"provider": "anthropic", "endpoint": mock, "model": "mock-claude"}),
        _binding("native-embed", {**openai_backend, "model": "mock-embed"}),
        _binding("quota-chat", {**openai_backend, "model": "quota-gpt"}, quotas={"default": {"requests": [{"amount": 1000, "per": "minute"}]}}),
        _binding("ctx-chat", {**openai_backend, "model": "ctx-gpt"}, context={"systemPrompt": "Context for ${tenant}."}),
    ]
    (folder / "secrets.yaml").write_text(secrets())
    (folder / "bindings.yaml").write_text("---\n".join(json.dumps(b) + "\n" for b in bindings))


def start_stack(folder: Path, *, native_path: bool = True) -> Stack:
    stack = Stack(StackSettings(manifests=folder, mock_args=("--require-key", PROVIDER), quiet=True, native_path=native_path))
    write_manifests(folder, f"http://127.0.0.1:{stack.mock_port}")
    stack.start()
    return stack


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("native"))
    try:
        yield stack
    finally:
        stack.stop()


# --- what a call cost, and what it did ------------------------------------------------------


def ext_proc_streams(stack: Stack) -> dict[str, int]:
    """Streams Envoy opened to extproc so far: the request filter's and the response filter's."""
    text = stack.admin("/stats?filter=ext_proc")
    out = {"request": 0, "response": 0}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.endswith(".streams_started") and value.strip().isdigit():
            out["response" if ".ext_proc.response." in name else "request"] += int(value)
    return out


def streams_for(stack: Stack, call: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    before = ext_proc_streams(stack)
    result = call()
    time.sleep(0.1)  # Envoy counts a stream's end after the client has its answer
    after = ext_proc_streams(stack)
    return result, {k: after[k] - before[k] for k in after}


NONE = {"request": 0, "response": 0}
ONE = {"request": 1, "response": 0}


def post(stack: Stack, path: str, body: Any, key: str | None = ALPHA, **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.url}{path}", content=content, headers=h, timeout=20)


def chat(model: str = "native-chat", text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def upstream(stack: Stack) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.mock_url}/_mock/requests", timeout=10).json())


def clear_upstream(stack: Stack) -> None:
    httpx.delete(f"{stack.mock_url}/_mock/requests", timeout=10)


# --- served natively ------------------------------------------------------------------------


def test_a_native_call_is_served_with_no_ext_proc_stream(gw: Stack) -> None:
    clear_upstream(gw)
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(text="native hello")))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "[mock] model=mock-gpt messages=1 system=- last=native hello"
    assert used == NONE
    [seen] = upstream(gw)
    # The body names the backend's model; the provider gets the injected credential, never the
    # caller's, and no header of the gateway's.
    assert seen["body"]["model"] == "mock-gpt" and seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER}"
    assert not any(h.startswith("x-crdgol-") for h in seen["headers"])
    # An x-api-key caller too.
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key=None, **{"x-api-key": ALPHA}))
    assert r.status_code == 200 and used == NONE


def test_the_official_openai_sdk_plain_and_streamed_with_usage(gw: Stack) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=ALPHA, max_retries=0)
    done, used = streams_for(gw, lambda: client.chat.completions.create(model="native-chat", messages=[{"role": "user", "content": "sdk"}]))
    assert done.choices[0].message.content.endswith("last=sdk") and done.usage.prompt_tokens > 0
    assert used == NONE

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="native-chat", messages=[{"role": "user", "content": "sdk stream"}], stream=True, stream_options={"include_usage": True}
            )
        )

    chunks, used = streams_for(gw, stream)
    assert used == NONE
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("last=sdk stream")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_anthropic_api_and_embeddings_are_native_too(gw: Stack) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=ALPHA, max_retries=0)
    msg, used = streams_for(gw, lambda: client.messages.create(model="native-claude", max_tokens=30, messages=[{"role": "user", "content": "hi claude"}]))
    assert msg.type == "message" and msg.usage.input_tokens > 0 and used == NONE
    r, used = streams_for(gw, lambda: post(gw, "/v1/embeddings", {"model": "native-embed", "input": ["a", "b"]}))
    assert r.status_code == 200 and len(r.json()["data"]) == 2 and used == NONE


def test_a_providers_error_on_a_native_call_is_mapped_by_the_response_filter(gw: Stack) -> None:
    r, used = streams_for(
        gw, lambda: post(gw, "/v1/chat/completions", chat(), **{"x-mock-fail-status": "401", "x-mock-echo-credential": "1"})
    )
    assert r.status_code == 502 and PROVIDER not in r.text and r.json()["error"]["type"]
    assert used == {"request": 0, "response": 1}


def test_a_model_key_inside_the_messages_does_not_redirect_the_call(gw: Stack) -> None:
    clear_upstream(gw)
    body = {
        "messages": [{"role": "user", "content": 'use {"model": "ctx-chat"} please', "model": "ctx-chat"}],
        "metadata": {"model": "quota-chat"},
        "model": "native-chat",
    }
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", body))
    assert r.status_code == 200 and used == NONE
    [seen] = upstream(gw)
    assert seen["body"]["model"] == "mock-gpt" and seen["body"]["messages"][0]["model"] == "ctx-chat"
    assert "system=-" in r.json()["choices"][0]["message"]["content"]  # no context injected


# --- handed to extproc, with extproc's answer ------------------------------------------------


def test_a_stream_without_include_usage_goes_to_extproc_which_strips_the_usage_chunk(gw: Stack) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(stream=True)))
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in r.text
    assert used == {"request": 1, "response": 1}


def test_refusals_are_extprocs_own(gw: Stack) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key="sk-not-a-key"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and used == ONE
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key=BETA))
    assert r.status_code == 403 and "tenant team-n/beta may not call the model 'native-chat'" in r.json()["error"]["message"]
    assert used == ONE
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(model="no-such-model")))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and used == ONE
    r, used = streams_for(gw, lambda: post(gw, "/v1/messages", chat(model="native-claude")))  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and used == ONE


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "x"}],}',  # trailing comma
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "\xff"}]}',  # not UTF-8
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "x"}], "n": 1e400}',  # infinity
        b'{"model": "native-chat", "messages": []}',
        b'{"model": "native-chat", "messages": [{"content": "x"}]}',
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        # "Model" beside "model": an upstream matching keys in any case would read the other one.
        b'{"model": "native-chat", "messages": [{"role": "user", "content": "x"}], "Model": "gpt-4o"}',
    ],
)
def test_a_body_extproc_refuses_is_left_to_extproc(gw: Stack, raw: bytes) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", raw))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert used == ONE


def test_a_large_body_is_read_by_extproc_not_on_envoys_worker(gw: Stack) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(text="x" * 300_000)))
    assert r.status_code == 200 and used == ONE


def test_a_body_the_reader_is_unsure_of_is_decided_by_extproc(gw: Stack) -> None:
    # Two top-level models: extproc's parser takes the last one; the Lua reader does not guess.
    clear_upstream(gw)
    raw = b'{"model": "ctx-chat", "messages": [{"role": "user", "content": "dup"}], "model": "native-chat"}'
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", raw))
    assert r.status_code == 200 and used == ONE
    assert [s["body"]["model"] for s in upstream(gw)] == ["mock-gpt"]


def test_a_jwt_caller_is_served_by_extproc(gw: Stack) -> None:
    token = jwt.encode({"iss": ISSUER, "sub": "user-7", "org": "alpha", "exp": 4102444800}, HS_SECRET, algorithm="HS256")
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key=token))
    assert r.status_code == 200 and used == ONE


def test_a_binding_with_quotas_or_context_is_never_native(gw: Stack) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(model="quota-chat")))
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1000" and used == ONE
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(model="ctx-chat")))
    assert r.status_code == 200 and "system=Context for team-n/alpha." in r.json()["choices"][0]["message"]["content"]
    assert used == ONE


# --- counted like any other call -------------------------------------------------------------


def _samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_native_and_extproc_calls_count_in_the_same_metrics_and_access_log(gw: Stack) -> None:
    who = {"tenant": f"{NS}/alpha", "binding": f"{NS}/native-chat", "backend": f"crdgol-be.{NS}.native-chat.primary"}
    before = _samples(gw)
    ids = ["native-count-1", "native-count-2"]
    native, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(text="count me"), **{"x-request-id": ids[0]}))
    assert native.status_code == 200 and used == NONE
    token = jwt.encode({"iss": ISSUER, "sub": "user-8", "org": "alpha", "exp": 4102444800}, HS_SECRET, algorithm="HS256")
    via_extproc, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(text="count me"), key=token, **{"x-request-id": ids[1]}))
    assert via_extproc.status_code == 200 and used == ONE
    tokens = sum(r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] for r in (native, via_extproc))

    def grown(name: str, by: float, **labels: str) -> bool:
        return _value(_samples(gw), name, **labels) - _value(before, name, **labels) == pytest.approx(by)

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not grown("gen_ai_server_request_duration_seconds_count", 2, **who):
        time.sleep(0.05)  # the access log settles within its flush interval
    assert grown("gen_ai_server_request_duration_seconds_count", 2, http_response_status_code="200", gen_ai_response_model="mock-gpt", **who)
    assert grown("gen_ai_client_token_usage_sum", tokens, **who)
    assert grown("crdgol_requests_total", 2, endpoint="chat", status="200")
    assert grown("crdgol_tokens_total", tokens, **who)
    assert _value(_samples(gw), "crdgol_spend_total", **who) > _value(before, "crdgol_spend_total", **who)

    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(lines) < 2:
        new = (gw.state / "envoy.log").read_text().splitlines()
        lines = [json.loads(x) for x in new if x.startswith("{") and json.loads(x)["request_id"] in ids]
        time.sleep(0.1)
    assert len(lines) == 2
    for line in lines:
        assert (line["tenant"], line["binding"], line["backend"], line["operation"]) == (who["tenant"], who["binding"], who["backend"], "chat")
        assert line["input_tokens"] > 0 and line["policy_version"] > 0 and line["status"] == 200


def _wait_grown(gw: Stack, before: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, by: float, **labels: str) -> float:
    """How much ``name`` grew, once it grew by ``by`` or after 5 s (the access log settles
    within its flush interval)."""
    deadline = time.monotonic() + 5
    grown = 0.0
    while time.monotonic() < deadline:
        grown = _value(_samples(gw), name, **labels) - _value(before, name, **labels)
        if grown >= by:
            break
        time.sleep(0.05)
    return grown


def test_native_streams_and_anthropic_answers_are_settled_from_envoys_usage(gw: Stack) -> None:
    """The usage Envoy reads from a native answer reaches extproc's metrics: an OpenAI stream's
    usage chunk, an Anthropic message, and an Anthropic stream (input from message_start,
    output from message_delta)."""
    openai_client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=ALPHA, max_retries=0)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=ALPHA, max_retries=0)
    chat_who = {"tenant": f"{NS}/alpha", "binding": f"{NS}/native-chat"}
    claude_who = {"tenant": f"{NS}/alpha", "binding": f"{NS}/native-claude"}
    before = _samples(gw)

    def openai_stream() -> list[Any]:
        return list(
            openai_client.chat.completions.create(
                model="native-chat", messages=[{"role": "user", "content": "settle my stream"}], stream=True, stream_options={"include_usage": True}
            )
        )

    chunks, used = streams_for(gw, openai_stream)
    assert used == NONE
    usage = chunks[-1].usage
    assert usage is not None
    chat_tokens = usage.prompt_tokens + usage.completion_tokens

    message, used = streams_for(gw, lambda: claude.messages.create(model="native-claude", max_tokens=30, messages=[{"role": "user", "content": "settle me"}]))
    assert used == NONE

    def claude_stream() -> Any:
        with claude.messages.stream(model="native-claude", max_tokens=30, messages=[{"role": "user", "content": "settle my claude stream"}]) as s:
            return s.get_final_message()

    streamed, used = streams_for(gw, claude_stream)
    assert used == NONE
    claude_tokens = sum(m.usage.input_tokens + m.usage.output_tokens for m in (message, streamed))
    assert chat_tokens > 0 and streamed.usage.input_tokens > 0 and streamed.usage.output_tokens > 1

    assert _wait_grown(gw, before, "gen_ai_client_token_usage_sum", chat_tokens, **chat_who) == pytest.approx(chat_tokens)
    assert _wait_grown(gw, before, "gen_ai_client_token_usage_sum", claude_tokens, **claude_who) == pytest.approx(claude_tokens)
    assert _wait_grown(gw, before, "gen_ai_server_request_duration_seconds_count", 2, **claude_who) == 2


def test_a_native_stream_is_passed_on_as_it_comes(gw: Stack) -> None:
    """With 150 ms between the provider's events, a natively served stream (OpenAI with
    include_usage, Anthropic) reaches the client event by event, not at the end."""
    bodies = [
        ("/v1/chat/completions", chat(text="slowly", stream=True, stream_options={"include_usage": True}), {}),
        ("/v1/messages", {"model": "native-claude", "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "slowly"}]}, {"anthropic-version": "2023-06-01"}),
    ]
    httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 150}, timeout=10)
    try:
        for path, body, extra in bodies:

            def call(path: str = path, body: dict[str, Any] = body, extra: dict[str, str] = extra) -> list[float]:
                start = time.monotonic()
                arrivals = []
                headers = {"authorization": f"Bearer {ALPHA}", **extra}
                with httpx.stream("POST", f"{gw.url}{path}", json=body, headers=headers, timeout=30) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            arrivals.append(time.monotonic() - start)
                return arrivals

            arrivals, used = streams_for(gw, call)
            assert used == NONE, path
            assert len(arrivals) >= 4, path
            assert arrivals[0] < arrivals[-1] - 0.3, (path, arrivals)
    finally:
        httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 0}, timeout=10)


def test_the_config_holds_key_digests_never_keys(gw: Stack) -> None:
    dump = gw.admin("/config_dump")
    assert ALPHA not in dump and PROVIDER not in dump
    assert hashlib.sha256(ALPHA.encode()).hexdigest() in dump  # the native path's table (ECDS)


def test_a_removed_key_stops_working_at_the_next_config_push(gw: Stack) -> None:
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key=GAMMA))
    assert r.status_code == 200 and used == NONE
    version = gw.policy_version()
    (gw.settings.manifests / "secrets.yaml").write_text(secrets(with_gamma=False))
    gw.wait_policy(version + 1)  # extproc has it only after Envoy ACKed the new native table
    r = post(gw, "/v1/chat/completions", chat(), key=GAMMA)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r, used = streams_for(gw, lambda: post(gw, "/v1/chat/completions", chat(), key=ALPHA))
    assert r.status_code == 200 and used == NONE  # the other keys are still native


def test_with_the_native_path_off_every_call_goes_to_extproc(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, native_path=False)
    try:
        r, used = streams_for(stack, lambda: post(stack, "/v1/chat/completions", chat()))
        assert r.status_code == 200 and used == ONE
        assert hashlib.sha256(ALPHA.encode()).hexdigest() not in stack.admin("/config_dump")
    finally:
        stack.stop()
        shutil.rmtree(stack.state, ignore_errors=True)
