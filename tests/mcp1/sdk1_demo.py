"""An MCP server and client on the MCP Python SDK 1.x (`mcp.server.fastmcp`), over stdio or
streamable HTTP, traced by Logfire's `instrument_mcp()` or by OpenLLMetry's
`opentelemetry-instrumentation-mcp`, each process exporting on its own to toolsight (OTLP/HTTP
protobuf, or JSON when OTEL_EXPORTER_OTLP_PROTOCOL is http/json, at OTEL_EXPORTER_OTLP_ENDPOINT).

Usage: python sdk1_demo.py logfire|openllmetry|sdk [stdio|http]
    # the client; it starts the server itself (over HTTP on a free loopback port)

`sdk` is the MCP SDK 2.x's own tracing (no instrumentation package), run with mcp 2.x installed.

The workload: `rows` (3 rows), `list_items` (empty), `fail_tool` (raises; called six times, an
agent stuck retrying it), `limited` three times behind a rate limiter that refuses the third,
`soft_fail` (an `isError` result without raising), `echo` twice with the same arguments, and `slow` (3 s) that
the client gives up on after 0.5 s.
"""
import asyncio
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta

MCP_1 = importlib.metadata.version("mcp").startswith("1.")

if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "http/json":
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

instrumentation = sys.argv[1]
role = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] in ("client", "server") else "client"
transport = next((a for a in sys.argv[2:] if a in ("stdio", "http")), "stdio")
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

if MCP_1:
    # The name 1.x code uses (and OpenLLMetry wraps); 2.x renamed it.
    from mcp.client.streamable_http import streamablehttp_client as http_client  # noqa: E402
else:
    from mcp.client.streamable_http import streamable_http_client as http_client  # noqa: E402
from mcp.types import CallToolResult, TextContent  # noqa: E402

# The field is `isError` in mcp 1.x and `is_error` in 2.x.
IS_ERROR = "isError" if MCP_1 else "is_error"
try:
    from mcp.server.fastmcp import FastMCP  # noqa: E402  (mcp 1.x)
except ModuleNotFoundError:
    from mcp.server.mcpserver import MCPServer as FastMCP  # noqa: E402  (mcp 2.x)


def server(port: int | None) -> None:
    # mcp 1.x takes the listen address when built, 2.x when run.
    mcp = FastMCP("sdk1-demo", port=port) if MCP_1 and port else FastMCP("sdk1-demo")

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
        if port is None:
            mcp.run("stdio")
        elif MCP_1:
            mcp.run("streamable-http")
        else:
            mcp.run("streamable-http", port=port)
    finally:
        shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client() -> None:
    script = [sys.executable, os.path.abspath(__file__), instrumentation, "server"]
    # The agent's task is one span: its calls are one session (one trace).
    from opentelemetry import trace as otel_trace

    with otel_trace.get_tracer("sdk1-demo-agent").start_as_current_span("agent task"):
        if transport == "stdio":
            params = StdioServerParameters(command=script[0], args=script[1:], env=dict(os.environ))
            async with stdio_client(params) as streams:
                await workload(streams)
        else:
            port = free_port()
            proc = subprocess.Popen([*script, "http", str(port)])
            try:
                await wait_port(port)
                async with http_client(f"http://127.0.0.1:{port}/mcp") as streams:
                    await workload(streams)
            finally:
                # SIGINT: the server's own shutdown path, which flushes its spans.
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
    print("done", flush=True)


async def wait_port(port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the server did not listen on {port}")


async def workload(streams) -> None:
    read, write = streams[0], streams[1]
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
    server(int(sys.argv[4]) if transport == "http" else None)
else:
    asyncio.run(client())
    shutdown()
