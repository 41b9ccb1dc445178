//! The schema exactly as written in `proxy.toml`: every key optional, unknown keys refused.
//! `build` turns it into the validated [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ClientAuth, Encoding, GrantKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) credentials: BTreeMap<String, RawCredential>,
    pub(super) shared: Option<RawShared>,
    pub(super) intercept: Option<RawIntercept>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntercept {
    pub(super) ca_cert_file: Option<String>,
    pub(super) ca_key_file: Option<String>,
    pub(super) leaf_lifetime: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    pub(super) redis_url: Option<String>,
    pub(super) redis_url_file: Option<String>,
    pub(super) redis_password_file: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) lock_ttl: Option<String>,
    pub(super) encryption_key_file: Option<String>,
    pub(super) ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) shutdown_delay: Option<String>,
    pub(super) max_header_size: Option<String>,
    pub(super) keepalive_timeout: Option<String>,
    pub(super) log_query: Option<bool>,
    pub(super) allowed_hosts: Option<Vec<String>>,
    pub(super) allowed_origins: Option<Vec<String>>,
    pub(super) workers: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) hosts: Option<Vec<String>>,
    pub(super) upstream: Option<String>,
    pub(super) strip_prefix: Option<bool>,
    pub(super) credential: Option<String>,
    pub(super) retry_on_401: Option<bool>,
    pub(super) max_retry_body: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) tls_client_cert_file: Option<String>,
    pub(super) tls_client_key_file: Option<String>,
    pub(super) egress_proxy: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) grant: Option<GrantKind>,
    pub(super) shared: Option<bool>,
    pub(super) token_url: Option<String>,
    pub(super) encoding: Option<Encoding>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<String>,
    pub(super) client_auth: Option<ClientAuth>,
    pub(super) signing_key_file: Option<String>,
    pub(super) signing_key_id: Option<String>,
    pub(super) signing_alg: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) dpop: Option<bool>,
    pub(super) dpop_key_file: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) refresh_token_file: Option<String>,
    pub(super) initial_tokens_file: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) params: Option<BTreeMap<String, String>>,
    pub(super) headers: Option<BTreeMap<String, String>>,
    pub(super) state_file: Option<String>,
    pub(super) refresh_before: Option<String>,
    pub(super) header: Option<String>,
    pub(super) header_prefix: Option<String>,
    pub(super) access_token: Option<String>,
    pub(super) access_token_file: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) tls_client_cert_file: Option<String>,
    pub(super) tls_client_key_file: Option<String>,
    pub(super) egress_proxy: Option<String>,
    pub(super) jwks_url: Option<String>,
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) algorithms: Option<Vec<String>>,
}
