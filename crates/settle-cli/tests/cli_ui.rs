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

/// How these tests run and retry: quick retries, and the default
/// visibility timeout (30 s). Nothing here hangs, so a short one (the
/// common FAST) would buy nothing, and on the emulator under load a
/// visibility extension answered seconds late would let a held message's
/// copy come back and use up one of an item's three receives.
const QUICK: [&str; 2] = ["--retry-delay-ms", "20"];

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
    let mut args = vec!["run", "--items", &items, "--json", "--max-receives", "3"];
    args.extend(QUICK);
    let run = env.ok_json(&args);
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
        Self::start_on(env, "127.0.0.1:0", extra)
    }

    fn start_on(env: &Env, listen: &str, extra: &[&str]) -> Self {
        let mut args = vec!["ui", "--listen", listen];
        args.extend(QUICK);
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

    /// A request with this server's Host unless `headers` names one; a
    /// POST's body is a form.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let body = (method == "POST").then_some(("application/x-www-form-urlencoded", body));
        raw(&self.addr, method, path, headers, body)
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

/// One HTTP/1.1 request on its own connection, with `addr` as its Host
/// unless `headers` names one, and `body` with its content type.
fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((kind, body)) = body {
        req.push_str(&format!(
            "Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).unwrap();
    // Up to the body's Content-Length (some servers keep the connection
    // open after it), else to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
    }
    Resp::parse(&raw)
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
        .has("<td class=\"status partial\" data-field=\"status\">partial</td>")
        .has(
            "<td class=\"tally\" data-field=\"tally\">2 succeeded / 3 failed / 0 pending of 5</td>",
        );
    // A settled run is not polled.
    assert!(!runs.body.contains("data-live-run"), "{}", runs.body);
    assert_eq!(
        runs.header("content-security-policy")
            .map(|v| v.contains("frame-ancestors 'none'")),
        Some(true)
    );

    let page = ui.get(&format!("/runs/{run}"));
    page.expect(200)
        .has("<span data-field=\"succeeded\">2</span> succeeded / <span data-field=\"failed\">3</span> failed / <span data-field=\"pending\">0</span> pending of <span data-field=\"total\">5</span>")
        .has("Retry all failed");
    // Nothing was throttled: no line says it.
    assert!(
        !page.body.contains("data-field=\"throttled\""),
        "{}",
        page.body
    );
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

/// Retries r1 alone as the pages do: the confirm step says 1, the POST
/// moves 1.
#[test]
fn a_run_page_counts_throttled_answers_apart() {
    let env = Env::new();
    let items = env.scripts("t.jsonl", &[("ok", "ok"), ("t", "throttled:2")]);
    let mut args = vec!["run", "--items", &items, "--json"];
    args.extend(QUICK);
    let run = env.ok_json(&args);
    assert_run(&run, "succeeded", 2, 2, 0, 0);
    let ui = Server::start(&env, &[]);
    ui.get(&format!("/runs/{}", run_id(&run)))
        .expect(200)
        .has("throttled <span data-field=\"throttled\">2</span> times by the service called (not failures; no attempt used)");
}

fn retry_r1(ui: &Server, run: &str) {
    ui.get(&format!("/runs/{run}/retry?scope=item&item=r1"))
        .expect(200)
        .has("This will move <strong data-field=\"will-move\">1</strong> item");
    ui.post(&format!("/runs/{run}/retry"), "scope=item&item=r1")
        .expect(200)
        .has("Moved <strong data-field=\"moved\">1</strong> item; not moved: <strong data-field=\"not-moved\">0</strong>");
}

#[test]
fn a_retry_moves_exactly_what_it_confirmed() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start(&env, &[]);

    // One item: the confirm step says 1, the retry moves it, it succeeds.
    retry_r1(&ui, &run);
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

    // Selected items: the confirm step counts them; an item that has not
    // failed (any more) is left as it is, and said so; a selection with no
    // failed item, an empty one, a too large one, several items under
    // scope=item, or a body that is not a form are refused before anything
    // moves.
    let selected = format!("scope=selected&item=r2&item={}", form_value(MARKUP_ID));
    ui.get(&format!("/runs/{run}/retry?{selected}"))
        .expect(200)
        .has("This will move <strong data-field=\"will-move\">2</strong> items (the 2 selected items that have failed)")
        .has("<input type=\"hidden\" name=\"item\" value=\"r2\"><input type=\"hidden\" name=\"item\" value=\"&lt;p&amp;&quot;1&gt;\">");
    let stale = ui.get(&format!(
        "/runs/{run}/retry?scope=selected&item=r2&item=ok1&item=r2"
    ));
    stale
        .expect(200)
        .has("<strong data-field=\"will-move\">1</strong> item (the 1 selected item that has failed)")
        .has("<p class=\"left\">Not failed, so left as they are: <code>ok1</code> (succeeded).</p>");
    let retry = format!("/runs/{run}/retry");
    ui.post(&retry, "scope=selected&item=ok1&item=r1")
        .expect(409)
        .has("item &quot;ok1&quot; has not failed (it is succeeded)");
    ui.post(&retry, "scope=selected")
        .expect(400)
        .has("no items selected");
    ui.post(&retry, "scope=item&item=r2&item=ok1")
        .expect(400)
        .has("scope=item takes exactly one item=");
    let many: String = (0..1001).map(|i| format!("&item=x{i}")).collect();
    ui.post(&retry, &format!("scope=selected{many}"))
        .expect(400)
        .has("1001 items selected: one retry takes at most 1000");
    ui.post(&retry, "scope=selected&item=r2&item=nope")
        .expect(404)
        .has("no record of item &quot;nope&quot;");
    let origin = ui.origin();
    raw(
        &ui.addr,
        "POST",
        &retry,
        &[("Origin", &origin)],
        Some(("text/plain", "scope=all")),
    )
    .expect(415);
    unchanged_at(&env, &ui, &run, 3, 2);

    // The stale selection posted as it was: r2 moves, ok1 is not touched.
    ui.post(&retry, "scope=selected&item=r2&item=ok1")
        .expect(200)
        .has("Moved <strong data-field=\"moved\">1</strong> item; not moved: <strong data-field=\"not-moved\">0</strong>")
        .has("left as they are: <code>ok1</code> (succeeded)");
    let v = ui.settled(&run);
    assert_eq!((&v["succeeded"], &v["failed"]), (&4.into(), &1.into()));
    let r2 = env.show(&run, "r2");
    assert_eq!(
        (&r2["status"], &r2["attempts"]),
        (&"succeeded".into(), &4.into())
    );

    // All failed: exactly the one left, which fails again.
    ui.get(&format!("/runs/{run}/retry?scope=all"))
        .expect(200)
        .has("This will move <strong data-field=\"will-move\">1</strong> item");
    ui.post(&retry, "scope=all")
        .expect(200)
        .has("Moved <strong data-field=\"moved\">1</strong> item; not moved: <strong data-field=\"not-moved\">0</strong>");
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
        "settle_ui_retries_total 4",
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

/// What a refused request must not have changed: the tally of the failed
/// run (2 succeeded, 3 failed), and the dead letters a redrive would move.
fn unchanged(env: &Env, ui: &Server, run: &str) {
    unchanged_at(env, ui, run, 2, 3);
}

/// The tally is `succeeded` / `failed` with nothing pending, and a
/// redrive would move one dead letter per failed item.
fn unchanged_at(env: &Env, ui: &Server, run: &str, succeeded: u64, failed: u64) {
    let v = ui.tally(run);
    assert_eq!(
        (
            &v["succeeded"],
            &v["failed"],
            &v["pending"],
            &v["redriving"]
        ),
        (&succeeded.into(), &failed.into(), &0.into(), &false.into())
    );
    let dry = env.ok_json(&["redrive", run, "--dry-run", "--json"]);
    assert_eq!(dry["would_redrive"], failed, "{dry}");
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

/// `--listen` takes a name that resolves to loopback addresses only, and
/// the server answers to that name as a Host; a name that does not resolve
/// is refused with the resolver's reason.
#[test]
fn a_loopback_name_is_listened_on() {
    let env = Env::new();
    let run = failed_run(&env);
    let ui = Server::start_on(&env, "localhost:0", &[]);
    let host = format!("localhost:{}", ui.port());
    ui.request("GET", "/", &[("Host", &host)], "")
        .expect(200)
        .has(&run);
    ui.request("GET", "/", &[("Host", "evil.example")], "")
        .expect(421);
    // .invalid never resolves (RFC 6761).
    let out = env.settle(&["ui", "--listen", "nowhere.invalid:8080"]);
    out.expect_code(2)
        .stderr_has("--listen nowhere.invalid:8080: cannot resolve nowhere.invalid: ");
    let out = env.settle(&["ui", "--listen", "localhost"]);
    out.expect_code(2).stderr_has("is not HOST:PORT");
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
    let out = env.settle(&["ui", "--token", "a;b"]);
    out.expect_code(2).stderr_has("no spaces");

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
    // Never a redirect to another site.
    for path in [
        "//evil.example/?token=s3cret",
        "/\\evil.example/?token=s3cret",
    ] {
        let away = ui.request("GET", path, &[], "");
        away.expect(303);
        assert_eq!(away.header("location"), Some("/"), "{path}");
    }
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

/// A headless Chromium driven through chromedriver's WebDriver API, both
/// killed on drop.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start() -> Self {
        for tool in ["chromium", "chromedriver"] {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is not installed: `make test` installs it (Debian packages chromium and chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1200,800",
                    // A name that resolves to this machine but is not the
                    // server's: what a DNS rebinding attack looks like.
                    "--host-resolver-rules=MAP rebind.test 127.0.0.1",
                    "--no-proxy-server",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let mut b = Self {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let text = body.map(|b| b.to_string());
        let r = raw(
            &self.addr,
            method,
            path,
            &[],
            text.as_deref().map(|t| ("application/json", t)),
        );
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("chromedriver answered {} ({e}): {}", r.status, r.body));
        assert_eq!(r.status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.session("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    fn click(&self, css: &str) {
        let el = self.session(
            "POST",
            "/element",
            Some(serde_json::json!({"using": "css selector", "value": css})),
        );
        let id = el[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no {css}: {el}"))
            .to_owned();
        self.session(
            "POST",
            &format!("/element/{id}/click"),
            Some(serde_json::json!({})),
        );
    }

    /// The text of the first element that matches, as the page shows it now.
    fn text(&self, css: &str) -> String {
        let v = self.session(
            "POST",
            "/execute/sync",
            Some(serde_json::json!({
                "script": "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                "args": [css],
            })),
        );
        match v.as_str() {
            Some(t) => t.to_owned(),
            None => panic!(
                "no {css} on the page:\n{}",
                self.session("GET", "/source", None)
            ),
        }
    }

    /// Runs `script` in the page with `args` and returns its value.
    fn exec(&self, script: &str, args: Value) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(serde_json::json!({ "script": script, "args": args })),
        )
    }

    /// The text of every element that matches.
    fn texts(&self, css: &str) -> Vec<String> {
        let v = self.exec(
            "return Array.from(document.querySelectorAll(arguments[0])).map(function (e) { return e.textContent; });",
            serde_json::json!([css]),
        );
        serde_json::from_value(v).unwrap()
    }

    fn count(&self, css: &str) -> usize {
        self.texts(css).len()
    }

    /// `expr` of the first element that matches (`e.` is prepended), as text.
    fn attr(&self, css: &str, expr: &str) -> String {
        let v = self.exec(
            &format!(
                "var e = document.querySelector(arguments[0]); return e ? String(e.{expr}) : null;"
            ),
            serde_json::json!([css]),
        );
        v.as_str()
            .unwrap_or_else(|| panic!("no {css} on the page: {}", self.text("body")))
            .to_owned()
    }

    /// Waits (up to 60 s) until the first element that matches exists and
    /// `done` holds for its text.
    fn wait_for(&self, css: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.exec(
                "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                serde_json::json!([css]),
            );
            if v.as_str().is_some_and(&done) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css} did not come: {}",
                self.session("GET", "/source", None)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn url(&self) -> String {
        self.session("GET", "/url", None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn title(&self) -> String {
        self.session("GET", "/title", None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A PNG of the window, written to `path`.
    fn screenshot(&self, path: &std::path::Path) {
        let v = self.session("GET", "/screenshot", None);
        let png = base64(v.as_str().unwrap());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                raw(
                    &self.addr,
                    "DELETE",
                    &format!("/session/{}", self.session),
                    &[],
                    None,
                )
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A page served from another origin (another port of 127.0.0.1) that
/// posts a "retry all" form to `target` as soon as it loads: a cross-site
/// request forgery as a browser makes it.
fn forging_site(target: &str) -> String {
    let html = format!(
        "<!doctype html><html><body><form method=\"post\" action=\"{target}\">\
         <input type=\"hidden\" name=\"scope\" value=\"all\"></form>\
         <script>document.forms[0].submit()</script></body></html>"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    format!("http://{addr}/")
}

/// An operator in a real browser against a run with failures on `env`'s
/// backend: the runs page's exact tally, the run page's failures by reason,
/// refused requests that change nothing (a forged cross-site POST, a
/// rebound host name, a missing token, `--read-only`), one item retried
/// from its page with the tally on screen following, and "retry all"
/// moving exactly the failed items. With `shots` the pages' screenshots
/// are written there.
fn operate_in_a_browser(env: &Env, shots: Option<&std::path::Path>) {
    let run = failed_run(env);
    let ui = Server::start(env, &[]);
    let b = Browser::start();
    let shot = |name: &str| {
        if let Some(dir) = shots {
            b.screenshot(&dir.join(name));
        }
    };
    let home = format!("http://{}/", ui.addr);

    b.open(&home);
    assert_eq!(b.title(), "Runs · settle");
    assert_eq!(
        b.text("td.tally"),
        "2 succeeded / 3 failed / 0 pending of 5"
    );
    shot("ui-runs.png");

    b.click("table.runs td a");
    assert_eq!(b.title(), format!("Run {run} · settle"));
    assert_eq!(b.text("[data-field=succeeded]"), "2");
    assert_eq!(b.text("[data-field=failed]"), "3");
    // Failures by reason: counts and reasons together, so that a failure
    // says both.
    let reasons: Vec<(String, String)> = b
        .texts("table.reasons td.count")
        .into_iter()
        .zip(b.texts("table.reasons td.reason"))
        .collect();
    assert_eq!(
        reasons,
        [
            ("2".to_owned(), RETRYABLE.to_owned()),
            ("1".to_owned(), PERMANENT.to_owned())
        ]
    );
    assert_eq!(b.texts("td.item"), ["<p&\"1>", "r1", "r2"]);
    shot("ui-run.png");

    // Refused, each leaving the tally as it was. A form on another site
    // posting to this one:
    let retry = format!("{}runs/{run}/retry", home);
    b.open(&forging_site(&retry));
    b.wait_for("body", |t| t.contains("cross-site request refused"));
    unchanged(env, &ui, &run);
    // The server's port under a name that is not the server's (DNS
    // rebinding: Chromium resolves rebind.test to 127.0.0.1).
    b.open(&format!("http://rebind.test:{}/", ui.port()));
    assert!(
        b.text("body").contains("does not answer to that Host"),
        "{}",
        b.text("body")
    );
    unchanged(env, &ui, &run);
    // A server with a token, without it; then with it once in the address.
    let locked = Server::start(env, &["--token", "s3cret"]);
    b.open(&format!("http://{}/runs/{run}", locked.addr));
    assert!(
        b.text("body").contains("a token is needed"),
        "{}",
        b.text("body")
    );
    b.open(&format!("http://{}/runs/{run}?token=s3cret", locked.addr));
    assert_eq!(b.title(), format!("Run {run} · settle"));
    assert_eq!(b.url(), format!("http://{}/runs/{run}", locked.addr));
    drop(locked);
    unchanged(env, &ui, &run);
    // Read-only: no action on the pages, and a POST from its own page refused.
    let ro = Server::start(env, &["--read-only"]);
    b.open(&format!("http://{}/runs/{run}", ro.addr));
    assert_eq!(b.text("[data-field=failed]"), "3");
    assert!(!b.text("main").contains("Retry"), "{}", b.text("main"));
    b.open(&format!("http://{}/runs/{run}/item?id=r1", ro.addr));
    assert!(!b.text("main").contains("Retry"), "{}", b.text("main"));
    let status = b.exec(
        "var x = new XMLHttpRequest(); x.open('POST', arguments[0], false); \
         x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
         x.send('scope=all'); return [x.status, x.responseText];",
        serde_json::json!([format!("/runs/{run}/retry")]),
    );
    assert_eq!(status[0], 403, "{status}");
    assert!(
        status[1].as_str().unwrap().contains("read-only"),
        "{status}"
    );
    b.open(&format!("http://{}/runs/{run}/retry?scope=all", ro.addr));
    assert!(b.text("body").contains("read-only"), "{}", b.text("body"));
    drop(ro);
    unchanged(env, &ui, &run);

    // One item from its page: confirmed, moved, and the tally follows.
    b.open(&format!("{home}runs/{run}"));
    b.click("a[href$=\"item?id=r1\"]");
    assert_eq!(b.title(), "Item r1 · settle");
    shot("ui-item.png");
    b.click(".actions a.button");
    assert_eq!(b.text("[data-field=will-move]"), "1");
    shot("ui-confirm.png");
    b.click("button[type=submit]");
    b.wait_for("[data-field=moved]", |t| t == "1");
    assert_eq!(b.text("[data-field=not-moved]"), "0");
    b.click("a.button");
    follow(&b, "3", "2");
    shot("ui-run-after-retry.png");
    let v = ui.settled(&run);
    assert_eq!((&v["succeeded"], &v["failed"]), (&3.into(), &2.into()));
    assert_eq!(env.show(&run, "r1")["status"], "succeeded");

    // Every item of the page (read now: the two still failed) selected:
    // the confirm step counts them, and cancelling moves nothing.
    b.open(&format!("{home}runs/{run}"));
    assert_eq!(b.texts("td.item"), ["<p&\"1>", "r2"]);
    b.click("[data-select-all]");
    assert_eq!(b.count("input[name=item]:checked"), 2);
    b.click("[data-retry-selected]");
    b.wait_for("[data-field=will-move]", |t| t == "2");
    assert_eq!(b.count("p.left"), 0, "{}", b.text("main"));
    b.click("form a");
    assert_eq!(b.title(), format!("Run {run} · settle"));
    assert_eq!(b.text("[data-field=failed]"), "2");

    // Retry all: exactly the two failed items move; r2 then succeeds and
    // the permanent one fails again.
    b.click(".actions a.button");
    assert_eq!(b.text("[data-field=will-move]"), "2");
    b.click("button[type=submit]");
    b.wait_for("[data-field=moved]", |t| t == "2");
    b.click("a.button");
    follow(&b, "4", "1");
    let v = ui.settled(&run);
    assert_eq!(
        (&v["succeeded"], &v["failed"], &v["total"]),
        (&4.into(), &1.into(), &5.into())
    );
    for (item, status, attempts) in [
        ("ok1", "succeeded", 1),
        ("ok2", "succeeded", 1),
        ("r1", "succeeded", 4),
        ("r2", "succeeded", 4),
        (MARKUP_ID, "failed", 2),
    ] {
        let v = env.show(&run, item);
        assert_eq!(
            (v["status"].as_str(), v["attempts"].as_u64()),
            (Some(status), Some(attempts)),
            "{item}: {v}"
        );
    }
    let dry = env.ok_json(&["redrive", &run, "--dry-run", "--json"]);
    assert_eq!(
        dry["would_redrive"], 1,
        "one dead letter for the one failed item: {dry}"
    );
}

/// Waits until the run page's live tally shows `succeeded` and `failed`
/// with nothing pending and no retry processing.
fn follow(b: &Browser, succeeded: &str, failed: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while b.text("[data-field=succeeded]") != succeeded
        || b.text("[data-field=failed]") != failed
        || b.text("[data-field=pending]") != "0"
        || !b.text("[data-field=busy]").is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the page's tally did not follow to {succeeded} succeeded / {failed} failed: {}",
            b.text("section.live")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The browser test on the embedded backend. With
/// SETTLE_UI_SCREENSHOTS=DIR the pages' screenshots are kept there
/// (docs/img holds the committed ones).
#[test]
fn a_browser_operates_a_run_on_the_embedded_backend() {
    let env = Env::new();
    let shots = std::env::var_os("SETTLE_UI_SCREENSHOTS").map(std::path::PathBuf::from);
    if let Some(dir) = &shots {
        std::fs::create_dir_all(dir).unwrap();
    }
    operate_in_a_browser(&env, shots.as_deref());
}

/// The browser test on the AWS backend (the local emulator at
/// AWS_ENDPOINT_URL, as `make test` starts it), with local workers.
#[test]
fn a_browser_operates_a_run_on_the_emulator() {
    operate_in_a_browser(&Env::aws(6), None);
}

/// A run still settling: its row on the runs page and its run page follow
/// the tally live and chart its throughput. With SETTLE_UI_SCREENSHOTS=DIR
/// the run page's screenshot is kept there.
#[test]
fn a_settling_run_is_followed_live_with_its_throughput() {
    let env = Env::new();
    // A first run makes the database; the dashboard and the browser are up
    // before the run to follow starts, which takes at least 18 s (60 items
    // of 300 ms, one at a time) and is killed once seen.
    let first = env.scripts("first.jsonl", &[("a", "ok")]);
    env.run(&first, &[]);
    let ui = Server::start(&env, &[]);
    let b = Browser::start();
    let home = format!("http://{}/", ui.addr);
    b.open(&home);
    assert_eq!(b.count("tr[data-live-run]"), 0);

    let ids: Vec<String> = (0..60).map(|i| format!("s{i:02}")).collect();
    let scripts: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "sleep:300")).collect();
    let items = env.scripts("slow.jsonl", &scripts);
    let mut args = vec![
        "run",
        "--items",
        &items,
        "--concurrency",
        "1",
        "--batch-size",
        "1",
    ];
    args.extend(QUICK);
    let mut running = env.spawn(&args);

    // The run appears on the runs page as a live row.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        b.open(&home);
        if b.count("tr[data-live-run]") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no settling run: {}",
            b.text("main")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = b.attr("tr[data-live-run] td a", "textContent");
    // The row's tally and chart move without a reload.
    let shown = b.text("tr[data-live-run] td.tally");
    b.wait_for("tr[data-live-run] td.tally", |t| {
        t != shown
            && b.attr("tr[data-live-run] svg.chart", "dataset.points")
                .parse::<u32>()
                .unwrap()
                >= 2
    });
    b.open(&format!("{home}runs/{run}"));
    assert_eq!(b.text("[data-field=status]"), "running");
    b.wait_for("figure.throughput", |_| {
        b.attr("figure.throughput svg.chart", "dataset.points")
            .parse::<u32>()
            .unwrap()
            >= 3
            && b.text("[data-field=rate-peak]")
                .parse::<u32>()
                .is_ok_and(|n| n > 0)
    });
    let points = b.attr("figure.throughput polyline", "getAttribute('points')");
    assert!(points.split(' ').count() >= 3, "{points}");
    if let Some(dir) = std::env::var_os("SETTLE_UI_SCREENSHOTS") {
        // A longer line for the picture.
        b.wait_for("figure.throughput", |_| {
            b.attr("figure.throughput svg.chart", "dataset.points")
                .parse::<u32>()
                .unwrap()
                >= 10
        });
        b.screenshot(&std::path::Path::new(&dir).join("ui-run-live.png"));
    }
    let _ = running.kill();
    let _ = running.wait();
}

/// The same pages and retries on the AWS backend (the local emulator at
/// AWS_ENDPOINT_URL, as `make test` starts it), with local workers: the
/// server reads the stack through the same ports and processes what a
/// retry moves.
#[test]
fn aws_pages_and_a_retry_read_the_stack_through_the_same_ports() {
    let env = Env::aws(6);
    let run = failed_run(&env);
    let ui = Server::start(&env, &[]);
    ui.get("/").expect(200).has(
        "<td class=\"tally\" data-field=\"tally\">2 succeeded / 3 failed / 0 pending of 5</td>",
    );
    let page = ui.get(&format!("/runs/{run}"));
    page.expect(200);
    assert_eq!(
        reason_rows(&page.body),
        [(2, RETRYABLE.to_owned()), (1, PERMANENT.to_owned())]
    );
    retry_r1(&ui, &run);
    let v = ui.settled(&run);
    assert_eq!(
        (&v["succeeded"], &v["failed"], &v["total"]),
        (&3.into(), &2.into(), &5.into())
    );
    let r1 = env.show(&run, "r1");
    assert_eq!(
        (&r1["status"], &r1["attempts"]),
        (&"succeeded".into(), &4.into())
    );
    assert_eq!(env.show(&run, "r2")["status"], "failed");
}

/// A run page lists the failed items 50 at a time, in id order, and its
/// next-page link reads on from the last one shown.
#[test]
fn failed_items_are_paged() {
    let env = Env::new();
    // Two full pages: the second has no next-page link.
    let ids: Vec<String> = (0..100).map(|i| format!("p{i:02}")).collect();
    let scripts: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "permanent")).collect();
    let items = env.scripts("i.jsonl", &scripts);
    let run = run_id(&env.run(&items, &["--max-receives", "1"]));
    let ui = Server::start(&env, &[]);

    let listed = |body: &str| -> Vec<String> {
        body.split("<td class=\"item\"><a href=\"")
            .skip(1)
            .map(|row| {
                row.split("\">")
                    .nth(1)
                    .unwrap()
                    .split("</a>")
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let first = ui.get(&format!("/runs/{run}"));
    first.expect(200);
    assert_eq!(reason_rows(&first.body), [(100, PERMANENT.to_owned())]);
    assert_eq!(listed(&first.body), ids[..50]);
    let next = first
        .body
        .split("\">next page</a>")
        .next()
        .and_then(|b| b.rsplit("<a href=\"").next())
        .unwrap()
        .to_owned();
    assert_eq!(next, format!("/runs/{run}?after=p49"));
    let second = ui.get(&next);
    second.expect(200);
    assert_eq!(listed(&second.body), ids[50..]);
    assert!(!second.body.contains("next page"), "{}", second.body);

    // The streamed download is `settle results`, line for line.
    let results = ui.get(&format!("/runs/{run}/results.jsonl"));
    results.expect(200);
    let cli = env.settle(&["results", &run]);
    cli.expect_code(0);
    assert_eq!(results.body.lines().count(), 100);
    assert_eq!(results.body, cli.stdout);
}
