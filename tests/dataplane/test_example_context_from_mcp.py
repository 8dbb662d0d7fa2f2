"""examples/context-from-mcp, run as its README says: the CRM's MCP server, the gateway, a chat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from crdgol.stack import free_port, wait_http
from tests.conftest import ROOT, example_stack


def ask(url: str, customer: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "support-chat", "messages": [{"role": "user", "content": "Why was I charged twice?"}]},
        headers={"authorization": "Bearer sk-crdgol-quickstart", "x-customer-id": customer},
        timeout=30,
    )


def test_the_customer_record_and_triage_prompt_reach_the_model_and_a_down_crm_refuses(tmp_path: Path) -> None:
    port = free_port()
    crm = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "context-from-mcp" / "crm_server.py"), "--port", str(port)], start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/reads", (200,), 20, crm)
        stack = example_stack(tmp_path, "context-from-mcp")
        binding = stack.settings.manifests / "binding.yaml"
        binding.write_text(binding.read_text().replace("127.0.0.1:8765", f"127.0.0.1:{port}").replace("cacheTTL: 30s", "cacheTTL: 1s"))
        stack.start()
        try:
            assert ask(stack.url, "c-100").status_code == 200
            sent = httpx.get(f"{stack.mock_url}/_mock/requests", timeout=10).json()[-1]["body"]
            block = next(m["content"] for m in sent["messages"] if m["role"] == "user" and m["content"].startswith("<mcp_context>"))
            assert "Ada Lovelace, plan Enterprise" in block
            assert "Enterprise customers: acknowledge within 1 hour" in block
            assert all("Ada" not in m["content"] for m in sent["messages"] if m["role"] == "system")
            assert httpx.get(f"http://127.0.0.1:{port}/reads", timeout=10).json() == {"customer": 1, "triage": 1}
            ask(stack.url, "c-100")
            assert httpx.get(f"http://127.0.0.1:{port}/reads", timeout=10).json() == {"customer": 1, "triage": 1}
            os.killpg(crm.pid, signal.SIGTERM)
            crm.wait(10)
            import time

            time.sleep(1.2)  # past the (shortened) cache TTL
            r = ask(stack.url, "c-100")
            assert r.status_code == 503 and r.json()["error"]["code"] == "context_source_unavailable"
        finally:
            stack.stop()
    finally:
        if crm.poll() is None:
            os.killpg(crm.pid, signal.SIGTERM)
            crm.wait(10)
