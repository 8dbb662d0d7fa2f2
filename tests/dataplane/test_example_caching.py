"""examples/caching, run as its README says: a repeated question is answered by the gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.conftest import running_example

KEY = "sk-crdgol-quickstart"


def test_the_example_answers_a_repeated_question_from_its_cache(tmp_path: Path) -> None:
    with running_example(tmp_path, "caching") as stack:
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)
        msgs = [{"role": "user", "content": "What is crdgol?"}]
        seen = []
        for extra in ({}, {}, {"cache-control": "no-cache"}):
            raw = client.chat.completions.with_raw_response.create(model="quickstart-chat", messages=msgs, extra_headers=extra)  # type: ignore[arg-type]
            seen.append(raw.headers["x-crdgol-cache"])
            assert "What is crdgol?" in (raw.parse().choices[0].message.content or "")
        assert seen == ["miss", "hit", "bypass"]
        # The FAQ binding: the same question, cold (temperature 0), is served again; a hot one
        # (above maxTemperature) is never cached.
        faq = [
            client.chat.completions.with_raw_response.create(model="faq", messages=msgs, temperature=0).headers["x-crdgol-cache"]  # type: ignore[arg-type]
            for _ in range(2)
        ]
        assert faq == ["miss", "hit"]
        hot = client.chat.completions.with_raw_response.create(model="faq", messages=msgs, temperature=0.9)  # type: ignore[arg-type]
        assert "x-crdgol-cache" not in hot.headers
        text = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).text
        assert 'crdgol_cache_lookups_total{binding="default/quickstart-chat",result="hit"} 1.0' in text
