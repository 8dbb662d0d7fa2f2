"""The extproc gRPC server over real loopback gRPC: health, a refused request, graceful drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.manifests import load_folder
from controller.render import RenderSettings, render
from crdgol.stack import free_port
from extproc.policy import PolicyHolder, compile_policy
from extproc.server import ServerSettings, serve
from extproc.services import Services

ROOT = Path(__file__).resolve().parents[2]


def quickstart_services() -> Services:
    m = load_folder(ROOT / "examples" / "quickstart")
    return Services(policy=PolicyHolder(compile_policy(render(m.bindings, m.secrets, RenderSettings()).snapshot)))


def headers(**h: str) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()])
        )
    )


async def test_health_serving_and_an_unknown_path_refused_then_drain_on_stop() -> None:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(ServerSettings(port=port, metrics_port=0, grace=5), quickstart_services(), stop))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await ch.channel_ready()
        status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        stub = ep_grpc.ExternalProcessorStub(ch)
        call = stub.Process()
        await call.write(headers(**{":method": "GET", ":path": "/nope"}))
        resp = await call.read()
        assert resp.immediate_response.status.code == 404

        # A stream that is mid-request when shutdown starts is still served to its end.
        open_call = stub.Process()
        await open_call.write(
            headers(**{
                ":method": "POST",
                ":path": "/v1/chat/completions",
                "content-type": "application/json",
                "authorization": "Bearer sk-crdgol-quickstart",
            })
        )
        assert (await open_call.read()).HasField("request_headers")
        stop.set()
        await asyncio.sleep(0.3)
        assert not task.done()  # draining, not gone
        await open_call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model": "nope", "messages": []}', end_of_stream=True)))
        resp = await open_call.read()
        assert resp.immediate_response.status.code == 404  # processed after shutdown began
        await open_call.done_writing()
        # New streams are refused once shutdown has begun.
        late = stub.Process()
        try:
            await late.write(headers(**{":method": "GET", ":path": "/v1/models"}))
            await late.read()
            refused = False
        except grpc.aio.AioRpcError:
            refused = True
        except asyncio.InvalidStateError:
            refused = True
        assert refused
    await asyncio.wait_for(task, 10)


def test_a_policy_file_is_loaded_and_an_older_one_is_refused(tmp_path: Path) -> None:
    from extproc.server import load_policy_file

    m = load_folder(ROOT / "examples" / "quickstart")
    path = tmp_path / "policy.pb"
    services = Services()
    path.write_bytes(render(m.bindings, m.secrets, RenderSettings(version=7)).snapshot.SerializeToString())
    load_policy_file(services, path)
    assert services.current.version == 7 and "quickstart-chat" in services.current.models
    # A stale file (version not newer) leaves the policy in force alone.
    path.write_bytes(render([], m.secrets, RenderSettings(version=3)).snapshot.SerializeToString())
    load_policy_file(services, path)
    assert services.current.version == 7 and "quickstart-chat" in services.current.models
