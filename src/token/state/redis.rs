//! The shared store: replicas holding the same credential share one token state in Redis
//! (or Valkey), so a rotating refresh token is used by one replica at a time and every
//! rotation is committed before anyone uses it.
//!
//! Keys (no secret in any name; `id` hashes the credential's name, `token_url` and
//! `client_id`, so two apps never share a token by accident):
//! - `{prefix}:{name}:{id}` — a hash: `gen` (the generation) and `data` (the token set as
//!   JSON, AES-256-GCM encrypted with `encryption_key_file`; empty = signed out);
//! - `{prefix}:{name}:{id}:lease` — the refresh lease: `SET NX PX lock_ttl`, renewed by its
//!   holder while its token call runs, expiring if the holder dies;
//! - channel `{prefix}:{name}:{id}:commits` — each commit publishes its generation (never a
//!   token). Subscribers, plus a poll every 500 ms as the fallback, feed `watch`.
//!
//! Lease and commit are Lua scripts, so "still at generation N?" and the write are one
//! atomic step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use super::{Acquire, BoxFuture, Commit, Lease, Loaded, StateError, StateStore, Stored};
use crate::metrics::Metrics;
use crate::token::response::TokenSet;

/// How a shared store connects and names things (from `[shared]`).
#[derive(Clone)]
pub struct RedisSettings {
    pub url: SecretString,
    pub password: Option<SecretString>,
    pub key_prefix: String,
    pub lock_ttl: Duration,
    /// 32 bytes: tokens are encrypted at rest when set.
    pub encryption_key: Option<Arc<[u8; 32]>>,
    /// PEM roots for `rediss://` with a private CA; the built-in web roots otherwise.
    pub ca_pem: Option<Vec<u8>>,
}

/// One Redis client per process; each shared credential gets a [`RedisStateStore`].
#[derive(Clone)]
pub struct RedisShared {
    client: redis::Client,
    settings: RedisSettings,
    conn: Arc<Mutex<Option<ConnectionManager>>>,
    metrics: Arc<Metrics>,
}

impl RedisShared {
    pub fn new(settings: RedisSettings, metrics: Arc<Metrics>) -> Result<RedisShared, String> {
        let mut info =
            redis::IntoConnectionInfo::into_connection_info(settings.url.expose_secret())
                .map_err(|e| format!("shared.redis_url: {}", e.kind_name()))?;
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
        .map_err(|e| format!("shared.redis_url: {}", describe(&e)))?;
        Ok(RedisShared {
            client,
            settings,
            conn: Arc::new(Mutex::new(None)),
            metrics,
        })
    }

    /// A connection (made on first use, and again after Redis was unreachable at start).
    async fn conn(&self) -> Result<ConnectionManager, StateError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let timeout =
            (self.settings.lock_ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let made = tokio::time::timeout(
            timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StateError("redis: connect timed out".into()))?
        .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
        *slot = Some(made.clone());
        Ok(made)
    }

    /// The store for one credential, and its watcher task (stops with `shutdown`).
    pub fn store_for(
        &self,
        name: &str,
        token_url: &str,
        client_id: &str,
        shutdown: CancellationToken,
    ) -> Arc<RedisStateStore> {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{name}\n{token_url}\n{client_id}").as_bytes(),
        );
        let id: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let base = format!("{}:{name}:{id}", self.settings.key_prefix);
        let owner: String = {
            use rand::Rng;
            format!("{:016x}", rand::thread_rng().gen::<u64>())
        };
        let store = Arc::new(RedisStateStore {
            shared: self.clone(),
            state_key: base.clone(),
            lease_key: format!("{base}:lease"),
            channel: format!("{base}:commits"),
            owner,
            others: watch::Sender::new(0),
            holding: AtomicBool::new(false),
        });
        tokio::spawn(store.clone().watch_loop(shutdown));
        store
    }
}

fn describe(e: &redis::RedisError) -> String {
    // Error texts may echo a command's arguments; keep the kind and the server's code.
    match e.code() {
        Some(code) => format!("{} ({code})", e.kind_name()),
        None => e.kind_name().to_string(),
    }
}

trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for redis::RedisError {
    fn kind_name(&self) -> &'static str {
        if self.is_timeout() {
            "timed out"
        } else if self.is_connection_refusal() {
            "connection refused"
        } else if self.is_io_error() || self.is_connection_dropped() {
            "connection lost"
        } else {
            "error"
        }
    }
}

pub struct RedisStateStore {
    shared: RedisShared,
    state_key: String,
    lease_key: String,
    channel: String,
    /// Unique per process and credential: the lease value, so only its holder renews or
    /// releases it.
    owner: String,
    /// The newest generation seen in Redis (pub/sub and polling).
    others: watch::Sender<u64>,
    holding: AtomicBool,
}

/// The `data` field.
#[derive(Serialize, Deserialize)]
struct Wire {
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    received_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dpop_jkt: Option<String>,
}

const ACQUIRE: &str = r"
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if g ~= tonumber(ARGV[1]) then return {'stale', g} end
if tonumber(redis.call('HGET', KEYS[1], 'refused') or '-1') == g then return {'refused', g} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {'ok', g} end
return {'busy', g}
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

const COMMIT: &str = r"
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if g ~= tonumber(ARGV[1]) then return g end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'data', ARGV[3])
redis.call('HDEL', KEYS[1], 'refused')
redis.call('PUBLISH', ARGV[4], ARGV[2])
return -1
";

/// Mark generation ARGV[1] refused, if it is still the current one.
const REFUSE: &str = r"
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if g == tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'refused', ARGV[1]) return 1 end
return 0
";

impl RedisStateStore {
    fn failed(&self, op: &str, e: StateError) -> StateError {
        self.shared.metrics.store_error(op);
        self.shared.metrics.store_up(false);
        e
    }

    fn ok<T>(&self, value: T) -> T {
        self.shared.metrics.store_up(true);
        value
    }

    fn encode(&self, set: &TokenSet) -> Result<String, StateError> {
        let ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let wire = Wire {
            access_token: set.access_token.expose_secret().to_string(),
            refresh_token: set
                .refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_string()),
            expires_at_ms: set.expires_at.map(ms),
            received_at_ms: ms(set.received_at),
            dpop_jkt: set.dpop_jkt.clone(),
        };
        let json = serde_json::to_vec(&wire).map_err(|e| StateError(e.to_string()))?;
        match &self.shared.settings.encryption_key {
            None => Ok(format!("p:{}", b64(&json))),
            Some(key) => Ok(format!("e:{}", b64(&seal(key, &self.state_key, json)?))),
        }
    }

    fn decode(&self, data: &str) -> Result<TokenSet, StateError> {
        let json = match (data.split_once(':'), &self.shared.settings.encryption_key) {
            (Some(("p", text)), None) => unb64(text)?,
            (Some(("e", text)), Some(key)) => open(key, &self.state_key, unb64(text)?)?,
            (Some(("p", _)), Some(_)) => {
                return Err(StateError(
                    "redis holds unencrypted tokens but encryption_key_file is set".into(),
                ))
            }
            (Some(("e", _)), None) => {
                return Err(StateError(
                    "redis holds encrypted tokens and no encryption_key_file is set".into(),
                ))
            }
            _ => return Err(StateError("redis holds an unreadable token state".into())),
        };
        let wire: Wire = serde_json::from_slice(&json)
            .map_err(|_| StateError("redis holds an unreadable token state".into()))?;
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        Ok(TokenSet {
            access_token: SecretString::from(wire.access_token).into(),
            refresh_token: wire.refresh_token.map(SecretString::from),
            expires_at: wire.expires_at_ms.map(at),
            received_at: at(wire.received_at_ms),
            dpop_jkt: wire.dpop_jkt,
        })
    }

    async fn generation(&self) -> Result<u64, StateError> {
        let mut conn = self.shared.conn().await?;
        let g: Option<u64> = conn
            .hget(&self.state_key, "gen")
            .await
            .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
        Ok(g.unwrap_or(0))
    }

    /// Feed `others` from pub/sub, with a poll every 500 ms as the fallback (a message can
    /// be missed while reconnecting).
    async fn watch_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pubsub: Option<redis::aio::PubSub> = None;
        let mut was_up = true;
        loop {
            if pubsub.is_none() {
                if let Ok(Ok(mut p)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    self.shared.client.get_async_pubsub(),
                )
                .await
                {
                    if p.subscribe(&self.channel).await.is_ok() {
                        pubsub = Some(p);
                    }
                }
            }
            let message = async {
                match pubsub.as_mut() {
                    Some(p) => {
                        use futures_util::StreamExt;
                        p.on_message().next().await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                m = message => match m {
                    Some(m) => {
                        if let Ok(g) = m.get_payload::<u64>() {
                            self.others.send_if_modified(|seen| std::mem::replace(seen, g) != g);
                        }
                    }
                    None => pubsub = None,
                },
                _ = poll.tick() => match self.generation().await {
                    Ok(g) if !was_up => {
                        // Back after an outage: tell the refresher even if nothing changed,
                        // so it retries now rather than at the end of its backoff.
                        was_up = true;
                        self.shared.metrics.store_up(true);
                        self.others.send_replace(g);
                    }
                    Ok(g) => {
                        self.shared.metrics.store_up(true);
                        self.others.send_if_modified(|seen| std::mem::replace(seen, g) != g);
                    }
                    Err(_) => {
                        was_up = false;
                        self.shared.metrics.store_error("watch");
                        self.shared.metrics.store_up(false);
                    }
                },
            }
        }
    }
}

impl StateStore for RedisStateStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>> {
        Box::pin(async move {
            let result = async {
                let mut conn = self.shared.conn().await?;
                let (generation, data): (Option<u64>, Option<String>) = redis::pipe()
                    .hget(&self.state_key, "gen")
                    .hget(&self.state_key, "data")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
                Ok(match (generation, data.as_deref()) {
                    (None, _) => Loaded::Empty,
                    (Some(g), None | Some("")) => Loaded::SignedOut { generation: g },
                    (Some(g), Some(data)) => Loaded::Tokens(Stored {
                        generation: g,
                        tokens: self.decode(data)?,
                    }),
                })
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("load", e))
        })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>> {
        Box::pin(async move {
            let result = async {
                let mut conn = self.shared.conn().await?;
                let ttl = self.shared.settings.lock_ttl.as_millis() as u64;
                let (outcome, current): (String, u64) = Script::new(ACQUIRE)
                    .key(&self.state_key)
                    .key(&self.lease_key)
                    .arg(generation)
                    .arg(&self.owner)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
                Ok(match outcome.as_str() {
                    "ok" => {
                        self.holding.store(true, Ordering::SeqCst);
                        Acquire::Acquired(Lease { generation })
                    }
                    "stale" => Acquire::Stale { current },
                    "refused" => Acquire::Refused,
                    _ => Acquire::Busy,
                })
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("lease", e))
        })
    }

    fn renew(&self, _lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>> {
        Box::pin(async move {
            let result = async {
                let mut conn = self.shared.conn().await?;
                let ttl = self.shared.settings.lock_ttl.as_millis() as u64;
                let renewed: i64 = Script::new(RENEW)
                    .key(&self.lease_key)
                    .arg(&self.owner)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
                Ok(renewed == 1)
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("lease", e))
        })
    }

    fn release(&self, _lease: Lease) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            self.holding.store(false, Ordering::SeqCst);
            let result = async {
                let mut conn = self.shared.conn().await?;
                let _: i64 = Script::new(RELEASE)
                    .key(&self.lease_key)
                    .arg(&self.owner)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
                Ok(())
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("lease", e))
        })
    }

    fn refused(&self, generation: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let result = async {
                let mut conn = self.shared.conn().await?;
                let _: i64 = Script::new(REFUSE)
                    .key(&self.state_key)
                    .arg(generation)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = self.failed("commit", e);
            }
        })
    }

    fn commit(&self, expected: u64, set: Stored) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            let result = async {
                let data = self.encode(&set.tokens)?;
                self.write(expected, set.generation, &data).await
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("commit", e))
        })
    }

    fn clear(&self, generation: u64) -> BoxFuture<'_, Result<u64, StateError>> {
        Box::pin(async move {
            let result = async {
                // A tombstone, not a deletion: replicas sign out too instead of writing
                // their tokens back.
                let expected = self.generation().await?;
                let generation = generation.max(expected + 1);
                match self.write(expected, generation, "").await? {
                    Commit::Committed => Ok(generation),
                    Commit::Conflict { current } => Err(StateError(format!(
                        "redis moved to generation {current} meanwhile; try again"
                    ))),
                }
            }
            .await;
            result
                .map(|v| self.ok(v))
                .map_err(|e| self.failed("commit", e))
        })
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.others.subscribe()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn holds_lease(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    fn lease_ttl(&self) -> Option<Duration> {
        Some(self.shared.settings.lock_ttl)
    }
}

impl RedisStateStore {
    async fn write(
        &self,
        expected: u64,
        generation: u64,
        data: &str,
    ) -> Result<Commit, StateError> {
        let mut conn = self.shared.conn().await?;
        let current: i64 = Script::new(COMMIT)
            .key(&self.state_key)
            .arg(expected)
            .arg(generation)
            .arg(data)
            .arg(&self.channel)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| StateError(format!("redis: {}", describe(&e))))?;
        Ok(match current {
            -1 => {
                self.others
                    .send_if_modified(|seen| std::mem::replace(seen, generation) != generation);
                Commit::Committed
            }
            current => Commit::Conflict {
                current: current.max(0) as u64,
            },
        })
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, StateError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .map_err(|_| StateError("redis holds an unreadable token state".into()))
}

/// AES-256-GCM with a random nonce, the key name as associated data (a value copied to
/// another credential's key does not decrypt). Output: nonce || ciphertext+tag.
fn seal(key: &[u8; 32], aad: &str, mut plain: Vec<u8>) -> Result<Vec<u8>, StateError> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use ring::rand::{SecureRandom, SystemRandom};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| StateError("bad encryption key".into()))?,
    );
    let mut nonce = [0u8; 12];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| StateError("no randomness for a nonce".into()))?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad.as_bytes()),
        &mut plain,
    )
    .map_err(|_| StateError("encryption failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&plain);
    Ok(out)
}

fn open(key: &[u8; 32], aad: &str, sealed: Vec<u8>) -> Result<Vec<u8>, StateError> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let refused = || {
        StateError(
            "redis holds tokens that do not decrypt with encryption_key_file (wrong key?)".into(),
        )
    };
    if sealed.len() < 12 {
        return Err(refused());
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| refused())?);
    let (nonce, rest) = sealed.split_at(12);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
    let mut buf = rest.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
        .map_err(|_| refused())?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_key_and_the_name() {
        let key = [7u8; 32];
        let sealed = seal(&key, "tp:main:abc", b"secret json".to_vec()).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            open(&key, "tp:main:abc", sealed.clone()).unwrap(),
            b"secret json"
        );
        assert!(open(&[8u8; 32], "tp:main:abc", sealed.clone()).is_err());
        assert!(open(&key, "tp:other:abc", sealed).is_err());
    }
}
