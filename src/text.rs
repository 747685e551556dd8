//! Untrusted text made safe to show: before a string that a workload, an agent or any caller
//! chose reaches a terminal, a log line or an audit record, its control characters are escaped
//! and its length is bounded.
//!
//! Why: a task ID such as `x\n#9999 ... allow` or one holding `ESC [8m` would otherwise write
//! forged lines or hidden text into an operator's terminal. Escaping is the one rule for every
//! text output; JSON output escapes by its own rules already.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls, DEL, and the Unicode
/// format characters that reorder or hide text (bidirectional overrides and isolates, zero-width
/// characters, the byte-order mark), which can make a line read other than it is.
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

/// `s` with every character that could forge or hide terminal output written as an escape:
/// `\n`, `\r`, `\t`, `\\` for a backslash, `\x1b` for other ASCII controls, `\u{202e}` for the
/// rest. Text without such characters (and without backslashes) is returned unchanged, without
/// copying.
///
/// Backslashes are escaped too, so an escaped string cannot be mistaken for one that held the
/// escape itself (`a\nb` typed as four characters prints as `a\\nb`).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`escape`]d, then cut to at most `max_chars` characters of the escaped form, with `…` and
/// the number of characters left out when cut (`abc…(+1234 chars)`), so a huge value cannot
/// flood a log or a record and the reader still sees that it was cut.
pub fn escape_bounded(s: &str, max_chars: usize) -> Cow<'_, str> {
    let escaped = escape(s);
    let total = escaped.chars().count();
    if total <= max_chars {
        return escaped;
    }
    let kept: String = escaped.chars().take(max_chars).collect();
    Cow::Owned(format!("{kept}…(+{} chars)", total - max_chars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "spiffe://acme.test/agents/billing-bot é 漢字";
        assert!(matches!(escape(s), Cow::Borrowed(t) if t == s));
    }

    #[test]
    fn line_breaks_and_terminal_escapes_cannot_forge_lines() {
        let forged = "x\n#9999 0 token.create allow\r\x1b[8m\u{9b}";
        let out = escape(forged);
        assert_eq!(
            out, "x\\n#9999 0 token.create allow\\r\\x1b[8m\\u{9b}",
            "every control character is written as an escape"
        );
        assert!(!out.chars().any(char::is_control));
    }

    #[test]
    fn reordering_and_invisible_characters_are_escaped() {
        assert_eq!(
            escape("a\u{202e}b\u{200b}c\u{2066}"),
            "a\\u{202e}b\\u{200b}c\\u{2066}"
        );
    }

    #[test]
    fn backslashes_are_escaped_so_escapes_stay_unambiguous() {
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_ne!(escape("a\\nb"), escape("a\nb"));
    }

    #[test]
    fn bounded_cuts_long_values_and_says_how_much() {
        assert_eq!(escape_bounded("short", 10), "short");
        let long = "y".repeat(5000);
        let out = escape_bounded(&long, 64);
        assert!(out.starts_with(&"y".repeat(64)));
        assert!(out.ends_with("…(+4936 chars)"), "{out}");
        // Escapes count in the bound, so a value of control characters is bounded too.
        let newlines = "\n".repeat(100);
        let out = escape_bounded(&newlines, 10);
        assert_eq!(out, "\\n\\n\\n\\n\\n…(+190 chars)");
    }
}
