//! toolsight: an OTLP collector and alerting service for MCP tool calls.
//!
//! The data path, in pipeline order: [`receive`] → [`normalize`] → [`store`]; [`app`] wires
//! them, [`config`] configures them, [`admin`] observes them.

pub mod admin;
pub mod app;
pub mod bench;
pub mod config;
pub mod evaluate;
pub mod loadgen;
pub mod metrics;
pub mod normalize;
pub mod notify;
pub mod receive;
pub mod store;
