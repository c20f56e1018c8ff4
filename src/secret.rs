//! Secrets in the configuration: a literal, `env:NAME` or `file:/path`, resolved when the
//! configuration loads and never shown (debug output and `toolsight config` print `<redacted>`).
//! Used by ingest tokens, the admin token and the notification receivers.

use serde::{Deserialize, Serialize};

/// A secret given as a literal, `env:NAME` or `file:/path`; resolved when the configuration
/// loads and never shown (debug output and `toolsight config` print `<redacted>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(d)?;
        resolve_secret(&spec).map_err(serde::de::Error::custom)
    }
}

fn resolve_secret(spec: &str) -> Result<Secret, String> {
    if let Some(name) = spec.strip_prefix("env:") {
        return std::env::var(name)
            .map(Secret)
            .map_err(|_| format!("environment variable {name} is not set"));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| format!("cannot read secret file {path}: {e}"));
    }
    Ok(Secret(spec.to_owned()))
}
