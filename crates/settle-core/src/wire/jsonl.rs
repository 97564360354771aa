//! Reading an items file: JSON Lines, one `{"id": "...", "payload": ...}`
//! per line. Streamed: one line in memory at a time, whatever the file size.

use crate::domain::ports::LineError;
use crate::domain::{null_payload, Item, ItemId};
use crate::wire::message::MAX_BODY_BYTES;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::{BufRead, Read};

/// Bytes a work message needs besides the id and payload: the envelope, and
/// on its dead-letter copy the error (bounded, then JSON-escaped at worst 6x).
const ENVELOPE_BYTES: usize = 512 + 6 * crate::domain::MAX_ERROR_BYTES;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow, default)]
    id: Field<'a>,
    #[serde(borrow, default)]
    payload: Field<'a>,
}

/// A field's raw JSON; unlike `Option<&RawValue>` it keeps an explicit
/// `null` apart from an absent field.
#[derive(Default)]
struct Field<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|r| Field(Some(r)))
    }
}

/// Iterates the items of a JSONL reader, each with its 1-based line number.
/// Blank lines are skipped. After the first error the iterator ends.
#[derive(Debug)]
pub struct JsonlItems<R> {
    reader: R,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> JsonlItems<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            line: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    fn fail(&mut self, reason: impl Into<String>) -> Option<Result<(u64, Item), LineError>> {
        self.done = true;
        Some(Err(LineError {
            line: self.line,
            reason: reason.into(),
        }))
    }
}

impl<R: BufRead> Iterator for JsonlItems<R> {
    type Item = Result<(u64, Item), LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            self.line += 1;
            // Bounded read: a multi-gigabyte "line" must not be buffered whole.
            let limit = (MAX_BODY_BYTES + 2) as u64;
            let n = match (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(n) => n,
                Err(e) => return self.fail(format!("could not read: {e}")),
            };
            if n == 0 {
                self.done = true;
                return None;
            }
            if self.buf.last() == Some(&b'\n') {
                self.buf.pop();
            } else if n as u64 == limit {
                return self.fail(format!(
                    "line is longer than {MAX_BODY_BYTES} bytes; an item must fit in one queue message"
                ));
            }
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            // Editors on Windows start UTF-8 files with a byte order mark;
            // it is not part of the first item.
            if self.line == 1 && self.buf.starts_with(UTF8_BOM) {
                self.buf.drain(..UTF8_BOM.len());
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let res = parse_line(&self.buf);
            return match res {
                Ok(item) => Some(Ok((self.line, item))),
                Err(reason) => self.fail(reason),
            };
        }
        None
    }
}

/// Parses one line into an item, or says what is wrong with it.
pub fn parse_line(bytes: &[u8]) -> Result<Item, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.valid_up_to() + 1))?;
    // Checked first: serde would otherwise accept `["a"]` as a struct.
    if !text.trim_start().starts_with('{') {
        return Err("expected a JSON object like {\"id\": \"a1\", \"payload\": {...}}".into());
    }
    let line: Line =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {}", strip_line(&e)))?;
    let raw_id = line.id.0.ok_or("missing \"id\"")?;
    let id: String = serde_json::from_str(raw_id.get())
        .map_err(|_| format!("\"id\" must be a string, found {}", json_kind(raw_id.get())))?;
    let id = ItemId::new(id).map_err(|e| e.to_string())?;
    if let Some(p) = line.payload.0 {
        let depth = nesting(p.get());
        if depth > MAX_NESTING {
            return Err(format!(
                "payload is nested {depth} levels deep; at most {MAX_NESTING} are allowed"
            ));
        }
    }
    let payload = match line.payload.0 {
        Some(p) => p.to_owned(),
        None => null_payload(),
    };
    // The id as it will be encoded in a message: escaping can make it longer.
    let id_bytes = serde_json::to_string(id.as_str()).map_or(0, |s| s.len());
    if id_bytes + payload.get().len() + ENVELOPE_BYTES > MAX_BODY_BYTES {
        return Err(format!(
            "item is too large: its message would exceed {MAX_BODY_BYTES} bytes"
        ));
    }
    Ok(Item::new(id, payload))
}

/// Deepest nesting accepted in a payload: the JSON parsers that user code
/// will use (serde_json among them) stop at 128.
pub const MAX_NESTING: usize = 100;

/// The nesting depth of valid JSON text, without recursion.
fn nesting(json: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn strip_line(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => format!("{} at column {}", &msg[..i], e.column()),
        None => msg,
    }
}

fn json_kind(raw: &str) -> &'static str {
    match raw.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8]) -> Vec<Result<(u64, String, String), LineError>> {
        JsonlItems::new(text)
            .map(|r| r.map(|(n, i)| (n, i.id.to_string(), i.payload.get().to_owned())))
            .collect()
    }

    fn err(text: &[u8]) -> LineError {
        read(text)
            .into_iter()
            .find_map(Result::err)
            .expect("an error")
    }

    #[test]
    fn reads_items_with_line_numbers() {
        let got = read(b"{\"id\":\"a\",\"payload\":{\"x\": 1}}\n\n{\"id\":\"b\"}\r\n");
        assert_eq!(
            got,
            vec![
                Ok((1, "a".into(), "{\"x\": 1}".into())),
                Ok((3, "b".into(), "null".into()))
            ]
        );
    }

    #[test]
    fn names_each_kind_of_bad_line() {
        let e = err(b"{\"id\":\"a\"}\n{\"id\":\"b\",}\n");
        assert_eq!(e.line, 2);
        assert!(
            e.reason
                .starts_with("invalid JSON: trailing comma at column"),
            "{e}"
        );
        assert_eq!(
            err(b"[1]").reason,
            "expected a JSON object like {\"id\": \"a1\", \"payload\": {...}}"
        );
        assert_eq!(err(b"{\"payload\":1}").reason, "missing \"id\"");
        assert_eq!(
            err(b"{\"id\":7}").reason,
            "\"id\" must be a string, found a number"
        );
        assert_eq!(
            err(b"{\"id\":null}").reason,
            "\"id\" must be a string, found null"
        );
        // 256 quotes take 512 bytes escaped: this item fits only if its id
        // is counted as 258 bytes.
        let escaped = format!(
            "{{\"id\":\"{}\",\"payload\":\"{}\"}}",
            "\\\"".repeat(256),
            "x".repeat(MAX_BODY_BYTES - 7044)
        );
        assert!(
            err(escaped.as_bytes()).reason.contains("too large"),
            "the id counts as encoded"
        );
        assert_eq!(err(b"{\"id\":\"\"}").reason, "id is empty");
        let long = format!("{{\"id\":\"{}\"}}", "x".repeat(257));
        assert!(err(long.as_bytes()).reason.contains("257 characters"));
        assert!(err(b"{\"id\":\"a\",\"paylod\":1}")
            .reason
            .contains("unknown field `paylod`"));
        assert!(err(b"{\"id\":\"\xff\"}")
            .reason
            .starts_with("not valid UTF-8"));
        let deep = format!(
            "{{\"id\":\"a\",\"payload\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(
            err(deep.as_bytes()).reason.contains("nested 200 levels"),
            "deep nesting is refused"
        );
        let ok = format!(
            "{{\"id\":\"a\",\"payload\":{}\"[{{\"{}}}",
            "[".repeat(99),
            "]".repeat(99)
        );
        assert_eq!(
            read(ok.as_bytes()).len(),
            1,
            "brackets in strings do not count"
        );
    }

    #[test]
    fn refuses_ids_with_control_characters() {
        let e = err(b"{\"id\":\"ok\"}\n{\"id\":\"a\\nb\"}\n");
        assert_eq!(e.line, 2);
        assert_eq!(
            e.reason,
            "id \"a\\nb\" contains a control character (U+000A)"
        );
        let e = err(b"{\"id\":\"\\u001b[31mred\"}\n");
        assert_eq!(
            e.reason,
            "id \"\\u{1b}[31mred\" contains a control character (U+001B)"
        );
    }

    #[test]
    fn skips_a_byte_order_mark_at_the_start_only() {
        let got = read(b"\xEF\xBB\xBF{\"id\":\"a\"}\n{\"id\":\"b\"}\n");
        assert_eq!(
            got,
            vec![
                Ok((1, "a".into(), "null".into())),
                Ok((2, "b".into(), "null".into()))
            ]
        );
        let e = err(b"{\"id\":\"a\"}\n\xEF\xBB\xBF{\"id\":\"b\"}\n");
        assert_eq!(e.line, 2, "a mark inside the file is an error");
        assert_eq!(read(b"\xEF\xBB\xBF\n"), vec![], "a mark alone is no item");
    }

    #[test]
    fn refuses_lines_too_big_for_a_message_without_buffering_them() {
        let mut huge = b"{\"id\":\"a\",\"payload\":\"".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 3 * MAX_BODY_BYTES));
        let e = err(&huge);
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("longer than"), "{e}");
        let mut big = b"{\"id\":\"a\",\"payload\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_BODY_BYTES - 3000));
        big.extend(b"\"}");
        assert!(err(&big).reason.contains("too large"));
    }
}
