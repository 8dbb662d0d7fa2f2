"""examples/mcp-tools, run as its README says: its two MCP servers, the gateway, its client."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crdgol.stack import Stack, StackSettings, free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp-tools"


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Stack]:
    folder = tmp_path / "mcp-tools"
    shutil.copytree(EXAMPLE, folder)
    search, crm = free_port(), free_port()
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8711", f"127.0.0.1:{search}").replace("127.0.0.1:8712", f"127.0.0.1:{crm}"))
    servers = subprocess.Popen([sys.executable, str(folder / "servers.py"), "--search-port", str(search), "--crm-port", str(crm)])
    stack = Stack(StackSettings(manifests=folder, mock_port=None, quiet=True))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{crm}/mcp", timeout=1)
                break
            except httpx.TransportError:
                assert servers.poll() is None and time.monotonic() < deadline, "the example's servers did not start"
                time.sleep(0.1)
        stack.start()
        yield stack
    finally:
        stack.stop()
        servers.terminate()
        servers.wait(10)


def client(stack: Stack, key: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "client.py"), "--gateway", stack.url, "--key", key], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_intern_gets_search_and_lookups_but_may_not_update(example: Stack) -> None:
    out = client(example, "sk-crdgol-intern")
    assert "tools: ['crm__lookup_customer', 'search__fetch_page', 'search__web_search']" in out
    assert '"name": "Ada Lovelace"' in out
    assert "progress 3/3: searched source 3" in out
    assert "update refused: tenant default/intern may not call the tool 'crm__update_customer'" in out


def test_the_analyst_may_update_a_customer(example: Stack) -> None:
    out = client(example, "sk-crdgol-analyst")
    assert "'crm__update_customer'" in out.split("\n", 1)[0]
    assert "update: done" in out
