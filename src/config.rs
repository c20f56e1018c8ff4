//! Configuration: defaults, overridden by a TOML file, overridden by environment variables
//! (`TOOLSIGHT_<SECTION>__<KEY>`, and `DATABASE_URL`). Loading reports every problem at once.
//!
//! Each section is a type next to the code it configures (`[otlp]` is `receive::Otlp`,
//! `[notify]` is `notify::config::Notify`, ...), deserialized with serde, defaults in its
//! `Default`, unknown keys refused. This module holds only the layering, the mapping of
//! environment variables to keys, and the checks that span sections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::store::DEFAULT_DATABASE_URL;

/// The whole configuration. See `toolsight.example.toml` for every setting explained.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Config {
    pub database: crate::store::Database,
    pub otlp: crate::receive::Otlp,
    pub admin: crate::admin::AdminConfig,
    pub ingest: crate::store::writer::Ingest,
    pub privacy: crate::normalize::Privacy,
    pub rules: crate::evaluate::Rules,
    pub notify: crate::notify::config::Notify,
    pub auth: crate::receive::auth::AuthConfig,
    pub retention: crate::store::retention::Retention,
    pub tls: crate::tls::TlsConfig,
    pub forward: crate::forward::Forward,
    pub log: Log,
}

/// The `[log]` settings: the process's own log lines (set up by the binary).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("invalid configuration ({} problems):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Configuration errors never fix themselves.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

const ENV_PREFIX: &str = "TOOLSIGHT_";
/// The longest retention accepted (longer ones are a typo, and overflow date arithmetic).
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 86_400);

impl Config {
    /// Loads defaults, then `path` (if any), then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut layers = Layers::default();
        if let Some(path) = path {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: shown.clone(),
                error,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: shown.clone(),
                        message: e.to_string(),
                    })?;
            layers.file(table, &shown);
        }
        for (k, v) in env {
            let key = if k == "DATABASE_URL" {
                "database.url".to_owned()
            } else if let Some(rest) = k.strip_prefix(ENV_PREFIX)
                && rest.contains("__")
            {
                // Only `TOOLSIGHT_<SECTION>__<KEY>` is a setting: `TOOLSIGHT_CONFIG`,
                // `TOOLSIGHT_ADMIN_TOKEN` and variables named by `env:` secrets are not.
                rest.to_ascii_lowercase().replace("__", ".")
            } else {
                continue;
            };
            layers.env(&key, &k, &v);
        }
        let mut cfg = Config::default();
        let sections = std::mem::take(&mut layers.table);
        for (name, value) in sections {
            let l = &mut layers;
            match name.as_str() {
                "database" => cfg.database = l.section(&name, value),
                "otlp" => cfg.otlp = l.section(&name, value),
                "admin" => cfg.admin = l.section(&name, value),
                "ingest" => cfg.ingest = l.section(&name, value),
                "privacy" => cfg.privacy = l.section(&name, value),
                "rules" => cfg.rules = l.section(&name, value),
                "notify" => cfg.notify = l.section(&name, value),
                "auth" => cfg.auth = l.section(&name, value),
                "retention" => cfg.retention = l.section(&name, value),
                "tls" => cfg.tls = l.section(&name, value),
                "forward" => cfg.forward = l.section(&name, value),
                "log" => cfg.log = l.section(&name, value),
                _ => l.unknown(&name, &value),
            }
        }
        let mut problems = layers.problems;
        cfg.validate(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate(&self, p: &mut Vec<String>) {
        if let Err(e) = crate::store::connect_options(&self.database.url) {
            p.push(format!("database.url: {e}"));
        }
        if self.database.query_connections == 0 {
            p.push("database.query_connections: must be at least 1".into());
        }
        if !(1..=64).contains(&self.ingest.writers) {
            p.push(format!(
                "ingest.writers: {} is outside 1..=64",
                self.ingest.writers
            ));
        }
        if self.ingest.batch_rows == 0 {
            p.push("ingest.batch_rows: must be at least 1".into());
        }
        if self.ingest.queue_rows < self.ingest.batch_rows {
            p.push(format!(
                "ingest.queue_rows: {} is smaller than ingest.batch_rows ({})",
                self.ingest.queue_rows, self.ingest.batch_rows
            ));
        }
        if self.otlp.decode_budget_bytes < 1 << 20 {
            p.push("otlp.decode_budget_bytes: must be at least 1 MiB (1048576)".into());
        }
        if self.otlp.max_connections == 0 {
            p.push("otlp.max_connections: must be at least 1".into());
        }
        if self.otlp.idle_timeout.is_zero() {
            p.push("otlp.idle_timeout: must be more than 0s".into());
        }
        if self.otlp.body_timeout.is_zero() {
            p.push("otlp.body_timeout: must be more than 0s".into());
        }
        if self.otlp.max_concurrent_exports == 0 {
            p.push("otlp.max_concurrent_exports: must be at least 1".into());
        }
        if self.otlp.max_request_bytes == 0 {
            p.push("otlp.max_request_bytes: must be at least 1".into());
        }
        if self.otlp.max_decompressed_bytes < self.otlp.max_request_bytes {
            p.push("otlp.max_decompressed_bytes: must be at least otlp.max_request_bytes".into());
        }
        let addrs = [
            ("otlp.grpc_listen", self.otlp.grpc_listen),
            ("otlp.http_listen", self.otlp.http_listen),
            ("admin.listen", self.admin.listen),
        ];
        for (i, (a, x)) in addrs.iter().enumerate() {
            for (b, y) in &addrs[i + 1..] {
                if x == y && x.port() != 0 {
                    p.push(format!("{a} and {b}: both listen on {x}"));
                }
            }
        }
        for (i, pat) in self.privacy.redact_patterns.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pat) {
                p.push(format!("privacy.redact_patterns[{i}]: {e}"));
            }
        }
        self.notify.validate(p);
        self.forward.validate(p);
        self.validate_auth(p);
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), Some(_)) => {
                if let Some(files) = self.tls.files()
                    && let Err(e) = files.server_config(true)
                {
                    p.push(format!("tls: {e}"));
                }
            }
            (None, None) => {
                if self.tls.client_ca_file.is_some() {
                    p.push("tls.client_ca_file needs tls.cert_file and tls.key_file".into());
                }
            }
            _ => p.push("tls.cert_file and tls.key_file go together".into()),
        }
        for (key, d) in [
            ("retention.raw", self.retention.raw),
            ("retention.sampled_out", self.retention.sampled_out),
            ("retention.rollups", self.retention.rollups),
            ("retention.notifications", self.retention.notifications),
            ("retention.own_metrics", self.retention.own_metrics),
            ("retention.every", self.retention.every),
        ] {
            if d > MAX_RETENTION {
                p.push(format!(
                    "{key}: {} is longer than the 100 years a retention may be",
                    humantime::format_duration(d)
                ));
            }
        }
        self.ingest.raw_policy().validate(p);
        if self.retention.sampled_out > self.retention.raw {
            p.push("retention.sampled_out: must be at most retention.raw".into());
        }
        if self.retention.batch_rows < 1 {
            p.push("retention.batch_rows: must be at least 1".into());
        }
        if self.retention.rollups < self.retention.raw {
            p.push("retention.rollups: must be at least retention.raw (rollups are built from raw rows)".into());
        }
        if self.retention.raw < self.ingest.max_span_age {
            p.push(format!(
                "retention.raw ({}) is shorter than ingest.max_span_age ({}): accepted spans would be pruned at once",
                humantime::format_duration(self.retention.raw),
                humantime::format_duration(self.ingest.max_span_age)
            ));
        }
        let span = self.retention.partition.as_secs();
        if span < 3600 || !span.is_multiple_of(3600) || !86_400u64.is_multiple_of(span) {
            p.push(format!(
                "retention.partition ({}): must be whole hours that divide a day (1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d)",
                humantime::format_duration(self.retention.partition)
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level: {e}"));
        }
    }

    /// The listeners bound to something other than loopback.
    pub fn exposed_listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("otlp.grpc_listen", self.otlp.grpc_listen),
            ("otlp.http_listen", self.otlp.http_listen),
            ("admin.listen", self.admin.listen),
        ]
        .into_iter()
        .filter(|(_, a)| !a.ip().is_loopback())
        .collect()
    }

    /// The listeners on a non-loopback address without the token they need, each with the
    /// setting that would close it.
    pub fn open_listeners(&self) -> Vec<(&'static str, SocketAddr, &'static str)> {
        let a = &self.auth;
        self.exposed_listeners()
            .into_iter()
            .filter_map(|(key, addr)| {
                if key == "admin.listen" {
                    a.admin_token
                        .is_none()
                        .then_some((key, addr, "auth.admin_token"))
                } else {
                    (!a.ingest_required()).then_some((key, addr, "auth.tokens or auth.tokens_file"))
                }
            })
            .collect()
    }

    /// What serving needs beyond a valid configuration: no listener reachable from the network
    /// without the token it needs. Only `serve`, `demo` and `config` ask; the commands that
    /// listen on nothing (`rules`, `silence`, `migrate`, …) run with a configuration made for
    /// a container.
    pub fn check_servable(&self) -> Result<(), ConfigError> {
        if self.auth.allow_unauthenticated {
            return Ok(());
        }
        let problems: Vec<String> = self
            .open_listeners()
            .into_iter()
            .map(|(key, addr, needs)| {
                format!(
                    "{key}: {addr} is not a loopback address, so it needs {needs} (or auth.allow_unauthenticated = true to run it open)"
                )
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate_auth(&self, p: &mut Vec<String>) {
        let a = &self.auth;
        p.extend(crate::receive::auth::check_tokens(
            &a.tokens,
            "auth.tokens",
            a.admin_token.as_ref(),
        ));
        if let Some(admin) = &a.admin_token
            && admin.expose().chars().count() < crate::receive::auth::MIN_TOKEN_CHARS
        {
            p.push(format!(
                "auth.admin_token: must be at least {} characters",
                crate::receive::auth::MIN_TOKEN_CHARS
            ));
        }
        if let Some(f) = &a.tokens_file
            && let Err(e) =
                crate::receive::auth::Auth::new(Vec::new(), Some(f.clone()), a.admin_token.clone())
        {
            p.push(format!("auth.tokens_file: {e}"));
        }
    }

    /// The cardinality guard's bounds.
    pub fn cardinality(&self) -> crate::normalize::cardinality::Limits {
        crate::normalize::cardinality::Limits {
            max_services: self.ingest.max_services.max(1),
            max_keys_per_service: self.ingest.max_keys_per_service.max(1),
            max_sessions_per_hour: self.ingest.max_sessions_per_hour.max(1),
            max_trace_sessions_per_hour: self.ingest.max_trace_sessions_per_hour.max(1),
        }
    }

    /// The normalizer's settings derived from this configuration.
    pub fn normalize_options(&self) -> crate::normalize::Options {
        crate::normalize::Options {
            max_age_nanos: self.ingest.max_span_age.as_nanos().min(i64::MAX as u128) as i64,
            max_future_nanos: self.ingest.max_clock_skew.as_nanos().min(i64::MAX as u128) as i64,
            redactor: self
                .privacy
                .store_redacted_content
                .then(|| crate::normalize::Redactor {
                    keys: self
                        .privacy
                        .redact_keys
                        .iter()
                        .map(|k| k.to_ascii_lowercase())
                        .collect(),
                    // Validated above.
                    patterns: self
                        .privacy
                        .redact_patterns
                        .iter()
                        .filter_map(|p| regex::Regex::new(p).ok())
                        .collect(),
                    max_bytes: self.privacy.max_redacted_bytes,
                }),
        }
    }

    /// The effective configuration as TOML, with the database password hidden.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = crate::store::url_without_password(&shown.database.url);
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// The file and the environment merged into one table of sections, with where each key came
/// from (for messages) and the problems found so far.
#[derive(Default)]
struct Layers {
    table: toml::Table,
    /// `section.key` → "path/to/file.toml" or "env TOOLSIGHT_SECTION__KEY".
    origin: BTreeMap<String, String>,
    /// `section.key` → the raw text of an environment value that was read as TOML (a number, a
    /// boolean, an array): used as a plain string instead when the setting takes a string.
    raw_env: BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Layers {
    fn file(&mut self, table: toml::Table, shown: &str) {
        for (section, value) in table {
            match &value {
                toml::Value::Table(t) => {
                    for key in t.keys() {
                        self.origin
                            .insert(format!("{section}.{key}"), shown.to_owned());
                    }
                }
                _ => {
                    self.origin.insert(section.clone(), shown.to_owned());
                }
            }
            self.table.insert(section, value);
        }
    }

    fn env(&mut self, key: &str, var: &str, raw: &str) {
        let value = env_value(raw);
        if !value.is_str() {
            self.raw_env.insert(key.to_owned(), raw.to_owned());
        }
        self.origin.insert(key.to_owned(), format!("env {var}"));
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut table = &mut self.table;
        for part in parts {
            let entry = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                self.problems
                    .push(format!("{key} (from env {var}): {part} is not a table"));
                return;
            };
            table = inner;
        }
        table.insert(last.to_owned(), value);
    }

    fn from(&self, key: &str) -> String {
        self.origin
            .get(key)
            .map(|o| format!(" (from {o})"))
            .unwrap_or_default()
    }

    /// The section `name`, each problem in it listed; a key that cannot be read keeps its
    /// default.
    fn section<T: DeserializeOwned + Default>(&mut self, name: &str, value: toml::Value) -> T {
        let toml::Value::Table(mut table) = value else {
            self.problems.push(format!(
                "{name}{}: must be a table ([{name}])",
                self.from(name)
            ));
            return T::default();
        };
        let mut first = BTreeMap::new();
        // Each round either succeeds, or takes one key out, or turns one environment value
        // into its text (once): it ends.
        loop {
            let error = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(section) => return section,
                Err(e) => e,
            };
            let message = error.inner().to_string();
            let message = message.lines().next().unwrap_or_default().trim();
            let Some(serde_path_to_error::Segment::Map { key: field }) = error.path().iter().next()
            else {
                self.problems.push(format!("{name}: {message}"));
                return T::default();
            };
            let key = format!("{name}.{field}");
            if let Some(raw) = self.raw_env.remove(&key) {
                // Read as its own text; should that fail too, the first reading's problem is
                // the one to show.
                first.insert(key, (error.path().to_string(), message.to_owned()));
                table.insert(field.clone(), toml::Value::String(raw));
                continue;
            }
            let (at, message) = first
                .remove(&key)
                .unwrap_or_else(|| (error.path().to_string(), message.to_owned()));
            let hint = if message.contains("expected a duration") {
                r#"; use e.g. "30s", "15m", "7d""#
            } else {
                ""
            };
            self.problems
                .push(format!("{name}.{at}{}: {message}{hint}", self.from(&key)));
            table.remove(field);
        }
    }

    fn unknown(&mut self, name: &str, value: &toml::Value) {
        match value {
            toml::Value::Table(t) => {
                for key in t.keys() {
                    let key = format!("{name}.{key}");
                    let from = self.from(&key);
                    self.problems.push(format!("{key}{from}: unknown setting"));
                }
            }
            _ => {
                let from = self.from(name);
                self.problems.push(format!("{name}{from}: unknown setting"));
            }
        }
    }
}

/// An env value is TOML when it parses as such (`["a", "b"]`, `4`, `true`), else a string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.database.url, DEFAULT_DATABASE_URL);
        assert_eq!(c.otlp.grpc_listen.port(), 4317);
        assert_eq!(c.otlp.http_listen.port(), 4318);
        assert!(!c.privacy.store_redacted_content);
        assert!(c.normalize_options().redactor.is_none());
    }

    #[test]
    fn only_section_key_variables_are_settings() {
        // The admin token the `silence` client reads, the benchmark's server, and the
        // variables `env:` secrets name share the prefix without being settings.
        let c = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_ADMIN_TOKEN", "secret-for-the-client-0123"),
                ("TOOLSIGHT_BENCH_SERVER", "target/release/toolsight"),
                ("TOOLSIGHT_TOKEN_BILLING", "billing-token-0123456789"),
                ("TOOLSIGHT_CONFIG", "/etc/toolsight/toolsight.toml"),
                ("TOOLSIGHT_INGEST__WRITERS", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ingest.writers, 5);
        assert!(c.auth.admin_token.is_none());
        let err = Config::load_from(None, env(&[("TOOLSIGHT_ADMIN__TOKEN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TOOLSIGHT_ADMIN__TOKEN") && err.contains("unknown"),
            "{err}"
        );
    }

    #[test]
    fn file_then_env_override() {
        let dir = std::env::temp_dir().join(format!("toolsight-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(
            &path,
            "[ingest]\nwriters = 3\nbatch_rows = 500\n[otlp]\nhttp_listen = \"0.0.0.0:14318\"\n[auth]\nallow_unauthenticated = true\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&path),
            env(&[
                ("TOOLSIGHT_INGEST__WRITERS", "4"),
                ("DATABASE_URL", "postgres://u:pw@db/x"),
                ("TOOLSIGHT_INGEST__MAX_SPAN_AGE", "2d"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ingest.writers, 4);
        assert_eq!(c.ingest.batch_rows, 500);
        assert_eq!(c.otlp.http_listen.port(), 14318);
        assert_eq!(c.database.url, "postgres://u:pw@db/x");
        assert_eq!(c.ingest.max_span_age, Duration::from_secs(2 * 86400));
        assert!(c.to_toml().contains("postgres://u:***@db/x"));
    }

    #[test]
    fn token_file_entries_follow_the_inline_token_rules() {
        let dir = std::env::temp_dir().join(format!("toolsight-cfg-tf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = dir.join("tokens.toml");
        std::fs::write(
            &tokens,
            "[[tokens]]\nname = \"short\"\ntoken = \"abc\"\n[[tokens]]\nname = \"admin\"\ntoken = \"same-token-0123456789\"\n",
        )
        .unwrap();
        let err = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318"),
                ("TOOLSIGHT_AUTH__TOKENS_FILE", tokens.to_str().unwrap()),
                ("TOOLSIGHT_AUTH__ADMIN_TOKEN", "same-token-0123456789"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("(short): tokens must be at least 16 characters"),
            "{err}"
        );
        assert!(
            err.contains("(admin): must differ from auth.admin_token"),
            "{err}"
        );
    }

    #[test]
    fn retentions_beyond_the_calendar_are_refused() {
        let err = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_RETENTION__ROLLUPS", "300000years"),
                ("TOOLSIGHT_RETENTION__NOTIFICATIONS", "200years"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("retention.rollups"), "{err}");
        assert!(err.contains("retention.notifications"), "{err}");
        assert!(!err.contains("retention.raw"), "{err}");
    }

    #[test]
    fn every_problem_is_listed() {
        let err = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_INGEST__WRITERS", "many"),
                ("TOOLSIGHT_OTLP__GRPC_LISTEN", "not-an-address"),
                ("TOOLSIGHT_INGEST__MAX_CLOCK_SKEW", "soon"),
                ("TOOLSIGHT_PRIVACY__REDACT_PATTERNS", "[\"(unclosed\"]"),
                ("TOOLSIGHT_NOPE__THING", "1"),
                ("TOOLSIGHT_INGEST__QUEUE_ROWS", "10"),
            ]),
        )
        .unwrap_err();
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        let text = err.to_string();
        for needle in [
            "ingest.writers",
            "otlp.grpc_listen",
            "ingest.max_clock_skew",
            "privacy.redact_patterns[0]",
            "nope.thing",
            "ingest.queue_rows",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(problems.len(), 6, "{text}");
    }

    /// Each section refuses keys it does not have, and says where each problem came from.
    #[test]
    fn unknown_keys_and_bad_values_are_named_with_their_origin() {
        let dir =
            std::env::temp_dir().join(format!("toolsight-cfg-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("typo.toml");
        std::fs::write(
            &path,
            "[otlp]\ngrpc_listn = \"0.0.0.0:4317\"\n[retention]\nraw = \"1 fortnight\"\n\
             [notify]\nreceivers = [{ name = \"a\", type = \"pager\" }]\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&path), env(&[("TOOLSIGHT_INGEST__BATCH_ROWS", "-1")]))
            .unwrap_err();
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        let shown = path.display();
        let want = [
            "ingest.batch_rows (from env TOOLSIGHT_INGEST__BATCH_ROWS): invalid value: integer `-1`, expected usize".to_owned(),
            format!(
                "notify.receivers[0].type (from {shown}): unknown variant `pager`, expected one of `webhook`, `email`, `alertmanager`"
            ),
            format!("otlp.grpc_listn (from {shown}): unknown field `grpc_listn`, expected one of"),
            format!(
                "retention.raw (from {shown}): invalid value: string \"1 fortnight\", expected a duration; use e.g."
            ),
        ];
        for (problem, want) in problems.iter().zip(&want) {
            assert!(problem.starts_with(want.as_str()), "{problem}\nwant {want}");
        }
        assert_eq!(problems.len(), want.len(), "{err}");
    }

    /// An environment value that reads as a number is still a string where the setting is one.
    #[test]
    fn an_env_value_is_taken_as_the_type_the_setting_has() {
        let c = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_AUTH__ADMIN_TOKEN", "12345678901234567890"),
                ("TOOLSIGHT_LOG__LEVEL", "true"),
                ("TOOLSIGHT_INGEST__WRITERS", "3"),
                ("TOOLSIGHT_RULES__ENABLED", "false"),
                ("TOOLSIGHT_PRIVACY__REDACT_KEYS", "[\"pin\"]"),
            ]),
        )
        .unwrap();
        // A filter that enables a target named "true": odd, but a string.
        assert_eq!(c.log.level, "true");
        assert_eq!(
            c.auth.admin_token.as_ref().map(|t| t.expose()),
            Some("12345678901234567890")
        );
        assert_eq!(c.ingest.writers, 3);
        assert!(!c.rules.enabled);
        assert_eq!(c.privacy.redact_keys, ["pin"]);
    }
}

#[cfg(test)]
mod notify_tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("toolsight-cfg-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        Config::load_from(Some(&path), Vec::new())
    }

    #[test]
    fn receivers_routes_and_secrets_from_env_and_files() {
        let dir = std::env::temp_dir().join(format!("toolsight-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("hmac.key");
        std::fs::write(&key, "k3y-from-file\n").unwrap();
        let c = load(&format!(
            "[notify]\nreceiver = \"ops\"\ngroup_wait = \"10s\"\n\
             [[notify.receivers]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"https://hooks.example.com/T0/B0/XSECRETX\"\nhmac_secret = \"file:{}\"\n\
             [[notify.receivers]]\nname = \"mail\"\ntype = \"email\"\nsmarthost = \"smtp.example.com:587\"\nfrom = \"a@example.com\"\nto = [\"b@example.com\"]\n\
             [[notify.routes]]\nreceiver = \"mail\"\nmatchers = [\"severity=~crit.*\"]\nrepeat_interval = \"1h\"\n",
            key.display()
        ))
        .unwrap();
        assert_eq!(c.notify.group_wait, Duration::from_secs(10));
        assert_eq!(c.notify.receivers.len(), 2);
        let crate::notify::config::ReceiverConfig::Webhook(hook) = &c.notify.receivers[0] else {
            panic!("{:?}", c.notify.receivers[0])
        };
        assert_eq!(hook.hmac_secret.as_ref().unwrap().expose(), "k3y-from-file");
        assert_eq!(
            c.notify.routes[0].repeat_interval,
            Some(Duration::from_secs(3600))
        );
        // Printed configuration and debug output never show secrets.
        let shown = c.to_toml();
        assert!(
            !shown.contains("XSECRETX") && !shown.contains("k3y-from-file"),
            "{shown}"
        );
        assert!(!format!("{c:?}").contains("XSECRETX"));
    }

    /// A receiver takes the fields of its type only: an Alertmanager's `urls` on a webhook is a
    /// mistake worth naming, not a setting to ignore.
    #[test]
    fn a_receiver_refuses_the_fields_of_another_type() {
        let err = load(
            "[[notify.receivers]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nurls = [\"http://127.0.0.1:9093\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("notify.receivers[0] (from ") && err.contains("unknown field `urls`"),
            "{err}"
        );
        let ok = load(
            "[[notify.receivers]]\nname = \"am\"\ntype = \"alertmanager\"\nurls = [\"http://127.0.0.1:9093\"]\nresend_every = \"2m\"\n",
        )
        .unwrap();
        let crate::notify::config::ReceiverConfig::Alertmanager(am) = &ok.notify.receivers[0]
        else {
            panic!("{:?}", ok.notify.receivers)
        };
        assert_eq!(am.resend_every(), Duration::from_secs(120));
    }

    #[test]
    fn notify_problems_are_listed() {
        let err = load(
            "[notify]\nreceiver = \"nobody\"\n\
             [[notify.receivers]]\nname = \"m\"\ntype = \"email\"\nto = [\"not an address\"]\n\
             [[notify.receivers]]\nname = \"w\"\ntype = \"webhook\"\nhmac_secret = \"env:TOOLSIGHT_TEST_UNSET_SECRET\"\n\
             [[notify.routes]]\nreceiver = \"ghost\"\nmatchers = [\"tool=~(\"]\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "TOOLSIGHT_TEST_UNSET_SECRET is not set",
            "notify.receiver: no receiver is named \"nobody\"",
            "notify.routes[0]: no receiver is named \"ghost\"",
            "matcher \"tool=~(\"",
        ] {
            assert!(err.contains(needle), "{needle} in {err}");
        }
        // The serde error about the secret stops that receiver list; fix it and the rest shows.
        let err = load(
            "[[notify.receivers]]\nname = \"m\"\ntype = \"email\"\nto = [\"not an address\"]\n\
             [[notify.receivers]]\nname = \"w\"\ntype = \"webhook\"\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "email needs `smarthost`",
            "email needs `from`",
            "\"not an address\" is not an email address",
            "webhook needs `url`",
        ] {
            assert!(err.contains(needle), "{needle} in {err}");
        }
    }
}

#[cfg(test)]
mod auth_tests {
    use super::tests::env;
    use super::*;

    #[test]
    fn exposed_listeners_need_tokens_unless_explicitly_open() {
        let exposed = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318"),
                ("TOOLSIGHT_ADMIN__LISTEN", "10.0.0.5:9464"),
            ]),
        )
        .expect("a configuration for a container loads: only serving it needs tokens");
        let err = exposed.check_servable().unwrap_err().to_string();
        assert!(
            err.contains(
                "otlp.http_listen: 0.0.0.0:4318 is not a loopback address, so it needs auth.tokens"
            ),
            "{err}"
        );
        assert!(err.contains("admin.listen: 10.0.0.5:9464 is not a loopback address, so it needs auth.admin_token"), "{err}");
        assert!(
            !err.contains("otlp.grpc_listen"),
            "loopback by default: {err}"
        );

        let open = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318"),
                ("TOOLSIGHT_AUTH__ALLOW_UNAUTHENTICATED", "true"),
            ]),
        );
        assert!(open.unwrap().check_servable().is_ok());

        let dir = std::env::temp_dir().join(format!("toolsight-cfg-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        std::fs::write(
            &path,
            "[otlp]\nhttp_listen = \"0.0.0.0:4318\"\n[auth]\nadmin_token = \"same-token-0123456789\"\ntokens = [{ name = \"a\", token = \"same-token-0123456789\", services = [\"svc\"] }, { name = \"b\", token = \"short\" }]\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.tokens[0] (a): must differ from auth.admin_token"),
            "{err}"
        );
        assert!(
            err.contains("auth.tokens[1] (b): tokens must be at least 16 characters"),
            "{err}"
        );
        let ok = std::fs::write(
            &path,
            "[otlp]\nhttp_listen = \"0.0.0.0:4318\"\n[auth]\ntokens = [{ name = \"a\", token = \"a-token-0123456789\" }]\n",
        );
        ok.unwrap();
        let c = Config::load_from(Some(&path), Vec::new()).unwrap();
        assert!(c.auth.ingest_required());
        assert!(
            !c.to_toml().contains("a-token-0123456789"),
            "tokens are never printed"
        );
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// `toolsight.example.toml` holds the defaults, and shows every key of every section (set,
    /// or commented out where the default is "none").
    #[test]
    fn the_example_file_shows_the_defaults_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("toolsight.example.toml");
        let loaded = Config::load_from(Some(&path), Vec::new()).unwrap();
        assert_eq!(loaded.to_toml(), Config::default().to_toml());

        let text = std::fs::read_to_string(&path).unwrap();
        let mut documented: std::collections::BTreeSet<String> = Default::default();
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            // An array of tables, shown by example entries: `[[notify.receivers]]`.
            if let Some(h) = line.strip_prefix("[[").and_then(|l| l.split_once("]]")) {
                documented.insert(h.0.to_owned());
                continue;
            }
            if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = h.to_owned();
                continue;
            }
            if let Some((key, _)) = line.split_once(" = ") {
                documented.insert(format!("{section}.{key}"));
            }
        }
        let defaults: toml::Table = Config::default().to_toml().parse().unwrap();
        let mut missing = Vec::new();
        for (section, v) in &defaults {
            let Some(t) = v.as_table() else { continue };
            for key in t.keys() {
                let k = format!("{section}.{key}");
                if !documented.contains(&k) {
                    missing.push(k);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in toolsight.example.toml: {missing:?}"
        );
    }
}
