//! Page tokens: opaque to clients, validated (never trusted) by the server.
//!
//! A List token is base64url of `3 | collection length | collection | last id
//! length (4 bytes) | last id | last scope | checksum` (version 1, from
//! earlier releases, has no scope and is still read); a Query token of `2 | collection length | collection | query
//! fingerprint (8 bytes) | the last document's order keys, id and scope, each
//! length-prefixed | checksum`, so it resumes only the query it came from. It holds no server state, so it stays valid across restarts and
//! replicas; the checksum and the collection check turn a token the server did
//! not issue into INVALID_ARGUMENT instead of a silently wrong page.

use crate::store::query::Cursor;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

const VERSION: u8 = 3;
/// List tokens of earlier releases: no scope.
const VERSION_UNSCOPED: u8 = 1;
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

/// The token that resumes a walk of `collection` after `(last_id, last_scope)`.
pub fn encode(collection: &str, last_id: &str, last_scope: &str) -> String {
    let mut bytes =
        Vec::with_capacity(6 + collection.len() + last_id.len() + last_scope.len() + CHECKSUM_LEN);
    bytes.push(VERSION);
    // Collection names are at most 63 bytes (validated before a token is made).
    bytes.push(collection.len() as u8);
    bytes.extend_from_slice(collection.as_bytes());
    push_part(&mut bytes, last_id.as_bytes());
    bytes.extend_from_slice(last_scope.as_bytes());
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The last (id, scope) of the previous page, if `token` was issued for
/// `collection`.
pub fn decode(token: &str, collection: &str) -> Result<(String, String), String> {
    let invalid = || {
        format!(
            "page_token {} was not issued by this server for collection `{collection}`: pass the next_page_token of the previous List response unchanged, or an empty token to start from the beginning",
            crate::quote::shown(token)
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if bytes.len() < 2 + CHECKSUM_LEN || ![VERSION, VERSION_UNSCOPED].contains(&bytes[0]) {
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
    let rest = &rest[len..];
    let (id, scope) = if body[0] == VERSION_UNSCOPED {
        (rest, &[][..])
    } else {
        let n = rest
            .get(..4)
            .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
            .ok_or_else(invalid)?;
        let id = rest.get(4..4 + n).ok_or_else(invalid)?;
        (id, &rest[4 + n..])
    };
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| invalid())
    };
    let (id, scope) = (text(id)?, text(scope)?);
    if super::validate::id(&id, "page_token").is_err() || super::validate::scope(&scope).is_err() {
        return Err(invalid());
    }
    Ok((id, scope))
}

/// The version byte of Query tokens.
const QUERY_VERSION: u8 = 2;

/// A 64-bit fingerprint (FNV-1a) of a query's shape and operands.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(checksum(bytes))
}

fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// The token that resumes query `fingerprint` of `collection` after `cursor`.
pub fn encode_query(collection: &str, fingerprint: u64, cursor: &Cursor) -> String {
    let mut bytes = vec![QUERY_VERSION, collection.len() as u8];
    bytes.extend_from_slice(collection.as_bytes());
    bytes.extend_from_slice(&fingerprint.to_be_bytes());
    bytes.push(cursor.keys.len() as u8);
    for key in &cursor.keys {
        push_part(&mut bytes, key);
    }
    push_part(&mut bytes, cursor.id.as_bytes());
    push_part(&mut bytes, cursor.scope.as_bytes());
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The cursor of a Query token, if it was issued for this collection and query.
pub fn decode_query(
    token: &str,
    collection: &str,
    fingerprint: u64,
    keys: usize,
) -> Result<Cursor, String> {
    let invalid = || {
        format!(
            "page_token {} was not issued by this server for this query of collection `{collection}`: pass the next_page_token of the previous response to the same query unchanged, or an empty token to start from the beginning",
            crate::quote::shown(token)
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if bytes.len() < 2 + CHECKSUM_LEN || bytes[0] != QUERY_VERSION {
        return Err(invalid());
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(invalid());
    }
    let mut rest = &body[1..];
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err(invalid());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let len = usize::from(take(1)?[0]);
    if take(len)? != collection.as_bytes() {
        return Err(invalid());
    }
    if take(8)? != fingerprint.to_be_bytes() {
        return Err(invalid());
    }
    if usize::from(take(1)?[0]) != keys {
        return Err(invalid());
    }
    let mut part = || -> Result<Vec<u8>, String> {
        let n = u32::from_be_bytes(take(4)?.try_into().map_err(|_| invalid())?) as usize;
        Ok(take(n)?.to_vec())
    };
    let keys = (0..keys).map(|_| part()).collect::<Result<Vec<_>, _>>()?;
    let id = String::from_utf8(part()?).map_err(|_| invalid())?;
    let scope = String::from_utf8(part()?).map_err(|_| invalid())?;
    if super::validate::id(&id, "page_token").is_err() {
        return Err(invalid());
    }
    Ok(Cursor { keys, id, scope })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(collection in "[a-z][a-z0-9_]{0,62}", id in "[^\\p{Cc}]{1,128}", scope in "[^\\p{Cc}]{0,16}") {
            let token = encode(&collection, &id, &scope);
            prop_assert_eq!(decode(&token, &collection), Ok((id, scope)));
        }

        #[test]
        fn tokens_of_earlier_releases_are_read(id in "[^\\p{Cc}]{1,128}") {
            let mut bytes = vec![VERSION_UNSCOPED, 1, b'c'];
            bytes.extend_from_slice(id.as_bytes());
            let sum = checksum(&bytes);
            bytes.extend_from_slice(&sum);
            let token = URL_SAFE_NO_PAD.encode(bytes);
            prop_assert_eq!(decode(&token, "c"), Ok((id, String::new())));
        }

        #[test]
        fn belongs_to_its_collection(a in "[a-z]{1,10}", b in "[a-z]{1,10}", id in "[a-z0-9]{1,20}") {
            prop_assume!(a != b);
            prop_assert!(decode(&encode(&a, &id, ""), &b).is_err());
        }

        #[test]
        fn query_tokens_round_trip_and_belong_to_their_query(
            keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 0..4),
            id in "[^\\p{Cc}]{1,64}", scope in "[a-z]{0,8}", fp in any::<u64>(), other in any::<u64>()
        ) {
            let cursor = Cursor { keys: keys.clone(), id, scope };
            let token = encode_query("c", fp, &cursor);
            prop_assert_eq!(decode_query(&token, "c", fp, keys.len()), Ok(cursor));
            prop_assume!(fp != other);
            prop_assert!(decode_query(&token, "c", other, keys.len()).is_err());
            prop_assert!(decode_query(&token, "d", fp, keys.len()).is_err());
            prop_assert!(decode(&token, "c").is_err(), "a query token is no List token");
        }

        #[test]
        fn garbage_is_rejected(token in "\\PC{0,200}") {
            // Any string that decodes must carry a matching checksum: vanishingly unlikely.
            prop_assert!(decode(&token, "c").is_err());
        }

        #[test]
        fn tampering_is_detected(id in "[a-z0-9]{1,40}", flip in 0usize..1000, bit in 0u8..8) {
            let token = encode("c", &id, "s");
            let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            prop_assert!(decode(&URL_SAFE_NO_PAD.encode(bytes), "c").is_err());
        }
    }
}
