//! toolsight: an OTLP collector and alerting service for MCP tool calls.
//!
//! The data path, in pipeline order: [`receive`] → [`normalize`] → [`store`]; [`app`] wires
//! them, [`config`] configures them, [`admin`] observes them.

pub mod admin;
pub mod app;
pub mod config;
pub mod metrics;
pub mod normalize;
pub mod receive;
pub mod store;
