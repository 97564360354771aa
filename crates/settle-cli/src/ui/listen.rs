//! `settle ui --listen`: an IP address with its port, or a host name with
//! its port (`localhost:8080`), resolved once at start.

use std::net::{SocketAddr, ToSocketAddrs};

/// Where `settle ui` serves, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse() {
            return Ok(Self::Addr(addr));
        }
        let bad = || format!("{s:?} is not HOST:PORT (e.g. 127.0.0.1:8080 or localhost:8080)");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        // A name: letters, digits, dots, dashes, underscores. An IPv6
        // address without its brackets, or anything with a space, is not.
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad());
        }
        Ok(Self::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why `--listen` cannot be served on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--listen {listen}: cannot resolve {host}")]
    Resolve {
        listen: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--listen {listen}: {host} resolves to no address")]
    NoAddress { listen: String, host: String },
    /// Anything but loopback needs a token: anyone who can reach the
    /// server could retry runs.
    #[error(
        "{what}: anyone who can reach it could retry runs; give --token (or SETTLE_UI_TOKEN), \
         or listen on 127.0.0.1 or localhost"
    )]
    NotLoopback { what: String },
}

impl Listen {
    /// The addresses to bind (the first that binds is served on): the
    /// address given, or every address the name resolves to. Without a
    /// token they must all be loopback: a name that resolves to another
    /// address too is refused, naming what it resolved to.
    pub fn addrs(&self, token: bool) -> Result<Vec<SocketAddr>, ListenError> {
        let addrs = match self {
            Self::Addr(a) => vec![*a],
            Self::Name { host, port } => (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|source| ListenError::Resolve {
                    listen: self.to_string(),
                    host: host.clone(),
                    source,
                })?
                .collect(),
        };
        self.check(addrs, token)
    }

    fn check(&self, addrs: Vec<SocketAddr>, token: bool) -> Result<Vec<SocketAddr>, ListenError> {
        if addrs.is_empty() {
            let host = self.host().unwrap_or_default().to_owned();
            return Err(ListenError::NoAddress {
                listen: self.to_string(),
                host,
            });
        }
        if token || addrs.iter().all(|a| a.ip().is_loopback()) {
            return Ok(addrs);
        }
        let what = match self {
            Self::Addr(a) => format!("--listen {a} is not a loopback address"),
            Self::Name { host, .. } => {
                let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                format!(
                    "--listen {self}: {host} resolves to {}, not only to loopback addresses",
                    ips.join(", ")
                )
            }
        };
        Err(ListenError::NotLoopback { what })
    }

    /// The host name given, if a name was.
    pub fn host(&self) -> Option<&str> {
        match self {
            Self::Addr(_) => None,
            Self::Name { host, .. } => Some(host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(s: &str) -> Listen {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_names_with_ports_parse() {
        assert_eq!(
            listen("127.0.0.1:8080"),
            Listen::Addr("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(listen("[::1]:0"), Listen::Addr("[::1]:0".parse().unwrap()));
        assert_eq!(
            listen("localhost:8080"),
            Listen::Name {
                host: "localhost".into(),
                port: 8080
            }
        );
        for bad in [
            "localhost",
            "localhost:",
            ":8080",
            "a b:80",
            "::1:80",
            "host:99999",
        ] {
            let err = bad.parse::<Listen>().unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn localhost_resolves_to_loopback_only() {
        let addrs = listen("localhost:0").addrs(false).unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[test]
    fn a_name_with_any_other_address_needs_a_token() {
        let name = listen("box:8080");
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "192.0.2.7:8080".parse().unwrap(),
        ];
        let err = name.check(addrs.clone(), false).unwrap_err().to_string();
        assert_eq!(
            err,
            "--listen box:8080: box resolves to 127.0.0.1, 192.0.2.7, not only to loopback \
             addresses: anyone who can reach it could retry runs; give --token \
             (or SETTLE_UI_TOKEN), or listen on 127.0.0.1 or localhost"
        );
        assert_eq!(name.check(addrs.clone(), true).unwrap(), addrs);
        let any = listen("0.0.0.0:8080");
        let err = any.addrs(false).unwrap_err().to_string();
        assert!(
            err.starts_with("--listen 0.0.0.0:8080 is not a loopback address: "),
            "{err}"
        );
        assert!(any.addrs(true).is_ok());
    }

    #[test]
    fn an_unknown_name_is_refused_with_its_cause() {
        // .invalid never resolves (RFC 6761).
        let err = listen("nowhere.invalid:8080").addrs(false).unwrap_err();
        assert!(matches!(err, ListenError::Resolve { .. }), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            err.to_string(),
            "--listen nowhere.invalid:8080: cannot resolve nowhere.invalid"
        );
    }
}
