//! toolsight: an OTLP collector and alerting service for MCP tool calls.
//!
//! The data path, in pipeline order: [`receive`] → [`normalize`] → [`store`].

pub mod normalize;
