"""An MCP server's calls to the API behind its tools, made with `requests` and with `httpx`, traced by
the OpenTelemetry instrumentations of both with response headers captured
(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE, set by the caller), exported to
toolsight (OTLP/HTTP protobuf at OTEL_EXPORTER_OTLP_ENDPOINT).

The upstream is a local HTTP server answering with rate-limit headers: 3 GETs with `requests`
(remaining 40, 20, 10 of 100, a reset 60 s ahead) and 2 with `httpx` (the second a 429 with
Retry-After: 30).
"""
import http.server
import threading
import time

import httpx
import requests
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "http-clients-demo"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
RequestsInstrumentor().instrument()
HTTPXClientInstrumentor().instrument()

answers = [(200, "40"), (200, "20"), (200, "10"), (200, "9"), (429, "0")]


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status, remaining = answers.pop(0)
        self.send_response(status)
        self.send_header("X-RateLimit-Limit", "100")
        self.send_header("X-RateLimit-Remaining", remaining)
        self.send_header("X-RateLimit-Reset", str(int(time.time()) + 60))
        if status == 429:
            self.send_header("Retry-After", "30")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/search"

tracer = trace.get_tracer("http-clients-demo")
with tracer.start_as_current_span("tools/call search"):
    for _ in range(3):
        requests.get(url, timeout=5)
    with httpx.Client() as client:
        for _ in range(2):
            client.get(url)

server.shutdown()
provider.shutdown()
print("done", flush=True)
