//! Untrusted input in messages and log lines: escaped and bounded.

use std::fmt::Write as _;

/// Longest part of a caller's value quoted in a message.
const MAX: usize = 80;

/// Quotes a caller's value for an error message or a log line: escaped (no
/// control characters reach a terminal or a log collector) and cut if long, so
/// an error never echoes unbounded input.
pub fn shown(value: &str) -> String {
    let mut cut = value;
    if cut.len() > MAX {
        let mut end = MAX;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        cut = &cut[..end];
    }
    let mut out = format!("{cut:?}");
    if cut.len() < value.len() {
        let _ = write!(out, "… ({} bytes)", value.len());
    }
    out
}
