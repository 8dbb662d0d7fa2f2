"""A (re)started operator rolls out the cluster's whole config, never the part of it kopf has
delivered so far: Envoy and extproc keep the previous controller's config until then."""

from __future__ import annotations

import time

import kmock

from crdgol.pb import policy_pb2 as pb
from tests.kube.conftest import (
    ApiServer,
    Cluster,
    declare_resources,
    new_controller,
    operator_running,
)
from tests.kube.test_operator import binding, secret

BINDINGS = 40


async def test_a_restarted_operator_rolls_out_every_listed_binding_and_key_at_once() -> None:
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        before = Cluster(server, new_controller())
        await before.create(secret("provider", {"apiKey": "sk-upstream"}))
        for i in range(3):
            await before.create(secret(f"keys-{i}", {"k": f"sk-team-{i}"}, api_key=True))
        # A labelled Secret the controller cannot use (not base64): delivered all the same, so the
        # roll-out does not wait the whole deadline for it.
        broken = secret("keys-broken", {}, api_key=True)
        broken["data"] = {"k": "not base64!"}
        await before.create(broken)
        for i in range(BINDINGS):
            await before.create(binding(f"chat-{i}", model=f"chat-{i}"))

        controller = new_controller()
        rolled: list[pb.PolicySnapshot] = []
        set_policy = controller.policy.set

        async def record(snapshot: pb.PolicySnapshot) -> None:
            rolled.append(snapshot)
            await set_policy(snapshot)

        controller.policy.set = record  # type: ignore[method-assign]
        started = time.monotonic()
        async with operator_running(server, controller):
            cluster = Cluster(server, controller)
            await cluster.eventually(lambda: rolled, 20, "a first roll-out")
            waited = time.monotonic() - started
        first = rolled[0]
        assert len(first.bindings) == BINDINGS, [b.model for b in first.bindings]
        assert len(first.api_keys) == 3
        assert all(len(s.bindings) == BINDINGS for s in rolled)
        assert waited < 15, waited  # it waited for the listing, not for the deadline
