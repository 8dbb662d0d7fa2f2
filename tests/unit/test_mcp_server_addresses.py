"""An MCPServer's answers reach the caller whole, at the URL's exact path: its URL may not name
the cloud metadata service (link-local), a multicast or an unspecified address."""

from __future__ import annotations

import pytest

from controller.mcp_servers import parse_mcp_server
from controller.spec_parsing import SpecError
from tests.unit.test_mcp_servers import server


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/iam/security-credentials/x", "http://[fe80::a9fe:a9fe]/mcp", "http://0.0.0.0:9901/mcp", "http://[::ffff:169.254.169.254]/mcp"],
)
def test_an_mcp_server_url_on_a_reserved_address_is_refused(url: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_mcp_server(server(url=url))
    assert refused.value.reason == "InvalidEndpoint" and "spec.url" in refused.value.message


def test_an_ordinary_host_is_served() -> None:
    assert parse_mcp_server(server(url="http://crm.tools.svc:8000/mcp")).endpoint.host == "crm.tools.svc"
