//! List page tokens: opaque to clients, validated (never trusted) by the server.
//!
//! A token is base64url of `version | collection length | collection | last id |
//! checksum`. It holds no server state, so it stays valid across restarts and
//! replicas; the checksum and the collection check turn a token the server did
//! not issue into INVALID_ARGUMENT instead of a silently wrong page.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 8;

/// FNV-1a: detects corruption and invented tokens, not a security boundary
/// (a token only says where a walk resumes).
fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash.to_be_bytes()
}

/// The token that resumes a walk of `collection` after `last_id`.
pub fn encode(collection: &str, last_id: &str) -> String {
    let mut bytes = Vec::with_capacity(2 + collection.len() + last_id.len() + CHECKSUM_LEN);
    bytes.push(VERSION);
    // Collection names are at most 63 bytes (validated before a token is made).
    bytes.push(collection.len() as u8);
    bytes.extend_from_slice(collection.as_bytes());
    bytes.extend_from_slice(last_id.as_bytes());
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The last id of the previous page, if `token` was issued for `collection`.
pub fn decode(token: &str, collection: &str) -> Result<String, String> {
    let invalid = || {
        format!(
            "page_token {} was not issued by this server for collection `{collection}`: pass the next_page_token of the previous List response unchanged, or an empty token to start from the beginning",
            crate::quote::shown(token)
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if bytes.len() < 2 + CHECKSUM_LEN || bytes[0] != VERSION {
        return Err(invalid());
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(invalid());
    }
    let len = usize::from(body[1]);
    let rest = &body[2..];
    if rest.len() < len || &rest[..len] != collection.as_bytes() {
        return Err(invalid());
    }
    let last_id = std::str::from_utf8(&rest[len..]).map_err(|_| invalid())?;
    if super::validate::id(last_id, "page_token").is_err() {
        return Err(invalid());
    }
    Ok(last_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(collection in "[a-z][a-z0-9_]{0,62}", id in "[^\\p{Cc}]{1,128}") {
            let token = encode(&collection, &id);
            prop_assert_eq!(decode(&token, &collection), Ok(id));
        }

        #[test]
        fn belongs_to_its_collection(a in "[a-z]{1,10}", b in "[a-z]{1,10}", id in "[a-z0-9]{1,20}") {
            prop_assume!(a != b);
            prop_assert!(decode(&encode(&a, &id), &b).is_err());
        }

        #[test]
        fn garbage_is_rejected(token in "\\PC{0,200}") {
            // Any string that decodes must carry a matching checksum: vanishingly unlikely.
            prop_assert!(decode(&token, "c").is_err());
        }

        #[test]
        fn tampering_is_detected(id in "[a-z0-9]{1,40}", flip in 0usize..1000, bit in 0u8..8) {
            let token = encode("c", &id);
            let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            prop_assert!(decode(&URL_SAFE_NO_PAD.encode(bytes), "c").is_err());
        }
    }
}
