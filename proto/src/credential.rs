//! Device credentials: short-lived JWTs (RFC 7519) signed HS256 with the app's secret.
//!
//! An app backend mints one per device session, naming the app (`app`) and the user
//! (`sub`); the device presents it in its Hello, and the node checks signature, algorithm,
//! validity period and lifetime before the device may say anything else. Only HS256 is
//! accepted: a token naming any other `alg` (including `none`) is refused. The format is
//! small enough that signing and checking take a few lines over `hmac`, where a general JWT
//! crate would bring RSA and elliptic-curve code Pigeon never uses.
//!
//! # Key rotation
//! An app has a current signing key and, during a rotation, a previous one ([`AppKeys`]);
//! each may carry a key id (`kid`). When the app's keys have ids, a credential whose header
//! names a `kid` is checked with that key only; any other credential is checked with the
//! current key, then the previous one (so a `kid` that some JWT library adds on its own does
//! no harm to an app that does not use them). The previous key keeps working while backends
//! move to the new one, and is removed once the credentials it signed have expired.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Seconds of clock skew tolerated when checking `exp`, `nbf` and the lifetime.
pub const LEEWAY_SECS: u64 = 30;

/// Longest credential accepted, in bytes; a frame limit bounds it too.
const MAX_CREDENTIAL_LEN: usize = 2048;

/// The claims of a device credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// App id.
    pub app: String,
    /// User id the device acts for.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Not valid before, Unix seconds, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Why a credential was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// Not three base64url parts of JSON, or too long.
    #[error("credential is not a well-formed JWT")]
    Malformed,
    /// The header names an algorithm other than HS256.
    #[error("credential algorithm must be HS256")]
    Algorithm,
    /// The `app` claim names no configured app.
    #[error("credential names an unknown app")]
    UnknownApp,
    /// The header's `kid` names none of the app's keys.
    #[error("credential names an unknown key id")]
    UnknownKey,
    /// The signature does not match the app's secret.
    #[error("credential signature is invalid")]
    Signature,
    /// `exp` is in the past.
    #[error("credential has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("credential is not valid yet")]
    NotYetValid,
    /// `exp` is further ahead than the longest lifetime the node accepts.
    #[error("credential lives longer than the node accepts")]
    TooLong,
    /// `sub` is no valid uid (see [`valid_uid`]).
    #[error("credential has an invalid uid: 1 to 256 bytes, no control characters")]
    InvalidUid,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// A signing key of an app: its secret, and its key id, if it has one.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a> {
    /// The HS256 secret.
    pub secret: &'a [u8],
    /// The key id credentials signed with it name in their header (`kid`).
    pub kid: Option<&'a str>,
}

/// The keys an app's credentials may be signed with.
#[derive(Clone, Copy, Debug)]
pub struct AppKeys<'a> {
    /// The key to sign with now.
    pub current: Key<'a>,
    /// The key being retired, while a rotation is under way.
    pub previous: Option<Key<'a>>,
}

/// Longest uid, in bytes.
pub const MAX_UID_LEN: usize = 256;

/// Whether `uid` is a valid user id: 1 to [`MAX_UID_LEN`] bytes of UTF-8 with no control
/// characters. The push API checks the uids it is given by the same rule, so a uid a
/// device can act for is exactly a uid a push can name.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= MAX_UID_LEN && !uid.chars().any(char::is_control)
}

/// Mints a credential for `uid` of the app `app`, signed with `key`, valid for `ttl_secs`
/// from `now_secs`.
pub fn mint(app: &str, key: Key<'_>, uid: &str, now_secs: u64, ttl_secs: u64) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
        kid: key.kid.map(str::to_owned),
    };
    let claims = Claims {
        app: app.to_owned(),
        sub: uid.to_owned(),
        iat: now_secs,
        exp: now_secs.saturating_add(ttl_secs),
        nbf: None,
    };
    sign(&header, &claims, key.secret)
}

fn sign(header: &Header, claims: &Claims, secret: &[u8]) -> String {
    // Serializing these two plain structs cannot fail.
    let header = serde_json::to_vec(header).unwrap_or_default();
    let claims = serde_json::to_vec(claims).unwrap_or_default();
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = mac(secret, signing_input.as_bytes())
        .finalize()
        .into_bytes();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// What a node accepts of a credential beyond its signature.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Now, Unix seconds.
    pub now_secs: u64,
    /// The furthest `exp` may be from now, in seconds.
    pub max_lifetime_secs: u64,
}

/// Checks a credential under `policy`; `keys_of` gives the keys of an app id, if the app
/// exists.
pub fn verify<'a>(
    credential: &str,
    keys_of: impl Fn(&str) -> Option<AppKeys<'a>>,
    policy: Policy,
) -> Result<Claims, CredentialError> {
    if credential.len() > MAX_CREDENTIAL_LEN {
        return Err(CredentialError::Malformed);
    }
    let mut parts = credential.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CredentialError::Malformed);
    };
    let header: Header = decode_part(header)?;
    if header.alg != "HS256" {
        return Err(CredentialError::Algorithm);
    }
    let claims_value: Claims = decode_part(claims)?;
    let keys = keys_of(&claims_value.app).ok_or(CredentialError::UnknownApp)?;
    let keys_have_ids =
        keys.current.kid.is_some() || keys.previous.is_some_and(|key| key.kid.is_some());
    let candidates: Vec<Key<'_>> = match header.kid.as_deref().filter(|_| keys_have_ids) {
        Some(kid) => {
            let named = std::iter::once(keys.current)
                .chain(keys.previous)
                .find(|key| key.kid == Some(kid));
            vec![named.ok_or(CredentialError::UnknownKey)?]
        }
        None => std::iter::once(keys.current).chain(keys.previous).collect(),
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| CredentialError::Malformed)?;
    let signing_input = credential
        .rsplit_once('.')
        .map_or("", |(signing_input, _)| signing_input);
    let signed = candidates.iter().any(|key| {
        mac(key.secret, signing_input.as_bytes())
            .verify_slice(&signature)
            .is_ok()
    });
    if !signed {
        return Err(CredentialError::Signature);
    }
    let now = policy.now_secs;
    if claims_value.exp.saturating_add(LEEWAY_SECS) < now {
        return Err(CredentialError::Expired);
    }
    if claims_value
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
    {
        return Err(CredentialError::NotYetValid);
    }
    let latest = now
        .saturating_add(policy.max_lifetime_secs)
        .saturating_add(LEEWAY_SECS);
    if claims_value.exp > latest {
        return Err(CredentialError::TooLong);
    }
    if !valid_uid(&claims_value.sub) {
        return Err(CredentialError::InvalidUid);
    }
    Ok(claims_value)
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, CredentialError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| CredentialError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| CredentialError::Malformed)
}

fn mac(secret: &[u8], input: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(input);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"ssssssssssssssssssssssssssssssss";
    const OTHER: &[u8] = b"tttttttttttttttttttttttttttttttt";
    const DAY: u64 = 86_400;

    fn key(secret: &'static [u8]) -> Key<'static> {
        Key { secret, kid: None }
    }

    fn demo(id: &str) -> Option<AppKeys<'static>> {
        (id == "demo").then_some(AppKeys {
            current: key(SECRET),
            previous: None,
        })
    }

    fn at(now_secs: u64) -> Policy {
        Policy {
            now_secs,
            max_lifetime_secs: DAY,
        }
    }

    #[test]
    fn minted_credentials_verify() {
        let credential = mint("demo", key(SECRET), "alice", 1_000, 60);
        let claims = verify(&credential, demo, at(1_030)).expect("valid credential");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.app, "demo");
    }

    #[test]
    fn refuses_expired_forged_and_foreign_credentials() {
        let credential = mint("demo", key(SECRET), "alice", 1_000, 60);
        assert_eq!(
            verify(&credential, demo, at(1_000 + 60 + LEEWAY_SECS + 1)),
            Err(CredentialError::Expired)
        );
        let forged = mint("demo", key(OTHER), "alice", 1_000, 60);
        assert_eq!(
            verify(&forged, demo, at(1_000)),
            Err(CredentialError::Signature)
        );
        assert_eq!(
            verify(&credential, |_| None, at(1_000)),
            Err(CredentialError::UnknownApp)
        );
        assert_eq!(
            verify("a.b", demo, at(1_000)),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            verify("!!.??.**", demo, at(1_000)),
            Err(CredentialError::Malformed)
        );
    }

    #[test]
    fn refuses_alg_none() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let claims =
            URL_SAFE_NO_PAD.encode(br#"{"app":"demo","sub":"a","iat":0,"exp":9999999999}"#);
        let credential = format!("{header}.{claims}.");
        assert_eq!(
            verify(&credential, demo, at(1_000)),
            Err(CredentialError::Algorithm)
        );
    }

    #[test]
    fn not_before_and_the_longest_lifetime_are_checked() {
        let header = Header {
            alg: "HS256".into(),
            typ: None,
            kid: None,
        };
        let claims = |nbf: Option<u64>, exp: u64| Claims {
            app: "demo".into(),
            sub: "alice".into(),
            iat: 1_000,
            exp,
            nbf,
        };
        let early = sign(&header, &claims(Some(5_000), 6_000), SECRET);
        assert_eq!(
            verify(&early, demo, at(1_000)),
            Err(CredentialError::NotYetValid)
        );
        assert!(verify(&early, demo, at(5_000 - LEEWAY_SECS)).is_ok());
        let forever = sign(&header, &claims(None, u64::MAX), SECRET);
        assert_eq!(
            verify(&forever, demo, at(1_000)),
            Err(CredentialError::TooLong)
        );
        let a_day = sign(&header, &claims(None, 1_000 + DAY), SECRET);
        assert!(verify(&a_day, demo, at(1_000)).is_ok());
        let a_day_and_more = sign(
            &header,
            &claims(None, 1_000 + DAY + LEEWAY_SECS + 1),
            SECRET,
        );
        assert_eq!(
            verify(&a_day_and_more, demo, at(1_000)),
            Err(CredentialError::TooLong)
        );
    }

    #[test]
    fn during_a_rotation_both_keys_verify_and_a_kid_selects_one() {
        let rotating = |id: &str| {
            (id == "demo").then_some(AppKeys {
                current: Key {
                    secret: OTHER,
                    kid: Some("2026-11"),
                },
                previous: Some(Key {
                    secret: SECRET,
                    kid: Some("2026-05"),
                }),
            })
        };
        let old_key = Key {
            secret: SECRET,
            kid: Some("2026-05"),
        };
        let new_key = Key {
            secret: OTHER,
            kid: Some("2026-11"),
        };
        for signer in [old_key, new_key, key(SECRET), key(OTHER)] {
            let credential = mint("demo", signer, "alice", 1_000, 60);
            assert!(
                verify(&credential, rotating, at(1_000)).is_ok(),
                "{signer:?}"
            );
        }
        // A kid selects its key: the other secret does not pass under it.
        let wrong = mint(
            "demo",
            Key {
                secret: OTHER,
                kid: Some("2026-05"),
            },
            "alice",
            1_000,
            60,
        );
        assert_eq!(
            verify(&wrong, rotating, at(1_000)),
            Err(CredentialError::Signature)
        );
        let unknown = mint(
            "demo",
            Key {
                secret: OTHER,
                kid: Some("2025-01"),
            },
            "alice",
            1_000,
            60,
        );
        assert_eq!(
            verify(&unknown, rotating, at(1_000)),
            Err(CredentialError::UnknownKey)
        );
        // Once the old key is gone, what it signed is refused.
        let old = mint("demo", old_key, "alice", 1_000, 60);
        let rotated = |id: &str| {
            (id == "demo").then_some(AppKeys {
                current: new_key,
                previous: None,
            })
        };
        assert_eq!(
            verify(&old, rotated, at(1_000)),
            Err(CredentialError::UnknownKey)
        );
    }

    #[test]
    fn a_kid_is_ignored_by_an_app_whose_keys_have_none() {
        let named = Key {
            secret: SECRET,
            kid: Some("anything"),
        };
        let credential = mint("demo", named, "alice", 1_000, 60);
        assert!(verify(&credential, demo, at(1_000)).is_ok());
    }

    #[test]
    fn uids_are_checked_by_one_rule() {
        for uid in ["alice", "张伟", "a b", &"u".repeat(MAX_UID_LEN)] {
            assert!(valid_uid(uid), "{uid}");
            let credential = mint("demo", key(SECRET), uid, 1_000, 60);
            assert!(verify(&credential, demo, at(1_000)).is_ok(), "{uid}");
        }
        for uid in [
            "",
            "carl\0evil",
            "line\nbreak",
            "\u{7f}",
            &"u".repeat(MAX_UID_LEN + 1),
        ] {
            assert!(!valid_uid(uid), "{uid:?}");
            let credential = mint("demo", key(SECRET), uid, 1_000, 60);
            assert_eq!(
                verify(&credential, demo, at(1_000)),
                Err(CredentialError::InvalidUid),
                "{uid:?}"
            );
        }
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let credential = mint("demo", key(SECRET), "alice", 1_000, 60);
        let mut parts: Vec<&str> = credential.split('.').collect();
        let evil =
            URL_SAFE_NO_PAD.encode(br#"{"app":"demo","sub":"mallory","iat":1000,"exp":1060}"#);
        parts[1] = &evil;
        assert_eq!(
            verify(&parts.join("."), demo, at(1_000)),
            Err(CredentialError::Signature)
        );
    }
}
