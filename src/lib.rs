//! toolsight: an OTLP collector and alerting service for MCP tool calls.
//!
//! The data path, in pipeline order: [`receive`] → [`normalize`] → [`store`]; then
//! [`evaluate`] (alert rules over what is stored) → [`notify`] (receivers). [`app`] wires them,
//! [`config`] configures them ([`watch`] notices the files re-read while running),
//! [`listener`] and [`tls`] serve their connections, [`admin`] and
//! [`metrics`] observe them; [`demo`] is the incidents scenario of `toolsight demo`. Beside the
//! service: `fuzzing` (the fuzz targets' bodies, behind the
//! `fuzzing` feature); the load generator and the benchmark are the `toolsight-loadgen` crate
//! (`loadgen/`). ARCHITECTURE.md has the codemap.

#![warn(unreachable_pub)]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod evaluate;
pub mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub(crate) mod listener;
pub mod metrics;
pub mod normalize;
pub mod notify;
pub mod receive;
pub mod secret;
pub mod store;
pub mod tls;
pub(crate) mod watch;

/// Installs the process's TLS crypto provider (ring) for outgoing HTTPS (webhooks,
/// Alertmanager). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
