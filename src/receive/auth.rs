//! Ingest authentication: bearer tokens, each scoped to the `service.name` values it may send
//! for. Tokens are compared as SHA-256 digests in constant time; the token file is re-read when
//! it changes.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use serde::Deserialize;
use sha2::Digest;

use crate::secret::Secret;

/// The `[auth]` settings.
#[derive(Debug, Clone, serde::Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Ingest bearer tokens, each scoped to service names.
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of `[[tokens]]`, re-read when it changes.
    pub tokens_file: Option<PathBuf>,
    /// Run without ingest or admin tokens on a non-loopback address (logged at start).
    pub allow_unauthenticated: bool,
    /// The admin API's own token (never one of the ingest tokens).
    pub admin_token: Option<Secret>,
}

impl AuthConfig {
    /// Whether ingest needs a token.
    pub fn ingest_required(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some()
    }
}

/// One token as configured: `{ name = "billing", token = "env:BILLING_TOKEN", services = ["billing-*"] }`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and metrics instead of the token.
    pub name: String,
    pub token: Secret,
    /// `service.name` values this token may send for (`*` matches any run of characters);
    /// empty: any.
    #[serde(default)]
    pub services: Vec<String>,
}

/// The token file: `[[tokens]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

struct Entry {
    name: String,
    digest: [u8; 32],
    services: Arc<Vec<regex::Regex>>,
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is `secret`, compared as SHA-256 digests in constant time.
pub fn same_token(presented: &str, secret: &str) -> bool {
    constant_time_eq::constant_time_eq_32(&digest(presented), &digest(secret))
}

/// Shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The rules every ingest token follows, wherever it is configured (inline, the token file, on
/// every reload): at least [`MIN_TOKEN_CHARS`] characters, and never the admin token. `origin`
/// names where the tokens come from in the messages (`auth.tokens`, the file's path).
pub fn check_tokens(tokens: &[TokenConfig], origin: &str, admin: Option<&Secret>) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.token.expose().chars().count() < MIN_TOKEN_CHARS {
            problems.push(format!(
                "{origin}[{i}] ({}): tokens must be at least {MIN_TOKEN_CHARS} characters",
                t.name
            ));
        }
        if admin.is_some_and(|a| *a == t.token) {
            problems.push(format!(
                "{origin}[{i}] ({}): must differ from auth.admin_token",
                t.name
            ));
        }
    }
    problems
}

fn pattern(p: &str) -> regex::Regex {
    let re = format!("^{}$", regex::escape(p).replace(r"\*", ".*"));
    regex::Regex::new(&re).unwrap_or_else(|_| regex::Regex::new("^$").expect("valid"))
}

fn entries(tokens: &[TokenConfig]) -> Vec<Entry> {
    tokens
        .iter()
        .map(|t| Entry {
            name: t.name.clone(),
            digest: digest(t.token.expose()),
            services: Arc::new(t.services.iter().map(|s| pattern(s)).collect()),
        })
        .collect()
}

/// Who sent an export.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Authentication is off (loopback listeners, or explicitly allowed).
    Anyone,
    Token {
        name: String,
        services: Arc<Vec<regex::Regex>>,
    },
}

impl Principal {
    /// Whether this principal may send spans for `service`.
    pub fn may_send_for(&self, service: &str) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token { services, .. } => {
                services.is_empty() || services.iter().any(|p| p.is_match(service))
            }
        }
    }

    /// The first `service.name` of the export this principal may not send for.
    pub fn forbidden_service<'a>(&self, req: &'a ExportTraceServiceRequest) -> Option<&'a str> {
        if matches!(self, Principal::Anyone) {
            return None;
        }
        req.resource_spans.iter().find_map(|rs| {
            let name = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                })
                .unwrap_or("unknown_service");
            (!self.may_send_for(name)).then_some(name)
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Anyone => "anyone",
            Principal::Token { name, .. } => name,
        }
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
}

/// The ingest tokens in force.
pub struct Auth {
    required: bool,
    configured: Vec<TokenConfig>,
    admin: Option<Secret>,
    file: Option<PathBuf>,
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl Auth {
    /// No authentication.
    pub fn open() -> Auth {
        Auth {
            required: false,
            configured: Vec::new(),
            admin: None,
            file: None,
            entries: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// Tokens from the configuration and, if given, a token file. Authentication is required
    /// as soon as either is configured. Every token follows [`check_tokens`] (`admin` is the
    /// admin token, which no ingest token may equal).
    pub fn new(
        configured: Vec<TokenConfig>,
        file: Option<PathBuf>,
        admin: Option<Secret>,
    ) -> Result<Auth, String> {
        let auth = Auth {
            required: !configured.is_empty() || file.is_some(),
            configured,
            admin,
            file,
            entries: RwLock::new(Arc::new(Vec::new())),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Reads the token file again (and the configured tokens); on error (unreadable, not
    /// parsable, or a token breaking [`check_tokens`]) the tokens in force stay.
    pub fn reload(&self) -> Result<usize, String> {
        let mut all = self.configured.clone();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
            let f: TokenFile = toml::from_str(&text)
                .map_err(|e| format!("token file {}: {}", path.display(), e.message()))?;
            let problems = check_tokens(
                &f.tokens,
                &format!("token file {}: tokens", path.display()),
                self.admin.as_ref(),
            );
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            all.extend(f.tokens);
        }
        let list = entries(&all);
        let n = list.len();
        if let Ok(mut w) = self.entries.write() {
            *w = Arc::new(list);
        }
        Ok(n)
    }

    /// Checks an `Authorization` header value. Every token is compared (in constant time), so
    /// the time taken says nothing about which one nearly matched.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthFailure> {
        if !self.required {
            return Ok(Principal::Anyone);
        }
        let presented = bearer(authorization).ok_or(AuthFailure::Missing)?;
        let d = digest(presented);
        let entries = self.entries.read().map(|e| e.clone()).unwrap_or_default();
        let mut found = None;
        for e in entries.iter() {
            if constant_time_eq::constant_time_eq_32(&e.digest, &d) && found.is_none() {
                found = Some(Principal::Token {
                    name: e.name.clone(),
                    services: e.services.clone(),
                });
            }
        }
        found.ok_or(AuthFailure::Invalid)
    }

    /// Re-reads the token file when it changes (checked every 2 s) until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut watched = crate::watch::Watched::new(vec![path]);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(crate::watch::EVERY) => {}
            }
            if watched.changed() {
                let result = self.reload();
                metrics.reloaded("tokens", result.is_ok());
                match result {
                    Ok(n) => tracing::info!(tokens = n, "ingest tokens reloaded"),
                    Err(e) => {
                        tracing::warn!(error = %e, "token file changed but cannot be used; keeping the previous tokens")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, secret: &str, services: &[&str]) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            token: Secret::new(secret),
            services: services.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn bearer_tokens_and_scopes() {
        let auth = Auth::new(
            vec![
                token("billing", "s3cret-billing", &["billing-mcp", "billing-*"]),
                token("ops", "s3cret-ops", &[]),
            ],
            None,
            None,
        )
        .unwrap();
        assert_eq!(auth.authenticate(None).unwrap_err(), AuthFailure::Missing);
        assert_eq!(
            auth.authenticate(Some("Basic abc")).unwrap_err(),
            AuthFailure::Missing
        );
        assert_eq!(
            auth.authenticate(Some("Bearer s3cret-billinG"))
                .unwrap_err(),
            AuthFailure::Invalid
        );
        let p = auth.authenticate(Some("bearer  s3cret-billing ")).unwrap();
        assert_eq!(p.name(), "billing");
        assert!(p.may_send_for("billing-mcp") && p.may_send_for("billing-eu"));
        assert!(!p.may_send_for("search-mcp"));
        let ops = auth.authenticate(Some("Bearer s3cret-ops")).unwrap();
        assert!(ops.may_send_for("anything"));
        assert!(Auth::open().authenticate(None).is_ok());
    }

    #[test]
    fn the_token_file_is_reloaded_and_a_bad_one_keeps_the_old_tokens() {
        let dir = std::env::temp_dir().join(format!("toolsight-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.toml");
        let (a, b) = ("tok-a-0123456789", "tok-b-0123456789");
        std::fs::write(
            &path,
            format!("[[tokens]]\nname = \"a\"\ntoken = \"{a}\"\n"),
        )
        .unwrap();
        let admin = Some(Secret::new("admin-token-0123456789"));
        let auth = Auth::new(Vec::new(), Some(path.clone()), admin.clone()).unwrap();
        assert!(auth.authenticate(Some(&format!("Bearer {a}"))).is_ok());
        std::fs::write(
            &path,
            format!("[[tokens]]\nname = \"b\"\ntoken = \"{b}\"\n"),
        )
        .unwrap();
        auth.reload().unwrap();
        assert!(auth.authenticate(Some(&format!("Bearer {a}"))).is_err());
        assert!(auth.authenticate(Some(&format!("Bearer {b}"))).is_ok());
        std::fs::write(&path, "[[tokens]]\nnome = \"c\"\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(
            auth.authenticate(Some(&format!("Bearer {b}"))).is_ok(),
            "kept"
        );
        // The token rules hold for the file as for inline tokens, on every reload.
        for bad in ["abc", "admin-token-0123456789"] {
            std::fs::write(
                &path,
                format!("[[tokens]]\nname = \"c\"\ntoken = \"{bad}\"\n"),
            )
            .unwrap();
            let err = auth.reload().unwrap_err();
            assert!(
                err.contains("at least 16 characters")
                    || err.contains("must differ from auth.admin_token"),
                "{err}"
            );
            assert!(auth.authenticate(Some(&format!("Bearer {bad}"))).is_err());
            assert!(
                auth.authenticate(Some(&format!("Bearer {b}"))).is_ok(),
                "kept"
            );
            assert!(Auth::new(Vec::new(), Some(path.clone()), admin.clone()).is_err());
        }
    }
}
