"""Which vector index for the semantic cache: ``python -m benchmarks.cache_index``.

Compares the numpy scan the cache uses (``extproc.cache_semantic.VectorIndex``) with the two
in-process approximate indexes on PyPI it could have used, usearch and hnswlib (HNSW graphs), at
the sizes one cache partition holds (100 to 10,000 questions) and two embedding sizes (8, the
mock's, and 1,536, OpenAI's text-embedding-3-small). Per case: time to add every vector, p50 and
p99 of one query (the most similar stored vector), and for the approximate ones how often they
find the same vector as the exact scan (recall@1). usearch and hnswlib are not dependencies of
crdgol: install them next to it to include them (they are reported as missing otherwise).
Results: ``<out>/cache_index.json``.
"""

from __future__ import annotations

import os

# As extproc runs it (crdgol.cli sets this before numpy loads): one BLAS thread per scan.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from extproc.cache_semantic import VectorIndex  # noqa: E402

SIZES = (100, 1_000, 10_000)
DIMS = (8, 1536)
QUERIES = 300


def _timed(fn: Callable[[np.ndarray], int], queries: np.ndarray) -> tuple[list[float], list[int]]:
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(fn(q))
        times.append((time.perf_counter() - t) * 1e6)
    return times, found


def _summary(build_s: float, times: list[float], found: list[int], truth: list[int]) -> dict[str, Any]:
    times.sort()
    return {
        "build_ms": round(build_s * 1000, 2),
        "query_p50_us": round(statistics.median(times), 1),
        "query_p99_us": round(times[int(len(times) * 0.99) - 1], 1),
        "recall_at_1": round(sum(a == b for a, b in zip(found, truth, strict=True)) / len(truth), 3),
    }


def case(n: int, dim: int, rng: np.random.Generator) -> dict[str, Any]:
    data = rng.standard_normal((n, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    picks = rng.integers(0, n, QUERIES)
    queries = data[picks] + 0.3 * rng.standard_normal((QUERIES, dim)).astype(np.float32) / np.sqrt(dim)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    truth = [int(np.argmax(data @ q)) for q in queries]
    out: dict[str, Any] = {}

    t = time.perf_counter()
    index = VectorIndex(dim, n)
    for i in range(n):
        index.add(str(i), data[i], float("inf"))
    build = time.perf_counter() - t
    times, found = _timed(lambda q: int(index.best(q, -1.0, 0.0) or -1), queries)
    out["numpy_scan"] = _summary(build, times, found, truth)

    if importlib.util.find_spec("usearch") is not None:
        from usearch.index import Index

        t = time.perf_counter()
        u = Index(ndim=dim, metric="cos", dtype="f32")
        u.add(np.arange(n), data)
        build = time.perf_counter() - t
        times, found = _timed(lambda q: int(u.search(q, 1).keys[0]), queries)
        out["usearch"] = _summary(build, times, found, truth)
    else:
        out["usearch"] = "not installed"

    if importlib.util.find_spec("hnswlib") is not None:
        import hnswlib

        t = time.perf_counter()
        h = hnswlib.Index(space="cosine", dim=dim)
        h.init_index(max_elements=n, ef_construction=100, M=16)
        h.add_items(data, np.arange(n))
        h.set_ef(50)
        build = time.perf_counter() - t
        times, found = _timed(lambda q: int(h.knn_query(q, k=1)[0][0][0]), queries)
        out["hnswlib"] = _summary(build, times, found, truth)
    else:
        out["hnswlib"] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="semantic cache index choice")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(13)
    results: dict[str, Any] = {"numpy": np.__version__}
    for name in ("usearch", "hnswlib"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            from importlib.metadata import version

            results[name] = version(name)
    for dim in DIMS:
        for n in SIZES:
            key = f"n{n}-d{dim}"
            results[key] = case(n, dim, rng)
            print(key, json.dumps(results[key]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_index.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
