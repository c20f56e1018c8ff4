//! The cardinality guard: a bound on the distinct services, the distinct tools (and methods,
//! models, upstreams) per service, and the sessions tracked per hour. The service and session
//! budgets are per scope (the ingest token that sent the export), so one tenant exhausting its
//! budget folds only its own keys. Session keys that are a trace id (no session attribute was
//! sent) are one per trace by construction: they have a budget of their own
//! (`max_trace_sessions_per_hour`), so that traffic whose every call is its own trace does not
//! make the rules' per-session state (`loop_calls_1m`, `session_tokens_1m`) one row per call.
//! Past it they fold into [`OVERFLOW`] like any session, which the retry-loop and token-burn
//! rules skip: nothing unrelated is merged into one "session", and loops inside those traces go
//! unseen (the documented bound). New keys beyond a bound fold into [`OVERFLOW`] and are
//! counted, so a misbehaving client (a tool name with an id in it, a session per request)
//! cannot exhaust memory or the rollups.
//! Time is passed in.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::{Normalized, SessionSource};

/// The key that stands for every key beyond a bound.
pub const OVERFLOW: &str = "__overflow__";

const HOUR_NANOS: i64 = 3_600_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per scope (ingest token).
    pub max_services: usize,
    /// Per service, for each of tools, MCP methods, models and upstreams.
    pub max_keys_per_service: usize,
    /// Distinct session keys per hour, per scope (ingest token), across its services.
    pub max_sessions_per_hour: usize,
    /// Distinct trace-id session keys (no session attribute sent) per hour, per scope.
    pub max_trace_sessions_per_hour: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: 1000,
            max_keys_per_service: 500,
            max_sessions_per_hour: 200_000,
            max_trace_sessions_per_hour: 100_000,
        }
    }
}

/// Keys folded into [`OVERFLOW`] by one call, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub services: u64,
    pub keys: u64,
    pub sessions: u64,
}

#[derive(Default)]
struct ServiceKeys {
    tools: HashSet<String>,
    methods: HashSet<String>,
    models: HashSet<String>,
    upstreams: HashSet<String>,
}

#[derive(Default)]
struct State {
    services: HashMap<String, ServiceKeys>,
    /// Per scope: the services it brought in, and its sessions of this hour and the previous one.
    scopes: HashMap<String, Scope>,
    hour: i64,
    /// Services plus their keys, kept as they are added (the gauge is read on every export).
    keys: usize,
}

#[derive(Default)]
struct Scope {
    services: usize,
    sessions: [HashSet<String>; 2],
    /// Trace-id session keys of this hour and the previous one.
    traces: [HashSet<String>; 2],
}

pub struct Guard {
    limits: Limits,
    state: Mutex<State>,
}

/// Keeps `key` if it is known or there is room for it (counting it in `added`); else replaces
/// it with [`OVERFLOW`].
fn admit(set: &mut HashSet<String>, key: &mut String, limit: usize, added: &mut usize) -> bool {
    if key == OVERFLOW || set.contains(key.as_str()) {
        return true;
    }
    if set.len() < limit {
        set.insert(key.clone());
        *added += 1;
        return true;
    }
    *key = OVERFLOW.to_owned();
    false
}

/// [`admit`] for a per-service key (tool, method, model, upstream), counting a fold.
fn admit_key(
    set: &mut HashSet<String>,
    key: &mut String,
    l: &Limits,
    folded: &mut Folded,
    added: &mut usize,
) {
    if !admit(set, key, l.max_keys_per_service, added) {
        folded.keys += 1;
    }
}

/// The keys of `name`'s service, folding the service into [`OVERFLOW`] when the scope that
/// sends it has no room left. Known services cost one lookup and no allocation.
fn service_keys<'a>(
    services: &'a mut HashMap<String, ServiceKeys>,
    scope: &mut Scope,
    name: &mut String,
    l: &Limits,
    folded: &mut Folded,
    added: &mut usize,
) -> &'a mut ServiceKeys {
    if !services.contains_key(name.as_str()) {
        if scope.services >= l.max_services {
            *name = OVERFLOW.to_owned();
            folded.services += 1;
        }
        if !services.contains_key(name.as_str()) {
            *added += 1;
            if name != OVERFLOW {
                scope.services += 1;
            }
            services.insert(name.clone(), ServiceKeys::default());
        }
    }
    services
        .get_mut(name.as_str())
        .expect("present: inserted above")
}

/// Admits a session key seen this hour or the last, or a new one while there is room.
fn session(
    sessions: &mut [HashSet<String>; 2],
    key: &mut String,
    limit: usize,
    folded: &mut Folded,
) {
    if key == OVERFLOW || sessions[1].contains(key.as_str()) {
        return;
    }
    // Session sets are counted by their lengths, not in the key count.
    if !admit(&mut sessions[0], key, limit, &mut 0) {
        folded.sessions += 1;
    }
}

/// [`session`] with the budget of the key's kind: sent by the client, or a trace id.
fn any_session(
    scope: &mut Scope,
    key: &mut String,
    source: SessionSource,
    l: &Limits,
    folded: &mut Folded,
) {
    if source == SessionSource::TraceId {
        session(
            &mut scope.traces,
            key,
            l.max_trace_sessions_per_hour,
            folded,
        );
    } else {
        session(&mut scope.sessions, key, l.max_sessions_per_hour, folded);
    }
}

impl Guard {
    pub fn new(limits: Limits) -> Guard {
        Guard {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    /// Keys tracked now (services, per-service keys, sessions), for a gauge.
    pub fn tracked(&self) -> usize {
        self.state.lock().map_or(0, |s| {
            s.keys
                + s.scopes
                    .values()
                    .map(|c| {
                        c.sessions.iter().map(HashSet::len).sum::<usize>()
                            + c.traces.iter().map(HashSet::len).sum::<usize>()
                    })
                    .sum::<usize>()
        })
    }

    /// Folds the keys of `n`, sent under `scope` (the ingest token's name), beyond the bounds.
    pub fn apply(&self, n: &mut Normalized, now_nanos: i64, scope: &str) -> Folded {
        let l = self.limits;
        let mut folded = Folded::default();
        let Ok(mut st) = self.state.lock() else {
            return folded;
        };
        let hour = now_nanos.div_euclid(HOUR_NANOS);
        if hour != st.hour {
            let next = hour == st.hour + 1;
            for s in st.scopes.values_mut() {
                for sets in [&mut s.sessions, &mut s.traces] {
                    let current = std::mem::take(&mut sets[0]);
                    sets[1] = if next { current } else { HashSet::new() };
                }
            }
            st.hour = hour;
        }
        let State {
            services,
            scopes,
            keys: added,
            ..
        } = &mut *st;
        // Scopes are the configured tokens (or "anyone"): a bounded set.
        if !scopes.contains_key(scope) {
            scopes.insert(scope.to_owned(), Scope::default());
        }
        let scope = scopes.get_mut(scope).expect("inserted above");
        for c in &mut n.tool_calls {
            let keys = service_keys(services, scope, &mut c.span.service, &l, &mut folded, added);
            admit_key(&mut keys.tools, &mut c.tool, &l, &mut folded, added);
            any_session(scope, &mut c.session_key, c.session_source, &l, &mut folded);
        }
        for r in &mut n.mcp_requests {
            let keys = service_keys(services, scope, &mut r.span.service, &l, &mut folded, added);
            admit_key(&mut keys.methods, &mut r.method, &l, &mut folded, added);
        }
        for c in &mut n.llm_calls {
            let keys = service_keys(services, scope, &mut c.span.service, &l, &mut folded, added);
            admit_key(&mut keys.models, &mut c.model, &l, &mut folded, added);
            any_session(scope, &mut c.session_key, c.session_source, &l, &mut folded);
        }
        for u in &mut n.upstream_calls {
            let keys = service_keys(services, scope, &mut u.span.service, &l, &mut folded, added);
            admit_key(
                &mut keys.upstreams,
                &mut u.server_address,
                &l,
                &mut folded,
                added,
            );
        }
        folded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::{Outcome, SessionSource, Side, Source, SpanRef, ToolCall};

    fn call(service: &str, tool: &str, session: &str) -> ToolCall {
        ToolCall {
            span: SpanRef {
                trace_id: [1; 16],
                span_id: [1; 8],
                parent_span_id: None,
                service: service.into(),
                service_instance: None,
                start_unix_nanos: 0,
                duration_us: 1,
            },
            tool: tool.into(),
            side: Side::Server,
            source: Source::Semconv,
            outcome: Outcome::Ok,
            error_type: None,
            session_key: session.into(),
            session_source: SessionSource::ConversationId,
            request_id: None,
            inner_span_id: None,
            counted: true,
            peer_span_id: None,
            own_outcome: None,
            overhead_us: None,
            loop_counted: false,
            result: None,
            args_hash: None,
            args_redacted: None,
            result_redacted: None,
        }
    }

    fn keys(n: &Normalized) -> Vec<(String, String, String)> {
        n.tool_calls
            .iter()
            .map(|c| {
                (
                    c.span.service.clone(),
                    c.tool.clone(),
                    c.session_key.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn keys_beyond_the_bounds_fold_into_overflow() {
        let g = Guard::new(Limits {
            max_services: 2,
            max_keys_per_service: 2,
            max_sessions_per_hour: 3,
            ..Limits::default()
        });
        let mut n = Normalized::default();
        for (svc, tool, sess) in [
            ("a", "t1", "s1"),
            ("a", "t2", "s2"),
            ("a", "t3", "s3"),
            ("a", "t1", "s4"),
            ("b", "t1", "s1"),
            ("c", "t1", "s1"),
        ] {
            n.tool_calls.push(call(svc, tool, sess));
        }
        let folded = g.apply(&mut n, 0, "anyone");
        assert_eq!(
            keys(&n),
            [
                ("a".into(), "t1".into(), "s1".into()),
                ("a".into(), "t2".into(), "s2".into()),
                ("a".into(), OVERFLOW.into(), "s3".into()),
                ("a".into(), "t1".into(), OVERFLOW.into()),
                ("b".into(), "t1".into(), "s1".into()),
                (OVERFLOW.into(), "t1".into(), "s1".into()),
            ]
        );
        assert_eq!(
            folded,
            Folded {
                services: 1,
                keys: 1,
                sessions: 1
            }
        );
    }

    #[test]
    fn trace_id_sessions_have_a_budget_of_their_own() {
        let g = Guard::new(Limits {
            max_sessions_per_hour: 1,
            max_trace_sessions_per_hour: 2,
            ..Limits::default()
        });
        let mut n = Normalized::default();
        for t in ["trace-a", "trace-b", "trace-c"] {
            let mut c = call("a", "t", t);
            c.session_source = SessionSource::TraceId;
            n.tool_calls.push(c);
        }
        // A session the client sent: its own budget, untouched by the traces.
        n.tool_calls.push(call("a", "t", "conv-1"));
        assert_eq!(g.apply(&mut n, 0, "anyone").sessions, 1);
        let sessions: Vec<String> = keys(&n).into_iter().map(|k| k.2).collect();
        assert_eq!(sessions, ["trace-a", "trace-b", OVERFLOW, "conv-1"]);
        assert_eq!(
            g.tracked(),
            2 + 2 + 1,
            "the service, its tool, two traces, one session"
        );
        // A trace already seen this hour stays itself: its later calls join it.
        let mut again = Normalized::default();
        let mut c = call("a", "t", "trace-b");
        c.session_source = SessionSource::TraceId;
        again.tool_calls.push(c);
        assert_eq!(g.apply(&mut again, 0, "anyone").sessions, 0);
        assert_eq!(keys(&again)[0].2, "trace-b");
    }

    #[test]
    fn sessions_are_bounded_per_hour_and_recent_ones_stay_known() {
        let g = Guard::new(Limits {
            max_sessions_per_hour: 2,
            ..Limits::default()
        });
        let run = |sessions: &[&str], at_hours: i64| {
            let mut n = Normalized {
                tool_calls: sessions.iter().map(|s| call("a", "t", s)).collect(),
                ..Default::default()
            };
            let f = g.apply(&mut n, at_hours * HOUR_NANOS, "anyone");
            (
                keys(&n).into_iter().map(|k| k.2).collect::<Vec<_>>(),
                f.sessions,
            )
        };
        assert_eq!(run(&["s1", "s2", "s3"], 0).1, 1);
        // The next hour: s1 and s2 are still known, two new ones fit.
        let (k, f) = run(&["s1", "s2", "s4", "s5", "s6"], 1);
        assert_eq!(k, ["s1", "s2", "s4", "s5", OVERFLOW]);
        assert_eq!(f, 1);
        // Two hours on, memory holds two hours at most.
        run(&[], 3);
        assert!(g.tracked() <= 2 + 2 + 2, "{}", g.tracked());
    }

    #[test]
    fn one_scope_exhausting_its_service_budget_folds_only_its_own() {
        let g = Guard::new(Limits {
            max_services: 3,
            max_sessions_per_hour: 2,
            ..Limits::default()
        });
        let mut billing = Normalized {
            tool_calls: (0..5)
                .map(|i| call(&format!("billing-{i}"), "t", &format!("s{i}")))
                .collect(),
            ..Default::default()
        };
        let f = g.apply(&mut billing, 0, "billing");
        assert_eq!((f.services, f.sessions), (2, 3));
        let mut search = Normalized {
            tool_calls: vec![call("search-mcp", "t", "s9"), call("search-mcp", "t", "s8")],
            ..Default::default()
        };
        let f = g.apply(&mut search, 0, "search");
        assert_eq!(f, Folded::default(), "another tenant's budget is its own");
        assert_eq!(
            keys(&search)[0],
            ("search-mcp".into(), "t".into(), "s9".into())
        );
        assert_eq!(keys(&search)[1].2, "s8");
    }
}
