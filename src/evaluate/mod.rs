//! Alert rules: the rule files (`rules`) and the pure alert state machine (`state`).
//!
//! The state machine takes `now` and the signal a rule produced; it does no I/O, so the live
//! evaluation loop, rule unit tests and backtests all run the same code.

#[cfg(feature = "backtest")]
pub mod backtest;
pub mod engine;
pub mod observe;
pub mod quality;
pub mod rules;
pub mod run;
pub mod state;
pub mod unittest;
