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
pub(crate) mod observe;
pub mod quality;
pub mod rules;
pub mod run;
pub mod state;
pub mod unittest;

/// The `[rules]` settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// Evaluate alert rules in this process (one replica leads; the others stand by).
    pub enabled: bool,
    /// Rule files; empty means the built-in `alerts/default.yaml`.
    pub files: Vec<std::path::PathBuf>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            enabled: true,
            files: Vec::new(),
        }
    }
}
