"""Configuration is honest: a misspelled or unknown field is refused with its path and the nearest
valid name, an unknown crdgol.io kind is reported, and ``crdgol render --strict`` fails on either —
checked against one field list generated from the CRD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.fields import crd_spec_tree, module_text, unknown_fields
from controller.filemode import FolderReader
from controller.manifests import load_folder
from controller.models import SpecError, parse_binding

ROOT = Path(__file__).resolve().parents[2]


def binding(**spec: Any) -> dict[str, Any]:
    base = {"model": "chat", "backends": [{"provider": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"}]}
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": "chat"}, "spec": {**base, **spec}}


def refusal(obj: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as exc:
        parse_binding(obj)
    assert exc.value.reason == "UnknownField"
    return exc.value.message


def test_the_field_list_is_the_one_generated_from_the_crd() -> None:
    crd = yaml.safe_load((ROOT / "deploy" / "crds" / "aimodelbindings.yaml").read_text())
    assert (ROOT / "controller" / "binding_fields.py").read_text() == module_text(crd_spec_tree(crd)), (
        "controller/binding_fields.py is stale: run `python -m controller.fields`"
    )


def test_the_seeds_rate_limits_are_refused_with_the_field_they_meant() -> None:
    message = refusal(binding(rateLimits={"requestsPerMinute": 5}))
    assert message == "spec.rateLimits: unknown field; did you mean quotas?"


def test_a_misspelled_nested_field_names_its_path_and_the_nearest_name() -> None:
    b = binding(quotas={"tenants": {"acme": {"request": [{"amount": 1, "per": "day"}]}}})
    assert refusal(b) == "spec.quotas.tenants.acme.request: unknown field; did you mean requests?"
    b = binding()
    b["spec"]["backends"][0]["weigth"] = 2
    assert refusal(b) == "spec.backends[0].weigth: unknown field; did you mean weight?"


def test_a_field_with_no_near_name_lists_the_known_ones() -> None:
    assert "known fields here: " in refusal(binding(context={"zzz": 1}))


def test_every_field_of_a_complete_binding_is_known() -> None:
    for path in ("examples/quickstart/binding.yaml", "examples/quotas/binding.yaml"):
        assert unknown_fields(yaml.safe_load((ROOT / path).read_text())["spec"], crd_spec_tree(
            yaml.safe_load((ROOT / "deploy" / "crds" / "aimodelbindings.yaml").read_text())), "spec") == []


def test_free_form_parts_are_not_checked() -> None:
    parse_binding(binding(auth={"jwt": [{"issuer": "i", "jwks": {"keys": [], "anything": 1}}]}))


def test_an_unknown_crdgol_kind_or_version_is_reported_in_file_mode(tmp_path: Path) -> None:
    docs = [
        {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBindng", "metadata": {"name": "x"}},
        {"apiVersion": "crdgol.io/v1", "kind": "AIModelBinding", "metadata": {"name": "y"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "not-ours"}},
    ]
    (tmp_path / "a.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    problems = {k: v.message for k, v in load_folder(tmp_path).problems.items()}
    assert any("did you mean AIModelBinding?" in m for m in problems.values()), problems
    assert any("'crdgol.io/v1' is not served" in m for m in problems.values()), problems
    assert len(problems) == 2  # a ConfigMap is someone else's: not a problem
    reader = FolderReader(tmp_path)
    reader.read()
    assert len(reader.problems) == 2 and all("(ignored)" in p for p in reader.problems.values())


def test_render_strict_fails_on_a_misspelled_field_and_says_where(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(binding(rateLimits={"x": 1})))
    proc = subprocess.run(
        [sys.executable, "-m", "crdgol.cli", "render", "--manifests", str(tmp_path), "--strict"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "spec.rateLimits: unknown field; did you mean quotas?" in proc.stderr
    lenient = subprocess.run(
        [sys.executable, "-m", "crdgol.cli", "render", "--manifests", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert lenient.returncode == 0 and "UnknownField" in lenient.stderr


def test_a_binding_with_a_misspelled_field_is_refused_in_status_and_never_served() -> None:
    from controller.render import RenderSettings
    from controller.state import ControllerState

    state = ControllerState(RenderSettings(), clock=lambda: 1.0)
    state.upsert_binding(binding(rateLimits={"x": 1}))
    result = state.rebuild()
    status = state.status("default/chat")
    assert status is not None
    conds = {c.type: c for c in status.conditions}
    assert (conds["Accepted"].status, conds["Accepted"].reason) == ("False", "UnknownField")
    assert "did you mean quotas?" in conds["Accepted"].message
    assert conds["Ready"].status == "False" and result.accepted == ()
