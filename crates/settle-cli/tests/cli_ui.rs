//! End-to-end tests of `settle ui` on the real binary and the embedded
//! backend, over plain HTTP/1.1 on 127.0.0.1: the pages show the exact
//! tally, retries move exactly what they say, and every refused request
//! leaves the tally as it was.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An item id that is also markup: every page must escape it.
const MARKUP_ID: &str = "<p&\"1>";
const RETRYABLE: &str = "retryable failure 3 of 3 (scripted)";
const PERMANENT: &str = "permanent failure (scripted)";

/// Five items at max receives 3: two succeed; r1 and r2 fail after three
/// attempts (and succeed on a fourth), the markup id fails for good.
fn failed_run(env: &Env) -> String {
    let items = env.scripts(
        "i.jsonl",
        &[
            ("ok1", "ok"),
            ("r1", "retryable:3"),
            ("ok2", "ok"),
            ("r2", "retryable:3"),
            (MARKUP_ID, "permanent"),
        ],
    );
    let run = env.run(&items, &["--max-receives", "3"]);
    assert_run(&run, "partial", 5, 2, 3, 0);
    run_id(&run)
}

/// A running `settle ui`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(env: &Env, extra: &[&str]) -> Self {
        let mut args = vec!["ui", "--listen", "127.0.0.1:0"];
        args.extend(FAST);
        args.extend(extra);
        let mut child = env.spawn(&args);
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split(" on http://").nth(1) {
                    if let Some(tx) = tx.take() {
                        let addr = rest.split('/').next().unwrap().to_owned();
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "settle ui did not say where it listens\nstderr:\n{}",
                    log.lock().unwrap()
                )
            });
        Self {
            child,
            addr,
            stderr: log,
        }
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A request with this server's Host unless `headers` names one.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "POST" {
            req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        Resp::parse(&raw)
    }

    fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], "")
    }

    /// A POST as this server's own page sends it.
    fn post(&self, path: &str, body: &str) -> Resp {
        let origin = self.origin();
        self.request("POST", path, &[("Origin", &origin)], body)
    }

    fn tally(&self, run: &str) -> Value {
        let r = self.get(&format!("/api/runs/{run}"));
        r.expect(200);
        serde_json::from_str(&r.body).unwrap()
    }

    /// Waits until the run has settled and this server is not processing
    /// a retry, and returns the tally.
    fn settled(&self, run: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.tally(run);
            if v["pending"] == 0 && v["redriving"] == false && v["busy"] == false {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "run {run} did not settle: {v}\nstderr:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            unchunk(body)
        } else {
            body.to_owned()
        };
        Self {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn expect(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "body:\n{}", self.body);
        self
    }

    fn has(&self, needle: &str) -> &Self {
        assert!(
            self.body.contains(needle),
            "the page does not contain {needle:?}:\n{}",
            self.body
        );
        self
    }
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The rows of a run page's "Failures by reason": (count, reason).
fn reason_rows(html: &str) -> Vec<(u64, String)> {
    html.split("<td class=\"count\">")
        .skip(1)
        .map(|row| {
            let (n, rest) = row.split_once("</td>").unwrap();
            let text = rest
                .split("\">")
                .nth(2)
                .unwrap()
                .split("</a>")
                .next()
                .unwrap();
            (n.parse().unwrap(), text.to_owned())
        })
        .collect()
}

fn form_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[test]
fn pages_show_the_exact_tally_and_failures_by_reason() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start(&env, &[]);

    let runs = ui.get("/");
    runs.expect(200)
        .has(&format!("<a href=\"/runs/{run}\">{run}</a>"))
        .has("<td class=\"status partial\">partial</td>")
        .has("<td class=\"tally\">2 succeeded / 3 failed / 0 pending of 5</td>");
    assert_eq!(
        runs.header("content-security-policy")
            .map(|v| v.contains("frame-ancestors 'none'")),
        Some(true)
    );

    let page = ui.get(&format!("/runs/{run}"));
    page.expect(200)
        .has("<span data-field=\"succeeded\">2</span> succeeded / <span data-field=\"failed\">3</span> failed / <span data-field=\"pending\">0</span> pending of <span data-field=\"total\">5</span>")
        .has("Retry all failed");
    assert_eq!(
        reason_rows(&page.body),
        [(2, RETRYABLE.to_owned()), (1, PERMANENT.to_owned())]
    );
    // The markup id is text on every page, never markup.
    page.has("&lt;p&amp;&quot;1&gt;");
    assert!(!page.body.contains(MARKUP_ID), "{}", page.body);
    assert_eq!(page.body.matches("<td class=\"item\">").count(), 3);

    // Filtered by reason: only that reason's items.
    let only = ui.get(&format!("/runs/{run}?reason={}", form_value(RETRYABLE)));
    only.expect(200);
    assert_eq!(only.body.matches("<td class=\"item\">").count(), 2);
    only.has(">r1</a>").has(">r2</a>");
    assert!(!only.body.contains("&lt;p&amp;"), "{}", only.body);

    // The item page: every attempt, and the retry button.
    let item = ui.get(&format!("/runs/{run}/item?id=r1"));
    item.expect(200).has("Retry this item").has(RETRYABLE);
    assert_eq!(item.body.matches("<td class=\"outcome\">").count(), 3);
    let markup = ui.get(&format!("/runs/{run}/item?id={}", form_value(MARKUP_ID)));
    markup
        .expect(200)
        .has("<code>&lt;p&amp;&quot;1&gt;</code>")
        .has("failed (permanent, terminal)");
    ui.get(&format!("/runs/{run}/item?id=nope")).expect(404);
    ui.get("/runs/r20990101T000000Z-000000").expect(404);

    // The live tally's JSON, and the results as `settle results` writes them.
    let v = ui.tally(&run);
    assert_eq!(
        (
            &v["succeeded"],
            &v["failed"],
            &v["pending"],
            &v["total"],
            &v["status"],
            &v["busy"]
        ),
        (
            &2.into(),
            &3.into(),
            &0.into(),
            &5.into(),
            &"partial".into(),
            &false.into()
        )
    );
    let results = ui.get(&format!("/runs/{run}/results.jsonl"));
    results.expect(200);
    assert_eq!(results.header("content-type"), Some("application/x-ndjson"));
    let cli = env.settle(&["results", &run]);
    cli.expect_code(0);
    assert_eq!(results.body, cli.stdout);
    assert_eq!(results.body.lines().count(), 5);

    let metrics = ui.get("/metrics");
    metrics.expect(200);
    for line in [
        format!("settle_run_items{{run=\"{run}\",status=\"succeeded\"}} 2"),
        format!("settle_run_items{{run=\"{run}\",status=\"failed\"}} 3"),
        format!("settle_run_items{{run=\"{run}\",status=\"pending\"}} 0"),
        format!("settle_run_items{{run=\"{run}\",status=\"total\"}} 5"),
        "settle_ui_retries_total 0".to_owned(),
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line} in\n{}",
            metrics.body
        );
    }
}

#[test]
fn a_retry_moves_exactly_what_it_confirmed() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start(&env, &[]);

    // One item: the confirm step says 1, the retry moves it, it succeeds.
    ui.get(&format!("/runs/{run}/retry?scope=item&item=r1"))
        .expect(200)
        .has("This will move <strong data-field=\"will-move\">1</strong> item");
    ui.post(&format!("/runs/{run}/retry"), "scope=item&item=r1")
        .expect(200)
        .has("Moved <strong data-field=\"moved\">1</strong> item; not moved: <strong data-field=\"not-moved\">0</strong>");
    let v = ui.settled(&run);
    assert_eq!(
        (&v["succeeded"], &v["failed"], &v["status"]),
        (&3.into(), &2.into(), &"partial".into())
    );
    let r1 = env.show(&run, "r1");
    assert_eq!(
        (&r1["status"], &r1["attempts"]),
        (&"succeeded".into(), &4.into())
    );
    let r2 = env.show(&run, "r2");
    assert_eq!(
        (&r2["status"], &r2["attempts"]),
        (&"failed".into(), &3.into())
    );
    // An item that has not failed is not retried.
    ui.post(&format!("/runs/{run}/retry"), "scope=item&item=r1")
        .expect(409);

    // All failed: exactly the two left; the permanent one fails again.
    ui.get(&format!("/runs/{run}/retry?scope=all"))
        .expect(200)
        .has("This will move <strong data-field=\"will-move\">2</strong> items");
    ui.post(&format!("/runs/{run}/retry"), "scope=all")
        .expect(200)
        .has("Moved <strong data-field=\"moved\">2</strong> items; not moved: <strong data-field=\"not-moved\">0</strong>");
    let v = ui.settled(&run);
    assert_eq!(
        (&v["succeeded"], &v["failed"], &v["total"]),
        (&4.into(), &1.into(), &5.into())
    );
    let failures = env.failures(&run);
    let ids: Vec<&str> = failures["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MARKUP_ID]);
    assert_eq!(env.show(&run, MARKUP_ID)["attempts"], 2);
    for ok in ["ok1", "ok2"] {
        assert_eq!(
            env.show(&run, ok)["attempts"],
            1,
            "{ok} was not attempted again"
        );
    }

    // By reason: the permanent one alone.
    ui.get(&format!(
        "/runs/{run}/retry?scope=reason&reason={}",
        form_value(PERMANENT)
    ))
    .expect(200)
    .has("<strong data-field=\"will-move\">1</strong> item");
    ui.post(
        &format!("/runs/{run}/retry"),
        &format!("scope=reason&reason={}", form_value(PERMANENT)),
    )
    .expect(200)
    .has("Moved <strong data-field=\"moved\">1</strong> item");
    let v = ui.settled(&run);
    assert_eq!((&v["succeeded"], &v["failed"]), (&4.into(), &1.into()));
    assert_eq!(env.show(&run, MARKUP_ID)["attempts"], 3);

    let metrics = ui.get("/metrics");
    for line in [
        "settle_ui_retries_total 3",
        "settle_ui_retried_items_total 4",
        "settle_ui_retry_not_moved_total 0",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line} in\n{}",
            metrics.body
        );
    }
}

/// What a refused request must not have changed: the tally, and the
/// dead letters a redrive would move.
fn unchanged(env: &Env, ui: &Server, run: &str) {
    let v = ui.tally(run);
    assert_eq!(
        (
            &v["succeeded"],
            &v["failed"],
            &v["pending"],
            &v["redriving"]
        ),
        (&2.into(), &3.into(), &0.into(), &false.into())
    );
    let dry = env.ok_json(&["redrive", run, "--dry-run", "--json"]);
    assert_eq!(dry["would_redrive"], 3, "{dry}");
}

#[test]
fn cross_site_and_misdirected_requests_are_refused() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start(&env, &[]);
    let retry = format!("/runs/{run}/retry");
    let host = ui.addr.clone();

    // No Origin and no Sec-Fetch-Site: not from a page of this server.
    ui.request("POST", &retry, &[], "scope=all").expect(403);
    unchanged(&env, &ui, &run);
    ui.request(
        "POST",
        &retry,
        &[("Origin", "http://evil.example")],
        "scope=all",
    )
    .expect(403);
    ui.request("POST", &retry, &[("Origin", "null")], "scope=all")
        .expect(403);
    ui.request(
        "POST",
        &retry,
        &[("Sec-Fetch-Site", "cross-site")],
        "scope=all",
    )
    .expect(403);
    let origin = ui.origin();
    ui.request(
        "POST",
        &retry,
        &[("Origin", &origin), ("Sec-Fetch-Site", "same-site")],
        "scope=all",
    )
    .expect(403);
    unchanged(&env, &ui, &run);

    // DNS rebinding: a name that is not this server's, even with a
    // matching Origin.
    let evil = format!("evil.example:{}", ui.port());
    let evil_origin = format!("http://{evil}");
    ui.request("GET", "/", &[("Host", &evil)], "").expect(421);
    ui.request(
        "POST",
        &retry,
        &[("Host", &evil), ("Origin", &evil_origin)],
        "scope=all",
    )
    .expect(421);
    ui.request("GET", "/", &[("Host", "127.0.0.1")], "")
        .expect(421);
    unchanged(&env, &ui, &run);
    // The loopback names with the port are this server's.
    let localhost = format!("localhost:{}", ui.port());
    ui.request("GET", "/", &[("Host", &localhost)], "")
        .expect(200);
    ui.request("GET", "/", &[("Host", &host)], "").expect(200);
    drop(ui);

    // --allow-host adds a name.
    let ui = Server::start(&env, &["--allow-host", "ops.internal"]);
    let ops = format!("ops.internal:{}", ui.port());
    ui.request("GET", "/", &[("Host", &ops)], "").expect(200);
    unchanged(&env, &ui, &run);
}

#[test]
fn read_only_hides_and_refuses_every_action() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start(&env, &["--read-only"]);
    let page = ui.get(&format!("/runs/{run}"));
    page.expect(200);
    assert!(!page.body.contains("Retry"), "{}", page.body);
    let item = ui.get(&format!("/runs/{run}/item?id=r1"));
    item.expect(200);
    assert!(!item.body.contains("Retry"), "{}", item.body);
    ui.get(&format!("/runs/{run}/retry?scope=all")).expect(403);
    for body in ["scope=all", "scope=item&item=r1"] {
        ui.post(&format!("/runs/{run}/retry"), body).expect(403);
    }
    unchanged(&env, &ui, &run);
}

#[test]
fn the_token_is_needed_on_every_request() {
    let env = Env::new();
    let run = failed_run(&env);

    // Not loopback and no token: refused before anything listens.
    let out = env.settle(&["ui", "--listen", "0.0.0.0:0"]);
    out.expect_code(2).stderr_has("is not a loopback address");
    let out = env.settle(&["ui", "--token", " "]);
    out.expect_code(2).stderr_has("must not be empty");

    let ui = Server::start(&env, &["--token", "s3cret"]);
    let retry = format!("/runs/{run}/retry");
    let origin = ui.origin();
    ui.get("/").expect(401);
    ui.get(&format!("/api/runs/{run}")).expect(401);
    ui.get("/metrics").expect(401);
    ui.request("GET", "/", &[("Authorization", "Bearer wrong")], "")
        .expect(401);
    ui.request("POST", &retry, &[("Origin", &origin)], "scope=all")
        .expect(401);
    ui.request("GET", "/?token=wrong", &[], "").expect(401);

    let bearer = [("Authorization", "Bearer s3cret")];
    ui.request("GET", "/", &bearer, "").expect(200).has(&run);
    // ?token= once sets the cookie and sends the browser on without it.
    let set = ui.request("GET", &format!("/runs/{run}?token=s3cret"), &[], "");
    set.expect(303);
    assert_eq!(
        set.header("location"),
        Some(format!("/runs/{run}").as_str())
    );
    let cookie = set.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();
    ui.request("GET", &format!("/runs/{run}"), &[("Cookie", &cookie)], "")
        .expect(200);
    // The token does not stand in for the Origin check.
    ui.request(
        "POST",
        &retry,
        &[bearer[0], ("Origin", "http://evil.example")],
        "scope=all",
    )
    .expect(403);
    let v: Value = serde_json::from_str(
        &ui.request("GET", &format!("/api/runs/{run}"), &bearer, "")
            .body,
    )
    .unwrap();
    assert_eq!(
        (&v["succeeded"], &v["failed"], &v["redriving"]),
        (&2.into(), &3.into(), &false.into())
    );
    let dry = env.ok_json(&["redrive", &run, "--dry-run", "--json"]);
    assert_eq!(dry["would_redrive"], 3, "{dry}");
}
