//! The issuer URL of the discovery document: `https://HOST[:PORT]`, with nothing after the
//! authority, since the document's own address and `jwks_uri` are derived from it and a
//! relying party compares it byte for byte with what it was configured with.

use std::net::{IpAddr, SocketAddr};

use super::OidcConfigError;

/// The host part of an issuer URL: the name clients dial, and so the name the serving
/// certificate must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerHost {
    /// A DNS name, lowercase.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

/// A checked issuer URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    url: String,
    host: IssuerHost,
}

impl Issuer {
    /// The issuer of a listener on `addr` when none is configured: `https://<addr>`.
    ///
    /// # Errors
    /// [`OidcConfigError::Issuer`] when `addr` is unspecified (0.0.0.0 or ::): no client can
    /// dial that address, so an issuer must be given.
    pub fn of_addr(addr: SocketAddr) -> Result<Self, OidcConfigError> {
        if addr.ip().is_unspecified() {
            return Err(OidcConfigError::UnspecifiedBind(addr));
        }
        Ok(Self {
            url: format!("https://{addr}"),
            host: IssuerHost::Ip(addr.ip()),
        })
    }

    /// The issuer as written; a trailing slash is dropped.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The host clients dial.
    pub fn host(&self) -> &IssuerHost {
        &self.host
    }

    /// The JWKS address the discovery document names.
    pub fn jwks_uri(&self) -> String {
        format!("{}/keys", self.url)
    }
}

impl std::str::FromStr for Issuer {
    type Err = OidcConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &'static str| OidcConfigError::Issuer {
            value: crate::text::escape_bounded(text, 120).into_owned(),
            why,
        };
        let rest = text
            .strip_prefix("https://")
            .ok_or_else(|| bad("it must start with https://"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad(
                "it must have no path, query or fragment (the document is served at the root)",
            ));
        }
        if authority.contains('@') {
            return Err(bad("it must not carry user information"));
        }
        let (host, port) = split_port(authority).ok_or_else(|| bad("its port is not a number"))?;
        if port == Some(0) {
            return Err(bad("its port is 0"));
        }
        let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            IssuerHost::Ip(IpAddr::V6(
                v6.parse()
                    .map_err(|_| bad("its IPv6 address is malformed"))?,
            ))
        } else if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            IssuerHost::Ip(IpAddr::V4(ip))
        } else {
            let name = host.to_ascii_lowercase();
            crate::dns_name::check(&name)
                .map_err(|_| bad("its host is not a DNS name or an IP address"))?;
            IssuerHost::Dns(name)
        };
        Ok(Self {
            url: format!("https://{authority}"),
            host,
        })
    }
}

/// `host[:port]` split; `None` when a port is present but not a number. An IPv6 host is
/// bracketed, so its colons are not taken for the port's.
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let port_at = match authority.rfind(']') {
        Some(close) => authority[close..].find(':').map(|i| close + i),
        None => authority.rfind(':'),
    };
    match port_at {
        Some(i) => Some((&authority[..i], Some(authority[i + 1..].parse().ok()?))),
        None => Some((authority, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_ports_are_read_and_a_trailing_slash_dropped() {
        let i: Issuer = "https://OIDC.Example.com/".parse().unwrap();
        assert_eq!(i.as_str(), "https://OIDC.Example.com");
        assert_eq!(i.host(), &IssuerHost::Dns("oidc.example.com".into()));
        assert_eq!(i.jwks_uri(), "https://OIDC.Example.com/keys");
        let i: Issuer = "https://127.0.0.1:8443".parse().unwrap();
        assert_eq!(i.host(), &IssuerHost::Ip("127.0.0.1".parse().unwrap()));
        let i: Issuer = "https://[::1]:8443".parse().unwrap();
        assert_eq!(i.host(), &IssuerHost::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn anything_but_an_https_origin_is_refused() {
        for bad in [
            "http://oidc.example.com",
            "https://oidc.example.com/mayfly",
            "https://oidc.example.com?x=1",
            "https://user@oidc.example.com",
            "https://oidc.example.com:port",
            "https://oidc.example.com:0",
            "https://[::1",
            "https://under_score.example.com",
            "https://",
        ] {
            assert!(bad.parse::<Issuer>().is_err(), "{bad}");
        }
        assert!("https://oidc.example.com".parse::<Issuer>().is_ok());
    }

    #[test]
    fn an_unspecified_bind_address_gives_no_issuer() {
        assert!(Issuer::of_addr("0.0.0.0:443".parse().unwrap()).is_err());
        let i = Issuer::of_addr("127.0.0.1:443".parse().unwrap()).unwrap();
        assert_eq!(i.as_str(), "https://127.0.0.1:443");
    }
}
