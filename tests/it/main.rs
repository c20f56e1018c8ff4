//! The integration tests, one binary (each test file linking the whole crate on its own made
//! linking dominate the build). They talk to real things: PostgreSQL at `TOOLSIGHT_TEST_DATABASE_URL`
//! (default 127.0.0.1:5432), `toolsight serve` as a child process, real OTLP exporters, Python
//! MCP servers and clients from PyPI, an SMTP server and Prometheus Alertmanager.
//!
//! Run one family with `cargo test --test it <module>::`, e.g. `cargo test --test it fastmcp_e2e::`.

mod common;

mod alerts_e2e;
mod architecture;
mod dashboards;
mod demo;
mod fastmcp_e2e;
mod forward_e2e;
mod fuzz_corpus;
mod histogram_sql;
mod hostile_input;
mod ingest_e2e;
mod metric_captures;
mod notify_e2e;
mod outage_e2e;
mod protocol_e2e;
mod raw_policy;
mod retention;
mod rolling_upgrade;
mod rule_state;
mod rule_windows;
mod rules_cli;
mod security_e2e;
mod tls_e2e;
