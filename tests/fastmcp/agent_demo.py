"""An agent traced end to end: one span per agent run; inside it, model calls through the OpenAI
client (traced by opentelemetry-instrumentation-openai-v2) to OPENAI_BASE_URL, and tool calls
through a FastMCP client to an in-process FastMCP server. Exported to toolsight as mcp_demo.py is.

Usage: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OPENAI_BASE_URL=http://127.0.0.1:PORT/v1 \
       python agent_demo.py SERVICE_NAME RUNS STEPS
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
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
elif protocol == "http/json":
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

service, runs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
provider = TracerProvider(resource=Resource.create({"service.name": service}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)

from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: E402

OpenAIInstrumentor().instrument()

from fastmcp import Client, FastMCP  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

mcp = FastMCP("agent-tools")


@mcp.tool
def lookup(q: str) -> str:
    return f"result for {q}"


tracer = trace.get_tracer("agent-demo")


async def main() -> None:
    llm = AsyncOpenAI(api_key="test-key")  # base URL from OPENAI_BASE_URL
    async with Client(mcp) as tools:
        for run in range(runs):
            with tracer.start_as_current_span("agent run"):
                for step in range(steps):
                    await llm.chat.completions.create(
                        model="gpt-test",
                        messages=[{"role": "user", "content": f"step {step}"}],
                    )
                    await tools.call_tool("lookup", {"q": f"{run}-{step}"})


asyncio.run(main())
provider.shutdown()
print("exported")
