//! The notifier: routes alert events into groups, writes due groups' notifications to the
//! outbox (one transaction per tick), and runs one delivery task per receiver. Only the replica
//! holding the notifier lock does this, so each group is notified once, not once per replica.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use super::NotifyError;
use super::config::{Notify, ReceiverConfig};
use super::group::{Group, GroupAlert, Status};
use super::payload::{self, Links};
use super::route::{self, Matcher, Routes};
use crate::metrics::Metrics;
use crate::store::{alerts, notify as store};

/// At most this many events are routed per tick (the rest wait for the next one).
const EVENTS_PER_TICK: i64 = 1000;

/// The silences in force at `now`, parsed.
pub(crate) struct Silenced(Vec<(i64, Vec<Matcher>)>);

impl Silenced {
    pub(crate) async fn load(pool: &PgPool, now: DateTime<Utc>) -> Result<Silenced, NotifyError> {
        let rows = store::silences(pool, now).await?;
        Ok(Silenced(
            rows.into_iter()
                .filter(|s| s.starts_at <= now)
                .map(|s| {
                    (
                        s.id,
                        s.matchers.0.iter().filter_map(|m| m.parse().ok()).collect(),
                    )
                })
                .collect(),
        ))
    }

    /// The silences that silence these labels.
    pub(crate) fn by(&self, labels: &std::collections::BTreeMap<String, String>) -> Vec<i64> {
        self.0
            .iter()
            .filter(|(_, m)| !m.is_empty() && route::all_match(m, labels))
            .map(|(id, _)| *id)
            .collect()
    }
}

pub(crate) struct Notifier {
    pool: PgPool,
    routes: Routes,
    links: Links,
    receivers: HashMap<String, ReceiverConfig>,
    groups: HashMap<(String, String), Group>,
    /// Example traces per firing alert, and where a trace id opens (`notify.example_traces`,
    /// `notify.trace_url`).
    example_traces: usize,
    trace_url: String,
}

/// How far before an alert fired its example calls are looked for: the minutes that made it
/// fire, and a bound on what one lookup reads.
const EXAMPLES_BEFORE: chrono::Duration = chrono::Duration::minutes(5);
/// Firing events per tick whose examples are looked up (the others go without): a burst of
/// alerts costs the database a bounded number of lookups.
const EXAMPLE_LOOKUPS_PER_TICK: usize = 16;

impl Notifier {
    pub(crate) fn new(pool: PgPool, settings: &Notify) -> Notifier {
        Notifier {
            routes: Routes::new(settings),
            links: Links {
                external_url: settings.external_url.clone(),
                grafana_url: settings.grafana_url.clone(),
            },
            receivers: settings
                .receivers
                .iter()
                .map(|r| (r.name().to_owned(), r.clone()))
                .collect(),
            pool,
            groups: HashMap::new(),
            example_traces: settings.example_traces,
            trace_url: settings.trace_url.clone(),
        }
    }

    /// A firing alert's annotations with its example traces: `example_traces` (ids, comma
    /// separated) and, with a trace URL, `example_trace_urls` (space separated). A failed lookup
    /// leaves them out: the notification matters more than its examples.
    async fn with_examples(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
        mut annotations: std::collections::BTreeMap<String, String>,
        at: DateTime<Utc>,
    ) -> std::collections::BTreeMap<String, String> {
        let ids = match store::example_traces(
            &self.pool,
            labels,
            at - EXAMPLES_BEFORE,
            at,
            self.example_traces,
        )
        .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "example traces of a firing alert not found");
                Vec::new()
            }
        };
        if !ids.is_empty() {
            if !self.trace_url.is_empty() {
                let urls: Vec<String> = ids
                    .iter()
                    .map(|id| self.trace_url.replace("{trace_id}", id))
                    .collect();
                annotations.insert("example_trace_urls".into(), urls.join(" "));
            }
            annotations.insert("example_traces".into(), ids.join(","));
        }
        annotations
    }

    /// Loads the persisted groups (at start, or on becoming the notifier).
    pub(crate) async fn restore(&mut self) -> Result<usize, NotifyError> {
        self.groups.clear();
        for (receiver, key, state) in store::load_groups(&self.pool).await? {
            match serde_json::from_value::<Group>(state.0) {
                Ok(g) => {
                    self.groups.insert((receiver, key), g);
                }
                Err(e) => {
                    tracing::warn!(receiver = %receiver, group = %key, error = %e, "unreadable notification group dropped")
                }
            }
        }
        Ok(self.groups.len())
    }

    /// Routes new alert events into groups and writes the notifications of the groups due at
    /// `now` to the outbox, all in one transaction. Returns the outbox rows written.
    pub(crate) async fn tick(&mut self, now: DateTime<Utc>) -> Result<usize, NotifyError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(crate::store::StoreError::from)?;
        let events = store::undispatched_events(&mut tx, EVENTS_PER_TICK).await?;
        let due = |g: &Group| g.flush_at.is_some_and(|f| f <= now);
        let gone = |id: &(String, String)| !self.receivers.contains_key(&id.0);
        if events.is_empty() && !self.groups.iter().any(|(id, g)| due(g) || gone(id)) {
            // The usual tick: nothing new, nothing due.
            return Ok(0);
        }
        let silenced = Silenced::load(&self.pool, now).await?;
        let mut work = self.groups.clone();
        let mut touched: HashSet<(String, String)> = HashSet::new();
        let mut lookups = 0;
        for e in &events {
            let resolved = e.status == "resolved";
            // Only for an alert that goes somewhere, and a bounded number per tick.
            let wanted = !resolved
                && self.example_traces > 0
                && lookups < EXAMPLE_LOOKUPS_PER_TICK
                && !self.routes.of(&e.labels.0).is_empty();
            let annotations = if wanted {
                lookups += 1;
                self.with_examples(&e.labels.0, e.annotations.0.clone(), e.at)
                    .await
            } else {
                e.annotations.0.clone()
            };
            let alert = GroupAlert {
                fingerprint: route::fingerprint(&e.labels.0),
                labels: e.labels.0.clone(),
                annotations,
                status: if resolved {
                    Status::Resolved
                } else {
                    Status::Firing
                },
                starts_at: e.since,
                ends_at: resolved.then_some(e.at),
                value: e.value,
                threshold: e.threshold,
                notified: None,
            };
            for r in self.routes.of(&e.labels.0) {
                let (key, labels) = r.group_of(&e.labels.0);
                let id = (r.receiver.clone(), key);
                let g = work.entry(id.clone()).or_insert_with(|| Group {
                    labels,
                    ..Group::default()
                });
                g.update(alert.clone(), &r.timing, now);
                touched.insert(id);
            }
        }
        let mut written = 0;
        for (id, g) in work.iter_mut() {
            let Some(receiver) = self.receivers.get(&id.0) else {
                // The receiver left the configuration: its groups go with it.
                g.alerts.clear();
                touched.insert(id.clone());
                continue;
            };
            let Some(timing) = g.timing else { continue };
            // A due flush changes the group's next flush time even when it sends nothing (all
            // silenced): that state is saved too, or another replica would wait on the old one.
            if due(&*g) {
                touched.insert(id.clone());
            }
            let Some(alerts) = g.flush(&timing, now, |l| !silenced.by(l).is_empty()) else {
                continue;
            };
            let (name, key) = (&id.0, &id.1);
            match receiver {
                ReceiverConfig::Webhook(webhook) => {
                    let p = payload::webhook(
                        name,
                        key,
                        &g.labels,
                        &alerts,
                        webhook.max_alerts,
                        &self.links,
                    );
                    store::insert_outbox(&mut tx, name, "", key, &p).await?;
                    written += 1;
                }
                ReceiverConfig::Email(_) => {
                    let p = payload::email(&g.labels, &alerts, &self.links);
                    store::insert_outbox(&mut tx, name, "", key, &p).await?;
                    written += 1;
                }
                ReceiverConfig::Alertmanager(am) => {
                    let p = payload::alertmanager(&alerts, &self.links);
                    for url in &am.urls {
                        store::insert_outbox(&mut tx, name, url, key, &p).await?;
                        written += 1;
                    }
                }
            }
            tracing::info!(receiver = %name, group = %key, alerts = alerts.len(), "notification queued");
        }
        for id in &touched {
            match work.get(id) {
                Some(g) if !g.is_empty() => {
                    let state = serde_json::to_value(g).map_err(NotifyError::State)?;
                    store::save_group(&mut tx, &id.0, &id.1, &state, g.flush_at).await?;
                }
                _ => {
                    store::delete_group(&mut tx, &id.0, &id.1).await?;
                    work.remove(id);
                }
            }
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        if !ids.is_empty() {
            store::mark_dispatched(&mut tx, &ids).await?;
        }
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        self.groups = work;
        Ok(written)
    }
}

/// The notifier loop. The replica holding the `toolsight-notifier` lock routes, groups and
/// delivers; the others stand by and take over when its connection dies.
pub(crate) async fn run(
    settings: Arc<Notify>,
    pool: PgPool,
    opts: PgConnectOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut notifier = Notifier::new(pool.clone(), &settings);
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut leader: Option<(sqlx::PgConnection, CancellationToken)> = None;
    let role = metrics
        .leader
        .get_or_create(&crate::metrics::RoleLabel { role: "notifier" })
        .clone();
    loop {
        match leader.as_mut() {
            None => {
                let conn = alerts::become_leader(&opts, "toolsight-notifier").await;
                role.set(i64::from(conn.is_some()));
                if let Some(conn) = conn {
                    match notifier.restore().await {
                        Ok(n) => tracing::info!(
                            groups = n,
                            receivers = settings.receivers.len(),
                            "sending notifications (leader)"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "restoring notification groups failed")
                        }
                    }
                    let deliver = stop.child_token();
                    for r in &settings.receivers {
                        match super::deliver::Sender::new(r.clone()) {
                            Ok(sender) => {
                                tokio::spawn(super::deliver::run(
                                    sender,
                                    pool.clone(),
                                    settings.clone(),
                                    metrics.clone(),
                                    wake.clone(),
                                    deliver.clone(),
                                ));
                            }
                            Err(e) => {
                                tracing::error!(receiver = %r.name(), error = %e, "receiver cannot be used")
                            }
                        }
                    }
                    leader = Some((conn, deliver));
                }
            }
            Some((conn, deliver)) => {
                if !alerts::connection_alive(conn).await {
                    tracing::warn!("lost the notifier lock connection; standing by");
                    role.set(0);
                    deliver.cancel();
                    leader = None;
                    continue;
                }
                match notifier.tick(Utc::now()).await {
                    Ok(n) if n > 0 => wake.notify_waiters(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "routing notifications failed; retrying");
                        // The transaction rolled back: start again from the stored groups.
                        let _ = notifier.restore().await;
                    }
                }
                if let Ok(n) = store::outbox_pending(&pool).await {
                    metrics.notify_outbox_pending.set(n);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
