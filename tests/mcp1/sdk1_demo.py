"""An MCP server and client on the MCP Python SDK 1.x (`mcp.server.fastmcp`), over stdio, traced by
Logfire's `instrument_mcp()` or by OpenLLMetry's `opentelemetry-instrumentation-mcp`, each process
exporting on its own to toolsight (OTLP/HTTP protobuf at OTEL_EXPORTER_OTLP_ENDPOINT).

Usage: python sdk1_demo.py logfire|openllmetry|sdk     # the client; it starts the server itself

`sdk` is the MCP SDK 2.x's own tracing (no instrumentation package), run with mcp 2.x installed.

The workload: `rows` (3 rows), `list_items` (empty), `fail_tool` (raises; called six times, an
agent stuck retrying it), `limited` three times behind a rate limiter that refuses the third,
`soft_fail` (an `isError` result without raising), `echo` twice with the same arguments, and `slow` (3 s) that
the client gives up on after 0.5 s.
"""
import asyncio
import importlib.metadata
import os
import sys
from datetime import timedelta

MCP_1 = importlib.metadata.version("mcp").startswith("1.")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

instrumentation, role = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "client")
service = f"mcp1-{instrumentation}-{role}"

if instrumentation == "sdk":
    # The MCP SDK 2.x traces itself once a tracer provider is set.
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    shutdown = provider.shutdown
elif instrumentation == "logfire":
    import logfire

    logfire.configure(
        send_to_logfire=False,
        service_name=service,
        console=False,
        additional_span_processors=[SimpleSpanProcessor(OTLPSpanExporter())],
    )
    logfire.instrument_mcp()
    shutdown = logfire.force_flush
else:
    from opentelemetry import trace
    from opentelemetry.instrumentation.mcp import McpInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    McpInstrumentor().instrument()
    shutdown = provider.shutdown

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.types import CallToolResult, TextContent  # noqa: E402

# The field is `isError` in mcp 1.x and `is_error` in 2.x.
IS_ERROR = "isError" if MCP_1 else "is_error"
try:
    from mcp.server.fastmcp import FastMCP  # noqa: E402  (mcp 1.x)
except ModuleNotFoundError:
    from mcp.server.mcpserver import MCPServer as FastMCP  # noqa: E402  (mcp 2.x)


def server() -> None:
    mcp = FastMCP("sdk1-demo")

    @mcp.tool()
    def rows(n: int) -> list[dict]:
        return [{"id": i} for i in range(n)]

    @mcp.tool()
    def list_items(query: str) -> list[str]:
        return []

    @mcp.tool()
    def fail_tool(reason: str) -> str:
        raise ValueError(f"failed on purpose: {reason}")

    @mcp.tool()
    def echo(text: str) -> str:
        return text

    @mcp.tool()
    def soft_fail(reason: str) -> CallToolResult:
        """Reports a failure as an isError result, without raising."""
        return CallToolResult(
            content=[TextContent(type="text", text=f"no: {reason}")], **{IS_ERROR: True}
        )

    calls = {"limited": 0}

    @mcp.tool()
    def limited(x: int) -> int:
        """Behind a rate limiter: the third call and later are refused."""
        calls["limited"] += 1
        if calls["limited"] > 2:
            raise RuntimeError("rate limit exceeded: 2 calls per minute")
        return x

    @mcp.tool()
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    try:
        mcp.run("stdio")
    finally:
        shutdown()


async def client() -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=[os.path.abspath(__file__), instrumentation, "server"],
        env=dict(os.environ),
    )
    # The agent's task is one span: its calls are one session (one trace).
    from opentelemetry import trace as otel_trace

    with otel_trace.get_tracer("sdk1-demo-agent").start_as_current_span("agent task"):
        await workload(params)
    print("done", flush=True)


async def workload(params) -> None:
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            await session.list_tools()
            await session.call_tool("rows", {"n": 3})
            await session.call_tool("list_items", {"query": "nothing"})
            # An agent stuck retrying a failing tool: the same call six times.
            for _ in range(6):
                r = await session.call_tool("fail_tool", {"reason": "demo"})
                assert getattr(r, "is_error", None) or getattr(r, "isError", None)
            for i in range(3):
                await session.call_tool("limited", {"x": i})
            r = await session.call_tool("soft_fail", {"reason": "demo"})
            assert getattr(r, "is_error", None) or getattr(r, "isError", None)
            await session.call_tool("echo", {"text": "same"})
            await session.call_tool("echo", {"text": "same"})
            try:
                # mcp 1.x takes a timedelta, mcp 2.x seconds.
                timeout = timedelta(seconds=0.5) if MCP_1 else 0.5
                await session.call_tool("slow", {"seconds": 3}, read_timeout_seconds=timeout)
                raise AssertionError("slow returned within the timeout")
            except AssertionError:
                raise
            except Exception:
                pass
            # Let the server finish the slow call and export its side before it is stopped.
            await asyncio.sleep(3)


if role == "server":
    server()
else:
    asyncio.run(client())
    shutdown()
