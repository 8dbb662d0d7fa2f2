"""One namespace's binding, however hostile its values, is refused on its own: it never stops the
render (and so the controller) for every other namespace's bindings."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from controller.models import SpecError, parse_binding
from controller.render import RenderSettings, render


def binding(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    backend = {"name": "a", "provider": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"}
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": name, "backends": [backend], **spec},
    }


HOSTILE = [
    ("history ttl beyond 32 bits", {"context": {"history": {"enabled": True, "ttl": "2000000h"}}}),
    ("history ttl of twenty digits", {"context": {"history": {"enabled": True, "ttl": "99999999999999999999h"}}}),
    ("history ttl infinite (YAML .inf)", {"context": {"history": {"enabled": True, "ttl": float("inf")}}}),
    ("history ttl NaN (YAML .nan)", {"context": {"history": {"enabled": True, "ttl": float("nan")}}}),
    ("request timeout infinite", {"timeouts": {"request": float("inf")}}),
    ("request timeout of 11 digits of hours", {"timeouts": {"request": "99999999999h"}}),
    ("per-try timeout huge", {"timeouts": {"perTry": "99999999999h"}}),
    ("outlier interval huge", {"health": {"outlierDetection": {"interval": "99999999999h"}}}),
    ("active check interval huge", {"health": {"activeCheck": {"interval": "99999999999h"}}}),
]


@pytest.mark.parametrize(("what", "spec"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_an_out_of_range_duration_is_refused_with_its_path(what: str, spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as err:
        parse_binding(binding("evil", "bait", **spec))
    assert err.value.reason == "InvalidDuration"
    assert "spec." in err.value.message


def test_a_year_is_still_a_valid_duration() -> None:
    spec = parse_binding(binding("team", "chat", context={"history": {"enabled": True, "ttl": "8784h"}}))
    assert spec.context.history.ttl_seconds == 8784 * 3600


def test_a_value_the_snapshot_cannot_hold_refuses_that_binding_only() -> None:
    # Defence in depth: should a parser ever let such a value through, the render refuses the one
    # binding (with a status reason) and keeps serving every other.
    good = parse_binding(binding("team", "chat"))
    bad = parse_binding(binding("evil", "bait", context={"history": {"enabled": True, "ttl": "1h"}}))
    history = dataclasses.replace(bad.context.history, ttl_seconds=2**40)
    bad = dataclasses.replace(bad, context=dataclasses.replace(bad.context, history=history))
    result = render([good, copy.deepcopy(bad)], [], RenderSettings(version=1))
    assert result.accepted == ("team/chat",)
    assert result.problems["evil/bait"].reason == "InvalidSpec"
    assert [b.key for b in result.snapshot.bindings] == ["team/chat"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "quotas"), {"default": {"requests": [{"amount": 1, "per": ["minute"]}]}}),
        (("spec", "quotas"), {"default": {"budget": {"amount": "1", "per": {"a": 1}}}}),
        (("metadata", "generation"), "seven"),
        (("spec", "retry"), {"on": [{"a": 1}]}),
    ],
    ids=["list as a window", "object as a window", "non-numeric generation", "object as a retry condition"],
)
def test_a_value_of_the_wrong_type_is_a_spec_error_not_a_crash(path: tuple[str, str], value: object) -> None:
    doc = binding("evil", "bait")
    doc[path[0]][path[1]] = value
    with pytest.raises(SpecError):
        parse_binding(doc)


def test_a_namespace_that_is_not_a_dns_label_is_refused_for_bindings_and_secrets() -> None:
    # In file mode nothing else checks it, and "team/x" would make a Secret's keys read as
    # tenants of namespace "team".
    from controller.models import parse_secret

    with pytest.raises(SpecError, match=r"metadata\.namespace"):
        parse_binding(binding("team/x", "chat"))
    secret = {"metadata": {"name": "k", "namespace": "team/x", "labels": {"crdgol.io/api-key": "true"}}, "stringData": {"k": "sk-1"}}
    with pytest.raises(SpecError, match=r"metadata\.namespace"):
        parse_secret(secret)


@pytest.mark.parametrize(
    "endpoint",
    ["ftp://user:hunter2@host/v1", "http://user:hunter2@", "https://:hunter2@/v1", "http://h:99999/v1", "http://[::1/v1", "http://h/v1 x/v1"],
)
def test_a_bad_endpoint_is_refused_without_quoting_a_credential_written_into_it(endpoint: str) -> None:
    doc = binding("team", "chat")
    doc["spec"]["backends"][0]["endpoint"] = endpoint
    with pytest.raises(SpecError) as err:
        parse_binding(doc)
    assert err.value.reason == "InvalidEndpoint"
    assert "hunter2" not in err.value.message


@pytest.mark.parametrize("header", ["Authorization", "x-api-key", "cookie", ":authority"])
def test_a_profile_cannot_copy_the_callers_credential_into_the_prompt(header: str) -> None:
    with pytest.raises(SpecError, match="credential"):
        parse_binding(binding("team", "chat", context={"profile": [{"name": "who", "header": header}]}))
