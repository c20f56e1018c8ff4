"""A FastMCP 4.x server and client in one process, traced by FastMCP's native OpenTelemetry
instrumentation and exported with the official OTLP/HTTP exporter to toolsight.

Usage: python mcp_demo.py OTLP_TRACES_URL SERVICE_NAME
"""
import asyncio
import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

endpoint, service = sys.argv[1], sys.argv[2]
provider = TracerProvider(resource=Resource.create({"service.name": service}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
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
        result = await client.call_tool("fail_tool", {"reason": "demo"}, raise_on_error=False)
        assert result.is_error
        await client.call_tool("echo", {"text": "same"})
        await client.call_tool("echo", {"text": "same"})


asyncio.run(main())
provider.shutdown()  # flushes every span to toolsight
print("exported")
