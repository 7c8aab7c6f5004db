//! Field paths: `stats.views`, with a segment that is not a plain key in
//! backquotes (`` `a.b`.c ``, a backquote inside doubled: ``` `` ```).
//! Used by transforms, query filters and order, and the policy's protected
//! fields; parsed once, so nothing downstream ever sees the text again.

use std::fmt;

/// Names the document id in filters and order (`__id__`).
pub const ID_FIELD: &str = "__id__";

/// A parsed field path: the keys from the document's root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(Vec<String>);

/// Longest path accepted, in bytes of its text.
const MAX_PATH_BYTES: usize = 1500;
/// Deepest path accepted: documents nest at most 20 levels.
const MAX_SEGMENTS: usize = 20;

fn is_plain(segment: &str) -> bool {
    let mut bytes = segment.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl FieldPath {
    /// Parses a dotted path; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        const RULE: &str = "a field path is dot-separated keys; a key that is not ^[A-Za-z_][A-Za-z0-9_]*$ is written in backquotes (`a.b`.c)";
        if text.is_empty() {
            return Err(format!("the field path is empty: {RULE}"));
        }
        if text.len() > MAX_PATH_BYTES {
            return Err(format!(
                "the field path is {} bytes long, over {MAX_PATH_BYTES}",
                text.len()
            ));
        }
        let mut segments = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            let segment = if chars.peek() == Some(&'`') {
                chars.next();
                let mut quoted = String::new();
                loop {
                    match chars.next() {
                        Some('`') if chars.peek() == Some(&'`') => {
                            chars.next();
                            quoted.push('`');
                        }
                        Some('`') => break,
                        Some(c) => quoted.push(c),
                        None => return Err(format!("unclosed backquote: {RULE}")),
                    }
                }
                if quoted.is_empty() {
                    return Err(format!("an empty key (``): {RULE}"));
                }
                quoted
            } else {
                let mut plain = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    plain.push(c);
                    chars.next();
                }
                if !is_plain(&plain) {
                    return Err(format!(
                        "{} is not a plain key: {RULE}",
                        crate::quote::shown(&plain)
                    ));
                }
                plain
            };
            if segment.contains('\0') {
                return Err("a key contains U+0000".into());
            }
            segments.push(segment);
            match chars.next() {
                None => break,
                Some('.') => {}
                Some(c) => return Err(format!("unexpected {c:?} after a key: {RULE}")),
            }
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(format!(
                "the field path has {} keys: documents nest at most {MAX_SEGMENTS} levels",
                segments.len()
            ));
        }
        Ok(FieldPath(segments))
    }

    /// A path of keys taken as they are (no parsing).
    pub fn from_segments(segments: &[String]) -> FieldPath {
        FieldPath(segments.to_vec())
    }

    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The path `__id__`, naming the document id.
    pub fn is_id(&self) -> bool {
        self.0.len() == 1 && self.0[0] == ID_FIELD
    }

    /// Whether `self` is `other` or lies inside it (`a.b` is within `a`).
    pub fn is_within(&self, other: &FieldPath) -> bool {
        self.0.starts_with(&other.0)
    }
}

impl fmt::Display for FieldPath {
    /// The canonical text: plain keys bare, the others in backquotes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            if is_plain(segment) {
                f.write_str(segment)?;
            } else {
                write!(f, "`{}`", segment.replace('`', "``"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_plain_and_quoted_keys() {
        let p = FieldPath::parse("stats.views").unwrap();
        assert_eq!(p.segments(), ["stats", "views"]);
        let p = FieldPath::parse("`a.b`.c").unwrap();
        assert_eq!(p.segments(), ["a.b", "c"]);
        let p = FieldPath::parse("`x``y`").unwrap();
        assert_eq!(p.segments(), ["x`y"]);
        assert!(FieldPath::parse("__id__").unwrap().is_id());
        for bad in [
            "", "a.", ".a", "a..b", "1a", "a-b", "`a", "``", "a`b`", "`a`b",
        ] {
            assert!(FieldPath::parse(bad).is_err(), "{bad:?}");
        }
        let deep = vec!["a"; 21].join(".");
        assert!(FieldPath::parse(&deep).is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(segments in proptest::collection::vec("\\PC{1,8}", 1..5)) {
            prop_assume!(segments.iter().all(|s| !s.contains('\0')));
            let path = FieldPath(segments);
            let text = path.to_string();
            prop_assert_eq!(FieldPath::parse(&text), Ok(path));
        }
    }
}
