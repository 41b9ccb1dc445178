//! The interception CA: generated on first start (ECDSA P-256, key 0600) with X.509 name
//! constraints limited to the hosts the routes name — so even a stolen key cannot mint a
//! certificate any client accepts for another site — or provided by the operator. It signs
//! short-lived leaf certificates, one per intercepted host.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType,
};
use rustls::pki_types::CertificateDer;

/// A CA able to sign leaf certificates.
pub struct Ca {
    /// rcgen's view of the CA (same name, key and key identifier as the file's).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The certificate exactly as the apps trust it.
    pub der: CertificateDer<'static>,
    pub pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("constraints", &self.describe_constraints())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// The CA in `cert` + `key` (PEM), checked: readable, not expired, the key the
    /// certificate's, a CA. Errors name `intercept.ca_cert_file` / `intercept.ca_key_file`.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, String> {
        let pair = crate::config::client_cert::load_pair(
            "intercept.ca_cert_file",
            "intercept.ca_key_file",
            cert,
            key,
        )?;
        let der = pair.chain[0].clone();
        let params = CertificateParams::from_ca_cert_der(&der).map_err(|e| {
            format!(
                "intercept.ca_cert_file: {} cannot be used as a CA: {e}",
                cert.display()
            )
        })?;
        if matches!(params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(format!(
                "intercept.ca_cert_file: {} is not a CA certificate (basicConstraints CA:TRUE)",
                cert.display()
            ));
        }
        let key_pem = std::fs::read_to_string(key).unwrap_or_default();
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|_| {
            format!(
                "intercept.ca_key_file: {} must be a PKCS#8 PEM key (openssl pkcs8 -topk8 -nocrypt)",
                key.display()
            )
        })?;
        let pem = std::fs::read_to_string(cert).unwrap_or_default();
        Self::from_parts(params, key_pair, der, pem, pair.not_after)
    }

    fn from_parts(
        params: CertificateParams,
        key: KeyPair,
        der: CertificateDer<'static>,
        pem: String,
        not_after: SystemTime,
    ) -> Result<Ca, String> {
        let issuer = params
            .self_signed(&key)
            .map_err(|e| format!("intercept: cannot use the CA: {e}"))?;
        Ok(Ca {
            issuer,
            key,
            der,
            pem,
            not_after,
        })
    }

    /// A new CA that can sign for `hosts` only (and, for host names, their subdomains);
    /// every IP address is excluded unless a host is one.
    pub fn generate(hosts: &[String]) -> Result<(Ca, String), String> {
        if hosts.is_empty() {
            return Err(
                "intercept: no route names `hosts`; interception serves only hosts a route names"
                    .into(),
            );
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "token-proxy interception CA");
        dn.push(DnType::OrganizationName, "token-proxy");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(5 * 365);
        params.serial_number = Some(rand::random::<[u8; 16]>().to_vec().into());
        params.name_constraints = Some(constraints_for(hosts));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("intercept: cannot generate the CA key: {e}"))?;
        let key_pem = key.serialize_pem();
        let cert = params
            .clone()
            .self_signed(&key)
            .map_err(|e| format!("intercept: cannot make the CA certificate: {e}"))?;
        let der = cert.der().clone();
        let pem = cert.pem();
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(params.not_after.unix_timestamp().max(0) as u64);
        Ok((Self::from_parts(params, key, der, pem, not_after)?, key_pem))
    }

    /// Whether a certificate this CA signs for `host` passes its name constraints (an
    /// unconstrained CA permits everything).
    pub fn permits(&self, host: &str) -> bool {
        let Some(c) = &self.issuer.params().name_constraints else {
            return true;
        };
        let ip = host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .ok();
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let covers = |t: &GeneralSubtree| match (t, ip) {
            (GeneralSubtree::DnsName(name), None) => dns_covers(name, &host),
            (GeneralSubtree::IpAddress(net), Some(ip)) => ip_covers(net, ip),
            _ => false,
        };
        let same_kind = |t: &GeneralSubtree| {
            matches!(
                (t, ip),
                (GeneralSubtree::DnsName(_), None) | (GeneralSubtree::IpAddress(_), Some(_))
            )
        };
        if c.excluded_subtrees.iter().any(covers) {
            return false;
        }
        // RFC 5280 §4.2.1.10: permitted subtrees restrict only the name forms they list.
        !c.permitted_subtrees.iter().any(same_kind) || c.permitted_subtrees.iter().any(covers)
    }

    /// What this CA can sign for, for `check` and the logs.
    pub fn describe_constraints(&self) -> String {
        let Some(c) = &self.issuer.params().name_constraints else {
            return "ANY site (no name constraints)".into();
        };
        let show = |t: &GeneralSubtree| match t {
            GeneralSubtree::DnsName(n) => n.clone(),
            GeneralSubtree::IpAddress(CidrSubnet::V4(a, m)) => format!(
                "{}/{}",
                std::net::Ipv4Addr::from(*a),
                m.iter().map(|b| b.count_ones()).sum::<u32>()
            ),
            GeneralSubtree::IpAddress(CidrSubnet::V6(a, m)) => format!(
                "{}/{}",
                std::net::Ipv6Addr::from(*a),
                m.iter().map(|b| b.count_ones()).sum::<u32>()
            ),
            other => format!("{other:?}"),
        };
        let permitted: Vec<_> = c.permitted_subtrees.iter().map(show).collect();
        let excluded: Vec<_> = c.excluded_subtrees.iter().map(show).collect();
        format!(
            "only [{}] (and subdomains){}",
            permitted.join(", "),
            if excluded.is_empty() {
                String::new()
            } else {
                format!(", never [{}]", excluded.join(", "))
            }
        )
    }

    /// Whether the CA carries name constraints.
    pub fn constrained(&self) -> bool {
        self.issuer.params().name_constraints.is_some()
    }

    /// A leaf certificate for `host` with `leaf_key`, valid for `lifetime` (within the CA's
    /// own life), for TLS servers only.
    pub fn mint(
        &self,
        host: &str,
        leaf_key: &KeyPair,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, String> {
        let san = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|_| format!("{host:?} is not a DNS name"))?,
            ),
        };
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        let ca_end = time::OffsetDateTime::from_unix_timestamp(
            self.not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
        )
        .unwrap_or(now);
        params.not_after = (now + lifetime).min(ca_end);
        params.serial_number = Some(rand::random::<[u8; 16]>().to_vec().into());
        params
            .signed_by(leaf_key, &self.issuer, &self.key)
            .map(|c| c.der().clone())
            .map_err(|e| format!("cannot sign a certificate for {host}: {e}"))
    }
}

/// Name constraints for exactly `hosts` (ports stripped): DNS subtrees for names, /32 or
/// /128 for IP literals; with no IP literal, every IP address is excluded.
fn constraints_for(hosts: &[String]) -> NameConstraints {
    let mut permitted = Vec::new();
    let mut any_ip = false;
    for h in hosts {
        let subtree = match h.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => {
                any_ip = true;
                GeneralSubtree::IpAddress(CidrSubnet::V4(a.octets(), [255; 4]))
            }
            Ok(std::net::IpAddr::V6(a)) => {
                any_ip = true;
                GeneralSubtree::IpAddress(CidrSubnet::V6(a.octets(), [255; 16]))
            }
            Err(_) => GeneralSubtree::DnsName(h.clone()),
        };
        if !permitted.contains(&subtree) {
            permitted.push(subtree);
        }
    }
    let excluded = match any_ip {
        true => Vec::new(),
        false => vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    };
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

/// RFC 5280 DNS constraint: the name itself or any subdomain (a leading "." means only
/// subdomains).
fn dns_covers(constraint: &str, host: &str) -> bool {
    let c = constraint.trim_end_matches('.').to_ascii_lowercase();
    match c.strip_prefix('.') {
        Some(parent) => host.ends_with(&format!(".{parent}")),
        None => host == c || host.ends_with(&format!(".{c}")),
    }
}

fn ip_covers(net: &CidrSubnet, ip: std::net::IpAddr) -> bool {
    fn masked(a: &[u8], m: &[u8]) -> Vec<u8> {
        a.iter().zip(m).map(|(a, m)| a & m).collect()
    }
    match (net, ip) {
        (CidrSubnet::V4(a, m), std::net::IpAddr::V4(ip)) => masked(&ip.octets(), m) == masked(a, m),
        (CidrSubnet::V6(a, m), std::net::IpAddr::V6(ip)) => masked(&ip.octets(), m) == masked(a, m),
        _ => false,
    }
}

/// Write a generated CA: the key first (0600, never over an existing file), then the
/// certificate (0644); both fsynced, their directories created 0700.
pub fn write(cert: &Path, key: &Path, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    crate::files::create_new(key, key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("intercept.ca_key_file: cannot write {}: {e}", key.display()))?;
    crate::files::create_new(cert, cert_pem.as_bytes(), 0o644).map_err(|e| {
        format!(
            "intercept.ca_cert_file: cannot write {}: {e}",
            cert.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_ca_permits_only_the_routes_hosts() {
        let (ca, _) = Ca::generate(&["api.example.com".into(), "10.0.0.7".into()]).unwrap();
        assert!(ca.constrained());
        assert!(ca.permits("api.example.com"));
        assert!(ca.permits("API.example.com."));
        assert!(ca.permits("v2.api.example.com"));
        assert!(ca.permits("10.0.0.7"));
        assert!(!ca.permits("example.com"));
        assert!(!ca.permits("evil-api.example.com"));
        assert!(!ca.permits("www.google.com"));
        assert!(!ca.permits("10.0.0.8"));
        let (names_only, _) = Ca::generate(&["api.example.com".into()]).unwrap();
        assert!(!names_only.permits("127.0.0.1"), "every IP excluded");
        assert!(names_only
            .describe_constraints()
            .contains("api.example.com"));
        assert!(Ca::generate(&[]).is_err());
    }

    #[test]
    fn dns_constraints_follow_rfc5280() {
        assert!(dns_covers("example.com", "example.com"));
        assert!(dns_covers("example.com", "a.b.example.com"));
        assert!(!dns_covers("example.com", "badexample.com"));
        assert!(dns_covers(".example.com", "a.example.com"));
        assert!(!dns_covers(".example.com", "example.com"));
    }
}
