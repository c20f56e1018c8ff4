"""A FastMCP 4.x server and client in one process, traced by FastMCP's native OpenTelemetry
instrumentation and exported to toolsight with the official OTLP exporter that
OTEL_EXPORTER_OTLP_PROTOCOL names (grpc, http/protobuf or http/json), to OTEL_EXPORTER_OTLP_ENDPOINT.
The exporter set-up is the README's, line for line.

Usage: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 python mcp_demo.py SERVICE_NAME
"""
import asyncio
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
if protocol == "grpc":
    # endpoint http://toolsight-host:4317; needs opentelemetry-exporter-otlp-proto-grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
elif protocol == "http/json":
    # endpoint http://toolsight-host:4318; needs opentelemetry-exporter-otlp-json-http
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter
else:
    # endpoint http://toolsight-host:4318 (it appends /v1/traces)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

service = sys.argv[1]
provider = TracerProvider(resource=Resource.create({"service.name": service}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_OTLP_*
trace.set_tracer_provider(provider)

# Imported after the tracer provider is set, as FastMCP's docs advise.
from fastmcp import Client, FastMCP  # noqa: E402
from fastmcp.exceptions import ToolError  # noqa: E402

mcp = FastMCP("toolsight-e2e")


@mcp.tool
def list_items(query: str) -> list[str]:
    """Returns an empty list."""
    return []


@mcp.tool
def fail_tool(reason: str) -> str:
    """Fails with a tool error (an isError result)."""
    raise ToolError(f"failed on purpose: {reason}")


@mcp.tool
def echo(text: str) -> str:
    return text


async def main() -> None:
    async with Client(mcp) as client:
        await client.list_tools()
        await client.call_tool("list_items", {"query": "nothing"})
        # An agent stuck retrying a failing tool: the same call six times.
        for _ in range(6):
            result = await client.call_tool("fail_tool", {"reason": "demo"}, raise_on_error=False)
            assert result.is_error
        await client.call_tool("echo", {"text": "same"})
        await client.call_tool("echo", {"text": "same"})


asyncio.run(main())
provider.shutdown()  # flushes every span to toolsight
print("exported")
