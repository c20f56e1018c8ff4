//! Alert rules: the rule files (`rules`), what a rule sees at an instant (`observe`), the pure
//! engine from observations to signals (`engine`) and the pure state machine (`state`), the live
//! evaluator (`run`), rule unit tests (`unittest`), backtests over the stored history
//! (`backtest`) and the false-firing estimate on simulated traffic (`quality`).
//!
//! The engine and state machine take `now` and do no I/O, so the live evaluation loop, rule unit
//! tests and backtests all run the same code.

#[cfg(feature = "backtest")]
pub mod backtest;
pub mod engine;
pub mod observe;
pub mod quality;
pub mod rules;
pub mod run;
pub mod state;
pub mod unittest;
