//! Prometheus metrics. Counters are updated on the request and refresh paths; gauges that
//! describe token state are computed at scrape time from the store, so they are never stale.
//! Labels carry route and credential *names* only, never token material.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder,
    NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::token::credential::RefreshCounts;
use crate::token::TokenStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
    /// `2xx`, `4xx`...: what dashboards and alerts aggregate on.
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabel {
    credential: CredentialName,
}

/// A credential's name as a label value (the library encodes `Arc<T>` only for sized `T`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CredentialName(Arc<str>);

impl EncodeLabelValue for CredentialName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    duration: Family<RouteLabel, Histogram>,
    retries: Family<RouteLabel, Counter>,
    /// Refresh counts of credentials removed by a reload (the live ones are in their
    /// snapshots): a counter does not vanish, and a name added again counts on from here.
    retired_refreshes: Mutex<BTreeMap<Arc<str>, RefreshCounts>>,
    persist_failures: Family<CredentialLabel, Counter>,
    lease_acquired: Family<CredentialLabel, Counter>,
    store_errors: Family<StoreOp, Counter>,
    store_up: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOp {
    /// `load | commit | lease | watch`.
    op: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        // 1 ms to 10 s: sidecar overhead is sub-millisecond, upstream calls take longer.
        let duration = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS.iter().copied())
        });
        let retries = Family::<RouteLabel, Counter>::default();
        let persist_failures = Family::<CredentialLabel, Counter>::default();
        let lease_acquired = Family::<CredentialLabel, Counter>::default();
        let store_errors = Family::<StoreOp, Counter>::default();
        let store_up = Gauge::default();
        store_up.set(1);
        registry.register(
            "token_proxy_lease_acquired",
            "Refresh leases this replica took, by credential (one per token-endpoint call)",
            lease_acquired.clone(),
        );
        registry.register(
            "token_proxy_store_errors",
            "Shared state store failures, by operation (load | commit | lease | watch)",
            store_errors.clone(),
        );
        registry.register(
            "token_proxy_store_up",
            "1 while the shared state store answers (always 1 without [shared])",
            store_up.clone(),
        );
        registry.register(
            "token_proxy_state_write_failures",
            "Failed writes of a credential's state_file (each is retried until it succeeds)",
            persist_failures.clone(),
        );
        registry.register(
            "token_proxy_requests",
            "Requests answered, by route, status code and status class",
            requests.clone(),
        );
        registry.register(
            "token_proxy_request_duration_seconds",
            "Time from request head to response head, by route",
            duration.clone(),
        );
        registry.register(
            "token_proxy_upstream_retries",
            "Requests replayed after a 401, by route",
            retries.clone(),
        );
        registry.register(
            "token_proxy_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            requests,
            duration,
            retries,
            retired_refreshes: Mutex::default(),
            persist_failures,
            lease_acquired,
            store_errors,
            store_up,
        }
    }

    pub fn lease_acquired(&self, credential: &Arc<str>) {
        self.lease_acquired
            .get_or_create(&CredentialLabel {
                credential: CredentialName(credential.clone()),
            })
            .inc();
    }

    pub fn store_error(&self, op: &str) {
        self.store_errors
            .get_or_create(&StoreOp { op: op.into() })
            .inc();
    }

    pub fn store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    pub fn persist_failed(&self, credential: &Arc<str>) {
        self.persist_failures
            .get_or_create(&CredentialLabel {
                credential: CredentialName(credential.clone()),
            })
            .inc();
    }

    /// The request metrics of one route, resolved once (see [`RouteMetrics`]).
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            duration: self
                .duration
                .get_or_create(&RouteLabel {
                    route: route.into(),
                })
                .clone(),
            requests: self.requests.clone(),
            by_status: std::sync::RwLock::new(Vec::new()),
        }
    }

    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.into(),
                status: status.to_string(),
                class: format!("{}xx", status / 100),
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabel {
                route: route.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn retry(&self, route: &str) {
        self.retries
            .get_or_create(&RouteLabel {
                route: route.into(),
            })
            .inc();
    }

    /// A credential leaves: keep what it counted.
    pub fn retire_refreshes(&self, credential: &Arc<str>, counts: RefreshCounts) {
        let mut retired = self
            .retired_refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let total = retired.entry(credential.clone()).or_default();
        *total = total.plus(counts);
    }

    /// A credential of this name comes (back): it counts on from what its namesake counted.
    pub fn take_retired_refreshes(&self, credential: &str) -> RefreshCounts {
        let mut retired = self
            .retired_refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        retired.remove(credential).unwrap_or_default()
    }

    /// Prometheus text exposition, with token gauges and refresh counts read from `store`
    /// now.
    pub fn encode(&self, store: &TokenStore) -> String {
        let retired: Vec<(Arc<str>, RefreshCounts)> = self
            .retired_refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, counts)| (name.clone(), *counts))
            .collect();
        let gauges = token_gauges(store, retired);
        let mut out = String::new();
        let encoded = text::encode_registry(&mut out, &self.registry)
            .and_then(|()| text::encode_registry(&mut out, &gauges))
            .and_then(|()| text::encode_eof(&mut out));
        if encoded.is_err() {
            out.clear();
        }
        out
    }
}

/// The token gauges and refresh counters, read from `store` for one scrape and encoded
/// straight into the exposition: nothing is kept per credential between scrapes, and a
/// credential removed by a reload leaves no stale gauge behind (its counter stays).
fn token_gauges(store: &TokenStore, retired: Vec<(Arc<str>, RefreshCounts)>) -> Registry {
    let now = SystemTime::now();
    let rows = store
        .all()
        .into_iter()
        .map(|cred| {
            let snap = cred.snapshot();
            let seconds = |d: Result<Duration, std::time::SystemTimeError>| match d {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            TokenRow {
                expires_in: snap
                    .token
                    .as_ref()
                    .and_then(|t| t.expires_at)
                    .map(|exp| seconds(exp.duration_since(now))),
                since_refresh: snap
                    .refreshed_at
                    .map(|at| now.duration_since(at).unwrap_or_default().as_secs_f64()),
                persisted: snap.persisted.map(i64::from),
                state: snap.state_name(now),
                counts: snap.refreshes,
                name: cred.name.clone(),
            }
        })
        .collect();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TokenGauges { rows, retired }));
    registry
}

/// One credential's token gauges at scrape time.
#[derive(Debug)]
struct TokenRow {
    name: std::sync::Arc<str>,
    expires_in: Option<f64>,
    since_refresh: Option<f64>,
    persisted: Option<i64>,
    state: &'static str,
    counts: RefreshCounts,
}

#[derive(Debug)]
struct TokenGauges {
    rows: Vec<TokenRow>,
    /// Removed credentials' refresh counts.
    retired: Vec<(Arc<str>, RefreshCounts)>,
}

impl Collector for TokenGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = &self.rows;
        let mut metric = encoder.encode_descriptor(
            "token_proxy_token_refresh",
            "Token fetches by credential and outcome (ok | error)",
            None,
            MetricType::Counter,
        )?;
        let live = rows.iter().map(|r| (&*r.name, r.counts));
        let retired = self.retired.iter().map(|(name, counts)| (&**name, *counts));
        for (name, counts) in live.chain(retired) {
            // A series appears with its first count, as a counter created on use would.
            for (outcome, n) in [("ok", counts.ok), ("error", counts.error)] {
                if n > 0 {
                    let labels = [("credential", name), ("outcome", outcome)];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&u64::from(n), None)?;
                }
            }
        }
        gauges(
            &mut encoder,
            rows,
            "token_proxy_state_persisted",
            "1 when a credential's current tokens are saved in its state_file, 0 when the last write failed (a restart would need a new login)",
            |r| r.persisted,
        )?;
        gauges(
            &mut encoder,
            rows,
            "token_proxy_token_expires_in_seconds",
            "Seconds until the current token expires (negative: expired; absent: no expiry known)",
            |r| r.expires_in,
        )?;
        gauges(
            &mut encoder,
            rows,
            "token_proxy_token_seconds_since_refresh",
            "Seconds since the last successful token fetch or install",
            |r| r.since_refresh,
        )?;
        let mut metric = encoder.encode_descriptor(
            "token_proxy_token_state",
            "1 for the state each credential is in (fresh | refreshing | expired | needs_reauth)",
            None,
            MetricType::Gauge,
        )?;
        for row in rows {
            for state in ["fresh", "refreshing", "expired", "needs_reauth"] {
                let labels = [("credential", &*row.name), ("state", state)];
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&i64::from(state == row.state))?;
            }
        }
        Ok(())
    }
}

/// One gauge family with a `credential` label: a series for each row that has a value.
fn gauges<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    rows: &[TokenRow],
    name: &str,
    help: &str,
    value: impl Fn(&TokenRow) -> Option<V>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in rows {
        if let Some(v) = value(row) {
            let labels = [("credential", &*row.name)];
            metric.encode_family(&labels)?.encode_gauge(&v)?;
        }
    }
    Ok(())
}

/// One route's request metrics, held by the route: the per-request update is an atomic
/// add on handles resolved once, not a label set formatted and hashed per request.
pub struct RouteMetrics {
    route: String,
    duration: Histogram,
    requests: Family<RouteStatus, Counter>,
    /// The counters of the statuses seen so far (a handful per route).
    by_status: std::sync::RwLock<Vec<(u16, Counter)>>,
}

impl RouteMetrics {
    pub fn request(&self, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let seen = self.by_status.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = seen.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        drop(seen);
        let counter = self
            .requests
            .get_or_create(&RouteStatus {
                route: self.route.clone(),
                status: status.to_string(),
                class: format!("{}xx", status / 100),
            })
            .clone();
        counter.inc();
        let mut seen = self.by_status.write().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|(s, _)| *s == status) {
            seen.push((status, counter));
        }
    }
}
