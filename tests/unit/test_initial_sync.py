"""The first roll-out of a (re)started operator waits for what it listed at start, or a deadline."""

from __future__ import annotations

from controller.initial_sync import InitialSync, list_path


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_it_holds_until_every_listed_object_is_in_the_state_then_stays_open() -> None:
    gate = InitialSync({"AIModelBinding": {"a/x", "a/y"}, "WorkflowSpec": {"a/w"}}, deadline=30, clock=Clock())
    assert gate.holds({"AIModelBinding": {"a/x"}})
    assert gate.missing({"AIModelBinding": {"a/x"}}) == {"AIModelBinding": 1, "WorkflowSpec": 1}
    assert gate.holds({"AIModelBinding": {"a/x", "a/y"}, "WorkflowSpec": set()})
    assert not gate.holds({"AIModelBinding": {"a/x", "a/y", "a/z"}, "WorkflowSpec": {"a/w"}})
    assert not gate.holds({})  # open for good: later deletions do not close it again


def test_past_the_deadline_it_rolls_out_without_what_never_came() -> None:
    clock = Clock()
    gate = InitialSync({"Secret": {"a/deleted-meanwhile"}}, deadline=30, clock=clock)
    assert gate.holds({"Secret": set()})
    clock.now = 30
    assert not gate.holds({"Secret": set()})


def test_nothing_listed_holds_nothing() -> None:
    assert not InitialSync({}, deadline=30, clock=Clock()).holds({})


def test_list_paths_cluster_wide_or_per_namespace() -> None:
    assert list_path("crdgol.io/v1alpha1", "aimodelbindings") == "/apis/crdgol.io/v1alpha1/aimodelbindings"
    assert list_path("v1", "secrets", "team-a", "crdgol.io/api-key%3Dtrue") == "/api/v1/namespaces/team-a/secrets?labelSelector=crdgol.io/api-key%3Dtrue"


async def test_what_is_listed_per_kind_and_a_kind_that_cannot_be_listed_is_not_waited_for() -> None:
    from typing import Any

    from controller.initial_sync import listed_keys

    calls: list[str] = []

    async def request(method: str, path: str, *_: Any) -> tuple[int, Any]:
        calls.append(path)
        if "secrets" in path:
            return 403, {"kind": "Status"}  # RBAC without list on Secrets
        return 200, {"items": [{"metadata": {"namespace": path.split("/")[-2], "name": "x"}}]}

    kinds = [("AIModelBinding", "crdgol.io/v1alpha1", "aimodelbindings", ""), ("Secret", "v1", "secrets", "a%3Dtrue")]
    got = await listed_keys(request, kinds, ("team-a", "team-b"))
    assert got == {"AIModelBinding": {"team-a/x", "team-b/x"}, "Secret": set()}
    assert len(calls) == 4
