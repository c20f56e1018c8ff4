//! Configuration: defaults, overridden by a TOML file, overridden by environment variables
//! (`TOOLSIGHT_<SECTION>__<KEY>`, and `DATABASE_URL`). Loading reports every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The whole configuration. See `toolsight.example.toml` for every setting explained.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub database: Database,
    pub otlp: Otlp,
    pub admin: Admin,
    pub ingest: Ingest,
    pub privacy: Privacy,
    pub rules: Rules,
    pub notify: crate::notify::config::Notify,
    pub auth: Auth,
    pub retention: Retention,
    pub tls: Tls,
    pub log: Log,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Tls {
    /// PEM certificate chain and private key: set both to serve TLS on every listener.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// PEM CA certificates: OTLP clients must present a certificate signed by one of them.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// Serve the admin listener without TLS (e.g. for a local metrics scraper).
    pub plain_admin: bool,
}

impl Tls {
    pub fn files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            client_ca: self.client_ca_file.clone(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Retention {
    /// Raw rows (tool calls, MCP requests, LLM and upstream calls).
    #[serde(with = "humantime_serde_compat")]
    pub raw: Duration,
    /// Per-minute rollups and alert events.
    #[serde(with = "humantime_serde_compat")]
    pub rollups: Duration,
    /// Delivered and failed notifications.
    #[serde(with = "humantime_serde_compat")]
    pub notifications: Duration,
    /// The service's own metric samples (`collector_metrics`).
    #[serde(with = "humantime_serde_compat")]
    pub own_metrics: Duration,
    /// How often the service prunes (0: never; `toolsight prune` still works).
    #[serde(with = "humantime_serde_compat")]
    pub every: Duration,
    /// Rows per DELETE statement.
    pub batch_rows: i64,
}

impl Retention {
    pub fn policy(&self) -> crate::store::retention::Policy {
        crate::store::retention::Policy {
            raw: self.raw,
            rollups: self.rollups,
            notifications: self.notifications,
            own_metrics: self.own_metrics,
            batch_rows: self.batch_rows,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Auth {
    /// Ingest bearer tokens, each scoped to service names.
    pub tokens: Vec<crate::receive::auth::TokenConfig>,
    /// A TOML file of `[[tokens]]`, re-read when it changes.
    pub tokens_file: Option<std::path::PathBuf>,
    /// Run without ingest or admin tokens on a non-loopback address (logged at start).
    pub allow_unauthenticated: bool,
    /// The admin API's own token (never one of the ingest tokens).
    pub admin_token: Option<crate::secret::Secret>,
}

impl Auth {
    /// Whether ingest needs a token.
    pub fn ingest_required(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rules {
    /// Evaluate alert rules in this process (one replica leads; the others stand by).
    pub enabled: bool,
    /// Rule files; empty means the built-in `alerts/default.yaml`.
    pub files: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub url: String,
    pub create_database: bool,
    pub query_connections: u32,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// When `toolsight serve` runs a private PostgreSQL cluster of its own.
    pub embedded: Embedded,
    /// Where that cluster lives; `None` is the default place (`store::cluster::default_dir`).
    pub embedded_dir: Option<std::path::PathBuf>,
}

/// When `toolsight serve` starts a private PostgreSQL cluster (from the system's PostgreSQL
/// binaries) instead of connecting to `database.url`. An explicit `database.url` is never
/// replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedded {
    /// When `database.url` is left at its default and nothing answers there.
    Auto,
    /// Whenever `database.url` is left at its default.
    Always,
    Never,
}

#[derive(Debug, Clone, Serialize)]
pub struct Otlp {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub max_request_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_concurrent_exports: usize,
    /// Time an OTLP/HTTP client has to send a whole request body once its headers are in.
    #[serde(with = "humantime_serde_compat")]
    pub body_timeout: Duration,
    /// On shutdown, how long exports in progress may take before their connections are cut.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
    /// Estimated decoded memory of all exports in progress, at most; one export may take half.
    pub decode_budget_bytes: usize,
    /// Connections open at most on each OTLP port; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// A connection with no byte either way and no export in progress for this long is closed
    /// (also bounds an HTTP/1.1 client's time to send its headers, and a TLS handshake).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    pub listen: SocketAddr,
    /// How often this service's own metrics are written to PostgreSQL (for the collector
    /// health dashboard); 0 turns it off.
    #[serde(with = "humantime_serde_compat")]
    pub record_metrics_every: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ingest {
    pub writers: usize,
    pub batch_rows: usize,
    pub queue_rows: usize,
    #[serde(with = "humantime_serde_compat")]
    pub max_span_age: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub max_clock_skew: Duration,
    /// Cardinality guard: distinct services, and tools (methods, models, upstreams) per
    /// service, beyond which new keys fold into `__overflow__`.
    pub max_services: usize,
    pub max_keys_per_service: usize,
    /// Distinct session keys per hour, across services.
    pub max_sessions_per_hour: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Privacy {
    pub store_redacted_content: bool,
    pub redact_keys: Vec<String>,
    pub redact_patterns: Vec<String>,
    pub max_redacted_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/toolsight";

/// Key names whose values are replaced in stored copies (case-insensitive substrings).
pub const DEFAULT_REDACT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "ssn",
];

/// Patterns replaced inside stored string values: email addresses, bearer tokens, common API
/// key shapes, card-like digit runs.
pub const DEFAULT_REDACT_PATTERNS: &[&str] = &[
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+",
    r"\b(?:sk|pk|rk|ghp|gho|ghs|xox[abprs])[-_][A-Za-z0-9_-]{10,}",
    r"\b(?:\d[ -]?){13,19}\b",
];

impl Default for Config {
    fn default() -> Self {
        Config {
            database: Database {
                url: DEFAULT_DATABASE_URL.into(),
                create_database: true,
                query_connections: 4,
                connect_timeout: Duration::from_secs(30),
                embedded: Embedded::Auto,
                embedded_dir: None,
            },
            otlp: Otlp {
                grpc_listen: "127.0.0.1:4317".parse().expect("valid default"),
                http_listen: "127.0.0.1:4318".parse().expect("valid default"),
                max_request_bytes: 16 << 20,
                max_decompressed_bytes: 64 << 20,
                max_concurrent_exports: 64,
                body_timeout: Duration::from_secs(15),
                drain_timeout: Duration::from_secs(20),
                decode_budget_bytes: 512 << 20,
                max_connections: 4096,
                idle_timeout: Duration::from_secs(60),
            },
            admin: Admin {
                listen: "127.0.0.1:9464".parse().expect("valid default"),
                record_metrics_every: Duration::from_secs(15),
            },
            ingest: Ingest {
                writers: 2,
                batch_rows: 10_000,
                queue_rows: 100_000,
                max_span_age: Duration::from_secs(7 * 24 * 3600),
                max_clock_skew: Duration::from_secs(3600),
                max_services: 1000,
                max_keys_per_service: 500,
                max_sessions_per_hour: 200_000,
            },
            privacy: Privacy {
                store_redacted_content: false,
                redact_keys: DEFAULT_REDACT_KEYS.iter().map(|s| s.to_string()).collect(),
                redact_patterns: DEFAULT_REDACT_PATTERNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                max_redacted_bytes: 2048,
            },
            rules: Rules {
                enabled: true,
                files: Vec::new(),
            },
            notify: Default::default(),
            auth: Auth::default(),
            tls: Tls::default(),
            retention: Retention {
                raw: Duration::from_secs(7 * 86_400),
                rollups: Duration::from_secs(90 * 86_400),
                notifications: Duration::from_secs(30 * 86_400),
                own_metrics: Duration::from_secs(30 * 86_400),
                every: Duration::from_secs(3600),
                batch_rows: 10_000,
            },
            log: Log {
                level: "info".into(),
                format: LogFormat::Text,
            },
        }
    }
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
        let mut values: BTreeMap<String, (toml::Value, String)> = BTreeMap::new();
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
            flatten("", toml::Value::Table(table), &shown, &mut values);
        }
        for (k, v) in env {
            if k == "DATABASE_URL" {
                values.insert(
                    "database.url".into(),
                    (toml::Value::String(v), "env DATABASE_URL".into()),
                );
            } else if let Some(rest) = k.strip_prefix(ENV_PREFIX) {
                if rest == "CONFIG" {
                    continue;
                }
                let key = rest.to_ascii_lowercase().replace("__", ".");
                values.insert(key, (env_value(&v), format!("env {k}")));
            }
        }
        let mut l = Loader {
            values,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let d = Config::default();
        let cfg = Config {
            database: Database {
                url: l.get("database.url", d.database.url),
                create_database: l.get("database.create_database", d.database.create_database),
                query_connections: l
                    .get("database.query_connections", d.database.query_connections),
                connect_timeout: l.duration("database.connect_timeout", d.database.connect_timeout),
                embedded: l.get("database.embedded", d.database.embedded),
                embedded_dir: l.get("database.embedded_dir", d.database.embedded_dir),
            },
            otlp: Otlp {
                grpc_listen: l.get("otlp.grpc_listen", d.otlp.grpc_listen),
                http_listen: l.get("otlp.http_listen", d.otlp.http_listen),
                max_request_bytes: l.get("otlp.max_request_bytes", d.otlp.max_request_bytes),
                max_decompressed_bytes: l
                    .get("otlp.max_decompressed_bytes", d.otlp.max_decompressed_bytes),
                max_concurrent_exports: l
                    .get("otlp.max_concurrent_exports", d.otlp.max_concurrent_exports),
                body_timeout: l.duration("otlp.body_timeout", d.otlp.body_timeout),
                drain_timeout: l.duration("otlp.drain_timeout", d.otlp.drain_timeout),
                decode_budget_bytes: l.get("otlp.decode_budget_bytes", d.otlp.decode_budget_bytes),
                max_connections: l.get("otlp.max_connections", d.otlp.max_connections),
                idle_timeout: l.duration("otlp.idle_timeout", d.otlp.idle_timeout),
            },
            admin: Admin {
                listen: l.get("admin.listen", d.admin.listen),
                record_metrics_every: l
                    .duration("admin.record_metrics_every", d.admin.record_metrics_every),
            },
            ingest: Ingest {
                writers: l.get("ingest.writers", d.ingest.writers),
                batch_rows: l.get("ingest.batch_rows", d.ingest.batch_rows),
                queue_rows: l.get("ingest.queue_rows", d.ingest.queue_rows),
                max_span_age: l.duration("ingest.max_span_age", d.ingest.max_span_age),
                max_clock_skew: l.duration("ingest.max_clock_skew", d.ingest.max_clock_skew),
                max_services: l.get("ingest.max_services", d.ingest.max_services),
                max_keys_per_service: l
                    .get("ingest.max_keys_per_service", d.ingest.max_keys_per_service),
                max_sessions_per_hour: l.get(
                    "ingest.max_sessions_per_hour",
                    d.ingest.max_sessions_per_hour,
                ),
            },
            privacy: Privacy {
                store_redacted_content: l.get(
                    "privacy.store_redacted_content",
                    d.privacy.store_redacted_content,
                ),
                redact_keys: l.get("privacy.redact_keys", d.privacy.redact_keys),
                redact_patterns: l.get("privacy.redact_patterns", d.privacy.redact_patterns),
                max_redacted_bytes: l
                    .get("privacy.max_redacted_bytes", d.privacy.max_redacted_bytes),
            },
            rules: Rules {
                enabled: l.get("rules.enabled", d.rules.enabled),
                files: l.get("rules.files", d.rules.files),
            },
            notify: crate::notify::config::Notify {
                external_url: l.get("notify.external_url", d.notify.external_url),
                grafana_url: l.get("notify.grafana_url", d.notify.grafana_url),
                receivers: l.get("notify.receivers", d.notify.receivers),
                receiver: l.get("notify.receiver", d.notify.receiver),
                group_by: l.get("notify.group_by", d.notify.group_by),
                group_wait: l.duration("notify.group_wait", d.notify.group_wait),
                group_interval: l.duration("notify.group_interval", d.notify.group_interval),
                repeat_interval: l.duration("notify.repeat_interval", d.notify.repeat_interval),
                send_resolved: l.get("notify.send_resolved", d.notify.send_resolved),
                routes: l.get("notify.routes", d.notify.routes),
                retry_initial: l.duration("notify.retry_initial", d.notify.retry_initial),
                retry_max: l.duration("notify.retry_max", d.notify.retry_max),
                give_up_after: l.duration("notify.give_up_after", d.notify.give_up_after),
                breaker_failures: l.get("notify.breaker_failures", d.notify.breaker_failures),
                breaker_cooldown: l.duration("notify.breaker_cooldown", d.notify.breaker_cooldown),
            },
            auth: Auth {
                tokens: l.get("auth.tokens", d.auth.tokens),
                tokens_file: l.get("auth.tokens_file", d.auth.tokens_file),
                allow_unauthenticated: l
                    .get("auth.allow_unauthenticated", d.auth.allow_unauthenticated),
                admin_token: l.get("auth.admin_token", d.auth.admin_token),
            },
            tls: Tls {
                cert_file: l.get("tls.cert_file", d.tls.cert_file),
                key_file: l.get("tls.key_file", d.tls.key_file),
                client_ca_file: l.get("tls.client_ca_file", d.tls.client_ca_file),
                plain_admin: l.get("tls.plain_admin", d.tls.plain_admin),
            },
            retention: Retention {
                raw: l.duration("retention.raw", d.retention.raw),
                rollups: l.duration("retention.rollups", d.retention.rollups),
                notifications: l.duration("retention.notifications", d.retention.notifications),
                own_metrics: l.duration("retention.own_metrics", d.retention.own_metrics),
                every: l.duration("retention.every", d.retention.every),
                batch_rows: l.get("retention.batch_rows", d.retention.batch_rows),
            },
            log: Log {
                level: l.get("log.level", d.log.level),
                format: l.get("log.format", d.log.format),
            },
        };
        let mut problems = l.finish();
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

    fn validate_auth(&self, p: &mut Vec<String>) {
        let a = &self.auth;
        if !a.allow_unauthenticated {
            for (key, addr) in self.exposed_listeners() {
                let open = if key == "admin.listen" {
                    a.admin_token.is_none()
                } else {
                    !a.ingest_required()
                };
                if open {
                    let needs = if key == "admin.listen" {
                        "auth.admin_token"
                    } else {
                        "auth.tokens or auth.tokens_file"
                    };
                    p.push(format!(
                        "{key}: {addr} is not a loopback address, so it needs {needs} (or auth.allow_unauthenticated = true to run it open)"
                    ));
                }
            }
        }
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

struct Loader {
    values: BTreeMap<String, (toml::Value, String)>,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl Loader {
    fn get<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        self.used.insert(key.to_owned());
        let Some((value, origin)) = self.values.get(key) else {
            return default;
        };
        // Env values arrive as strings: let "4" stand for 4 and "true" for true.
        let attempt = value.clone().try_into::<T>().or_else(|e| match value {
            toml::Value::String(s) => toml::from_str::<toml::Table>(&format!("v = {s}"))
                .ok()
                .and_then(|t| t.get("v").cloned())
                .and_then(|v| v.try_into::<T>().ok())
                .ok_or(e),
            _ => Err(e),
        });
        match attempt {
            Ok(v) => v,
            Err(e) => {
                self.problems
                    .push(format!("{key} (from {origin}): {}", e.to_string().trim()));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        let raw: Option<String> = self
            .values
            .contains_key(key)
            .then(|| self.get(key, String::new()));
        match raw {
            None => default,
            Some(s) if s.is_empty() => default,
            Some(s) => humantime::parse_duration(&s).unwrap_or_else(|e| {
                self.problems.push(format!(
                    "{key}: {s:?} is not a duration ({e}); use e.g. \"30s\", \"15m\", \"7d\""
                ));
                default
            }),
        }
    }

    fn finish(mut self) -> Vec<String> {
        for (key, (_, origin)) in &self.values {
            if !self.used.contains(key) {
                self.problems
                    .push(format!("{key} (from {origin}): unknown setting"));
            }
        }
        self.problems
    }
}

fn flatten(
    prefix: &str,
    v: toml::Value,
    origin: &str,
    out: &mut BTreeMap<String, (toml::Value, String)>,
) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, origin, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), (other, origin.to_owned()));
        }
    }
}

/// An env value is TOML when it parses as such (`["a", "b"]`, `4`, `true`), else a string.
fn env_value(raw: &str) -> toml::Value {
    if raw.trim_start().starts_with('[')
        && let Some(v) = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|t| t.get("v").cloned())
    {
        return v;
    }
    toml::Value::String(raw.to_owned())
}

/// Serializes durations as humantime strings in the effective-config dump.
mod humantime_serde_compat {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
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
        let hook = &c.notify.receivers[0];
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
        let err = Config::load_from(
            None,
            env(&[
                ("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318"),
                ("TOOLSIGHT_ADMIN__LISTEN", "10.0.0.5:9464"),
            ]),
        )
        .unwrap_err()
        .to_string();
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
        assert!(open.is_ok());

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
        let mut documented: BTreeSet<String> = BTreeSet::new();
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
