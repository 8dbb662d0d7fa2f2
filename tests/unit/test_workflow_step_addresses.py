"""A workflow http-request step is a call from the gateway pod (its egress listener), and its
answer becomes the step's output in the run's status: a WorkflowSpec author must not aim it at
the cloud metadata service (the node's credentials) nor, on a cluster, at the pod's own loopback
(Envoy's admin, extproc). In file mode the loopback is where local services and the mock live."""

from __future__ import annotations

import pytest

from controller.models import SpecError
from controller.workflow.accept import accept
from controller.workflow.spec import parse_workflow


def _spec(url: str) -> dict[str, object]:
    step = {"name": "call", "type": "http-request", "httpRequest": {"url": url, "method": "GET"}}
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowSpec", "metadata": {"name": "wf", "namespace": "team-a"}, "spec": {"steps": [step]}}


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fe80::1]/x",
        "http://0.0.0.0:9901/config_dump",
        "http://224.0.0.1/x",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
    ],
)
def test_link_local_multicast_and_unspecified_hosts_are_refused_everywhere(url: str) -> None:
    for file_mode in (False, True):
        with pytest.raises(SpecError) as err:
            accept(parse_workflow(_spec(url)), {}, file_mode=file_mode)
        assert err.value.reason == "InvalidURL"
        assert "step 'call'" in err.value.message


@pytest.mark.parametrize("url", ["http://127.0.0.1:9901/stats", "http://localhost:9102/metrics", "http://[::1]:8090/x", "http://127.1.2.3/x", "http://[::ffff:127.0.0.1]:9901/stats"])
def test_the_gateway_pods_own_loopback_is_refused_on_a_cluster_and_allowed_in_file_mode(url: str) -> None:
    with pytest.raises(SpecError) as err:
        accept(parse_workflow(_spec(url)), {})
    assert err.value.reason == "InvalidURL" and ("loopback" in err.value.message or "own host" in err.value.message)
    accepted = accept(parse_workflow(_spec(url)), {}, file_mode=True)
    assert accepted.steps[0].spec.name == "call"


def test_an_ordinary_host_is_accepted() -> None:
    accepted = accept(parse_workflow(_spec("https://helpdesk.example.com/api/tickets")), {})
    assert accepted.steps[0].spec.http_request is not None
