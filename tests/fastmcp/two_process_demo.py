"""An MCP server and an MCP client in two processes, over streamable HTTP, each traced by FastMCP's
native OpenTelemetry instrumentation and exporting on its own to toolsight (OTLP/HTTP protobuf,
OTEL_EXPORTER_OTLP_ENDPOINT) with a SimpleSpanProcessor: every span is its own export, as soon as
it ends, so the two sides of a call and the MCP SDK span nested in FastMCP's client span arrive
separately and in the order they end.

Usage:
  python two_process_demo.py server PORT     # serves streamable HTTP until killed
  python two_process_demo.py client URL      # runs the workload against URL, then exits
  python two_process_demo.py client stdio    # the same, the server a child process over stdio
  python two_process_demo.py client URL legacy   # over the legacy protocol (2025-11-25 handshake)

The workload: a tool returning rows, one returning an empty list, one raising (called six times,
an agent stuck retrying it), one returning an
`isError` result without raising, a slow one the client gives up on after 0.5 s, and one behind
a rate limiter (burst of 2) called 4 times at once.
"""
import asyncio
import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

role, where = sys.argv[1], sys.argv[2]
provider = TracerProvider(resource=Resource.create({"service.name": f"demo-{role}"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)

from fastmcp import Client, FastMCP  # noqa: E402
from fastmcp.exceptions import ToolError  # noqa: E402
from fastmcp.server.middleware.rate_limiting import RateLimitingMiddleware  # noqa: E402
from fastmcp.tools.base import ToolResult  # noqa: E402
from mcp.types import TextContent  # noqa: E402


class LimitOneTool(RateLimitingMiddleware):
    """A token bucket in front of the `limited` tool only."""

    async def on_request(self, context, call_next):
        if getattr(context.message, "name", None) == "limited":
            return await super().on_request(context, call_next)
        return await call_next(context)


def server(port: int) -> None:
    mcp = FastMCP("two-process-demo")
    mcp.add_middleware(LimitOneTool(max_requests_per_second=0.01, burst_capacity=2))

    @mcp.tool
    def rows(n: int) -> list[dict]:
        return [{"id": i} for i in range(n)]

    @mcp.tool
    def list_items(query: str) -> list[str]:
        return []

    @mcp.tool
    def fail_tool(reason: str) -> str:
        raise ToolError(f"failed on purpose: {reason}")

    @mcp.tool
    def soft_fail(reason: str) -> ToolResult:
        """Reports a failure as an isError result, without raising."""
        return ToolResult(content=[TextContent(type="text", text=f"no: {reason}")], is_error=True)

    @mcp.tool
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @mcp.tool
    def limited(x: int) -> int:
        return x

    if port == "stdio":
        mcp.run(transport="stdio", show_banner=False)
    else:
        mcp.run(transport="http", host="127.0.0.1", port=int(port), show_banner=False)


async def client(url: str, mode: str) -> None:
    if url == "stdio":
        import os

        from fastmcp.client.transports import PythonStdioTransport

        target = PythonStdioTransport(
            __file__, args=["server", "stdio"], env=dict(os.environ), keep_alive=False
        )
    else:
        target = url
    async with Client(target, mode=mode) as c:
        await c.call_tool("rows", {"n": 5})
        await c.call_tool("list_items", {"query": "nothing"})
        # An agent stuck retrying a failing tool: the same call six times.
        for _ in range(6):
            r = await c.call_tool("fail_tool", {"reason": "demo"}, raise_on_error=False)
            assert r.is_error
        r = await c.call_tool("soft_fail", {"reason": "demo"}, raise_on_error=False)
        assert r.is_error
        try:
            await c.call_tool("slow", {"seconds": 3}, timeout=0.5)
            raise AssertionError("slow returned within the timeout")
        except AssertionError:
            raise
        except Exception:
            pass
        results = await asyncio.gather(
            *(c.call_tool("limited", {"x": i}, raise_on_error=False) for i in range(4)),
            return_exceptions=True,
        )
        refused = sum(1 for r in results if isinstance(r, Exception) or r.is_error)
        assert refused == 2, results
        # A stdio server ends with the session: let it export its last spans first.
        await asyncio.sleep(1)
    print("done", flush=True)


if role == "server":
    server(where)
else:
    asyncio.run(client(where, sys.argv[3] if len(sys.argv) > 3 else "auto"))
    provider.shutdown()
