//! Small helpers for server-rendered HTML: every value from a run (ids,
//! errors, logs, outputs) goes through [`esc`] or [`url`], since ids may
//! hold any text.

use std::fmt::Write;

/// Text escaped for HTML content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text percent-encoded for a URL's path segment or query value: all but
/// the unreserved characters.
pub fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A query value decoded (`+` is a space); bad escapes stay as they are.
pub fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · settle</title><link rel=\"stylesheet\" href=\"/assets/ui.css\">\
         <script src=\"/assets/ui.js\" defer></script></head>\n<body>\
         <header><a class=\"home\" href=\"/\">settle</a></header>\n<main>\n{body}</main>\n</body></html>\n",
        esc(title)
    )
}

/// A succeeded / failed / pending bar of `total`.
pub fn bar(succeeded: u64, failed: u64, total: u64) -> String {
    let pct = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 * 100.0 / total as f64
        }
    };
    format!(
        "<div class=\"bar\" data-field=\"bar\"><span class=\"ok\" style=\"width:{:.2}%\"></span>\
         <span class=\"ko\" style=\"width:{:.2}%\"></span></div>",
        pct(succeeded),
        pct(failed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn urls_round_trip() {
        for s in ["plain", "a b/c?d&e=f#g", "ü<>\"'%", ""] {
            assert_eq!(url_decode(&url(s)), s);
        }
        assert_eq!(url_decode("a+b%2"), "a b%2");
    }
}
