//! What every request must pass before a page sees it: its Host header is
//! one this server is reached by (against DNS rebinding), it carries the
//! token when one is set, and a state-changing request (always a POST)
//! comes from this server's own pages (against cross-site requests) and
//! is not refused by `--read-only`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// The cookie that `?token=` sets, so that a browser need not send the
/// header.
pub const TOKEN_COOKIE: &str = "settle_ui_token";

/// What the guard checks against, fixed when the server starts.
#[derive(Debug)]
pub struct Guard {
    /// Host header values accepted, lowercase.
    hosts: Vec<String>,
    token: Option<String>,
    pub read_only: bool,
}

impl Guard {
    /// `addr` is the bound address (its real port, also when 0 was asked).
    pub fn new(addr: SocketAddr, token: Option<String>, extra: &[String], read_only: bool) -> Self {
        let port = addr.port();
        let mut hosts = vec![
            addr.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        for h in extra {
            let h = h.trim().to_ascii_lowercase();
            // A bare name is accepted with the server's port; a name with
            // a port, as given.
            if h.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !h.ends_with(']')
            {
                hosts.push(h);
            } else {
                hosts.push(format!("{h}:{port}"));
            }
        }
        Self {
            hosts,
            token,
            read_only,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    fn token_ok(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|t| same(t.trim(), token));
        bearer
            || headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .any(|(k, v)| k == TOKEN_COOKIE && same(v, token))
    }
}

/// Compares in time that does not depend on where the strings differ, so
/// that response times do not give the token away byte by byte.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a POST comes from a page of this server: its Origin is this
/// Host's, or (a browser that sends no Origin) Sec-Fetch-Site says
/// same-origin or none (typed by the user). A request with neither is
/// refused: every browser that could be tricked into sending one sends one
/// of them, and a script can set Origin itself.
fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return false;
    }
    match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
        Some(Ok(origin)) => {
            let origin = origin.to_ascii_lowercase();
            origin == format!("http://{}", host.to_ascii_lowercase())
        }
        Some(Err(_)) => false,
        None => site.is_some(),
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response()
}

/// The middleware: refuses what does not pass, and adds the headers that
/// keep pages out of other sites' frames and their addresses from other sites.
pub async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !guard.host_allowed(&host) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this server does not answer to that Host (see settle ui --allow-host)",
        );
    }
    if !guard.token_ok(headers) {
        // `?token=` once: sets the cookie and sends the browser on without
        // the token in its address bar and history.
        if let Some(token) = &guard.token {
            if let Some(given) = query_token(req.uri().query()) {
                if same(&given, token) {
                    // A path of "//host/..." (or "/\\host/...", which
                    // browsers read the same) would send the browser to
                    // another site: such a path goes to the runs page.
                    let path = req.uri().path();
                    let mut to = if path.starts_with("//") || path.starts_with("/\\") {
                        "/".to_owned()
                    } else {
                        path.to_owned()
                    };
                    let rest = strip_token(req.uri().query().unwrap_or(""));
                    if !rest.is_empty() {
                        to.push('?');
                        to.push_str(&rest);
                    }
                    return (
                        StatusCode::SEE_OTHER,
                        [
                            (header::LOCATION, to),
                            (
                                header::SET_COOKIE,
                                format!(
                                    "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                                ),
                            ),
                        ],
                    )
                        .into_response();
                }
            }
        }
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a token is needed: Authorization: Bearer TOKEN, or open a page with ?token=TOKEN",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if guard.read_only {
            return refuse(StatusCode::FORBIDDEN, "read-only: actions are refused");
        }
        if !same_origin(headers, &host) {
            return refuse(
                StatusCode::FORBIDDEN,
                "cross-site request refused: the Origin is not this server's",
            );
        }
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    // Not `no-referrer`: under it a browser sends `Origin: null` with a
    // form's POST, which the origin check must refuse.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| super::html::url_decode(v))
}

fn strip_token(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("token="))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hosts_are_the_listen_address_loopback_names_and_the_allowed() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap_or_else(|_| unreachable!());
        let g = Guard::new(
            addr,
            None,
            &["ops.example".into(), "Box:9000".into()],
            false,
        );
        for ok in [
            "0.0.0.0:8080",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "ops.example:8080",
            "box:9000",
            "LOCALHOST:8080",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:8080",
            "localhost",
            "localhost:80",
            "ops.example",
            "127.0.0.1:8081",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn a_post_must_come_from_this_origin() {
        let host = "127.0.0.1:8080";
        assert!(same_origin(
            &headers(&[("origin", "http://127.0.0.1:8080")]),
            host
        ));
        assert!(same_origin(
            &headers(&[("sec-fetch-site", "same-origin")]),
            host
        ));
        assert!(same_origin(&headers(&[("sec-fetch-site", "none")]), host));
        assert!(!same_origin(&headers(&[]), host));
        assert!(!same_origin(
            &headers(&[("origin", "http://evil.example")]),
            host
        ));
        assert!(!same_origin(&headers(&[("origin", "null")]), host));
        assert!(!same_origin(
            &headers(&[("origin", "https://127.0.0.1:8080")]),
            host
        ));
        assert!(!same_origin(
            &headers(&[
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site")
            ]),
            host
        ));
    }

    #[test]
    fn the_token_comes_as_a_bearer_header_or_the_cookie() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        let g = Guard::new(addr, Some("s3cret".into()), &[], false);
        assert!(g.token_ok(&headers(&[("authorization", "Bearer s3cret")])));
        assert!(g.token_ok(&headers(&[("cookie", "a=b; settle_ui_token=s3cret")])));
        assert!(!g.token_ok(&headers(&[])));
        assert!(!g.token_ok(&headers(&[("authorization", "Bearer s3cre")])));
        assert!(!g.token_ok(&headers(&[("cookie", "settle_ui_token=wrong")])));
        assert!(!g.token_ok(&headers(&[("authorization", "Basic s3cret")])));
        assert_eq!(strip_token("token=x&reason=a"), "reason=a");
    }
}
