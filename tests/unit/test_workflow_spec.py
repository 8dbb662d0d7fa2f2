"""The workflow models and the CRDs say the same thing, checked mechanically.

Every field of ``controller.workflow.spec``'s models is walked against the CRD's openAPIV3Schema
(and back): a field the parser reads that the schema lacks, or a schema property the parser
ignores, fails here. The example workflow is valid under the CRD and accepted by the parser.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.models import SecretRef, SpecError
from controller.workflow import spec as model
from controller.workflow.spec import json_name, parse_run, parse_workflow
from tests.unit.test_crds import load_crd, schema_errors, version_schema

ROOT = Path(__file__).resolve().parents[2]
Json = dict[str, Any]


def model_tree(cls: type) -> Json:
    """{json name: subtree or a leaf marker} for a dataclass, following nested models."""
    hints = typing.get_type_hints(cls, vars(model) | {"SecretRef": SecretRef})
    out: Json = {}
    for f in dataclasses.fields(cls):
        name = json_name(f)
        if name is None or (cls is SecretRef and f.name == "namespace"):
            continue  # not read from the manifest (metadata, or the object's own namespace)
        out[name] = _shape(hints[f.name])
    return out


def _shape(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return _shape(args[0])
    if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
        return [model_tree(args[0])]
    if dataclasses.is_dataclass(tp):
        return model_tree(tp)  # type: ignore[arg-type]
    return "leaf"


def schema_tree(node: Json) -> Any:
    if "properties" in node:
        return {k: schema_tree(v) for k, v in node["properties"].items()}
    if node.get("type") == "array" and "properties" in node.get("items", {}):
        return [schema_tree(node["items"])]
    return "leaf"


def test_the_workflowspec_model_and_its_crd_have_the_same_fields() -> None:
    crd = version_schema(load_crd("workflowspecs"))["properties"]["spec"]
    assert model_tree(model.WorkflowSpec) == schema_tree(crd)


def test_the_workflowrun_model_and_its_crd_have_the_same_spec_fields() -> None:
    crd = version_schema(load_crd("workflowruns"))["properties"]["spec"]
    tree = schema_tree(crd)
    tree["inputs"] = "leaf"  # any JSON
    assert model_tree(model.RunSpec) == tree


def test_the_example_workflow_is_valid_under_the_crd_and_accepted_by_the_parser() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples/support-triage/workflow.yaml").read_text()))
    assert schema_errors("workflowspecs", docs[0]) == []
    spec = parse_workflow(docs[0])
    assert [s.name for s in spec.steps] == ["sentiment", "classify", "draft", "post-to-helpdesk", "page-oncall"]
    assert spec.step("sentiment").retry.backoff.initial == 0.2 and spec.timeout == 300.0


def test_a_run_names_its_workflow_and_the_secret_it_calls_with() -> None:
    run = {"metadata": {"name": "r", "namespace": "team"}, "spec": {"workflowRef": {"name": "w"}, "inputs": {"ticket": "x"}, "apiKeySecretRef": {"name": "keys", "key": "k"}}}
    assert schema_errors("workflowruns", {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowRun", **run}) == []
    parsed = parse_run(run)
    assert parsed.api_key_secret_ref == SecretRef("keys", "k", "team") and parsed.inputs == {"ticket": "x"}


@pytest.mark.parametrize(
    ("step", "words"),
    [
        ({"name": "Bad_Name", "type": "transform", "transform": {"expression": "1"}}, "not a DNS label"),
        ({"name": "a", "type": "transform"}, "step 'a': a transform step needs transform"),
        ({"name": "a", "type": "transform", "transform": {"expression": "1"}, "timeout": "0s"}, "step 'a': timeout"),
        ({"name": "a", "type": "ai-inference", "aiInference": {"binding": "b", "model": "m", "prompt": "p"}}, "exactly one of binding or model"),
        ({"name": "a", "type": "http-request", "httpRequest": {"url": "http://x", "method": "BREW"}}, "step 'a': httpRequest.method"),
        ({"name": "a", "type": "transform", "transform": {"expression": "1"}, "retry": {"limit": 11}}, "step 'a': retry.limit"),
    ],
)
def test_a_malformed_step_is_refused_naming_the_step(step: Json, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_workflow({"metadata": {"name": "w"}, "spec": {"steps": [step]}})
    assert words in err.value.message
