//! Request validation: every rule of the API contract, with messages that state
//! the rule so a person can fix the call.

use super::ApiError;
use crate::store::{is_valid_name, NAME_RULE};

pub const MAX_ID_BYTES: usize = 512;
pub const MAX_BATCH_GET_IDS: usize = 1000;
pub const MAX_WRITE_MUTATIONS: usize = 500;
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

const ID_RULE: &str = "ids are 1 to 512 bytes of UTF-8 without control characters";

pub use crate::quote::shown;

pub fn collection(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid(
            "collection",
            format!("collection is required; collection {NAME_RULE}"),
        ));
    }
    if !is_valid_name(name) {
        return Err(ApiError::invalid(
            "collection",
            format!(
                "collection {} is invalid: collection {NAME_RULE}",
                shown(name)
            ),
        ));
    }
    Ok(())
}

/// Checks an id; `field` names it in the message (`id`, `ids[3]`).
pub fn id(id: &str, field: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("{field} is required; {ID_RULE}"),
        ));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("{field} is {} bytes long: {ID_RULE}", id.len()),
        ));
    }
    if let Some((at, c)) = id.char_indices().find(|(_, c)| c.is_control()) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} {} has a control character U+{:04X} at byte {at}: {ID_RULE}",
                shown(id),
                c as u32
            ),
        ));
    }
    Ok(())
}

/// A request's `scope`: empty (the caller's own rows) or a scope by the id
/// rule; whether the caller reaches it is the policy's question.
pub fn scope(scope: &str) -> Result<(), ApiError> {
    if scope.is_empty() {
        return Ok(());
    }
    id(scope, "scope")
}

/// The effective page size: 0 means the default, large values are capped.
pub fn page_size(size: i32) -> Result<usize, ApiError> {
    match usize::try_from(size) {
        Err(_) => Err(ApiError::invalid("page_size", format!(
            "page_size is {size}: it must be 0 (for {DEFAULT_PAGE_SIZE}) or positive (at most {MAX_PAGE_SIZE} are returned)"
        ))),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

pub fn count(what: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::invalid(
            what,
            format!("{n} {what} in one request: at most {max} are allowed; split the request"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regex_collection(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some('a'..='z'))
            && s.chars().count() <= 63
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    }

    proptest! {
        #[test]
        fn collection_matches_the_contract_regex(s in "\\PC{0,70}|[a-z][a-z0-9_]{0,70}") {
            prop_assert_eq!(collection(&s).is_ok(), regex_collection(&s));
        }

        #[test]
        fn ids_are_bounded_and_control_free(s in "\\PC{0,600}|[\\x00-\\x7f]{0,20}|.{0,20}") {
            let ok = !s.is_empty() && s.len() <= 512 && !s.chars().any(char::is_control);
            prop_assert_eq!(id(&s, "id").is_ok(), ok);
        }

        #[test]
        fn error_messages_stay_short(s in "\\PC{100,2000}") {
            if let Err(e) = id(&s, "id") {
                prop_assert!(e.to_string().len() < 400);
            }
        }

        #[test]
        fn page_size_rules(n in any::<i32>()) {
            match page_size(n) {
                Ok(size) => {
                    prop_assert!(n >= 0);
                    prop_assert_eq!(size, if n == 0 { 100 } else { (n as usize).min(1000) });
                }
                Err(_) => prop_assert!(n < 0),
            }
        }
    }

    #[test]
    fn edges() {
        assert!(collection("a").is_ok());
        assert!(collection(&format!("a{}", "b".repeat(62))).is_ok());
        assert!(collection(&format!("a{}", "b".repeat(63))).is_err());
        for bad in ["", "A", "1a", "_a", "a-b", "a b", "é", "a\u{0}"] {
            assert!(collection(bad).is_err(), "{bad:?}");
        }
        assert!(id(&"x".repeat(512), "id").is_ok());
        assert!(id(&"x".repeat(513), "id").is_err());
        assert!(id(&"é".repeat(256), "id").is_ok()); // 512 bytes
        assert!(id("a\tb", "id").is_err());
        assert!(id("a\u{85}b", "id").is_err()); // C1 control
        assert!(id("'; DROP TABLE x; --", "id").is_ok());
        assert!(id("../../etc/passwd", "id").is_ok());
    }
}
