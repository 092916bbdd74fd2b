//! Device credentials: short-lived JWTs (RFC 7519) signed HS256 with the app's secret.
//!
//! An app backend mints one per device session, naming the app (`app`) and the user
//! (`sub`); the device presents it in its Hello, and the node checks signature, algorithm
//! and expiry before the device may say anything else. Only HS256 is accepted: a token naming any other `alg` (including `none`) is refused.
//! The format is small enough that signing and checking take a few lines over `hmac`, where
//! a general JWT crate would bring RSA and elliptic-curve code Pigeon never uses.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Seconds of clock skew tolerated when checking `exp` and `iat`.
const LEEWAY_SECS: u64 = 30;

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
    /// The signature does not match the app's secret.
    #[error("credential signature is invalid")]
    Signature,
    /// `exp` is in the past.
    #[error("credential has expired")]
    Expired,
    /// `sub` is no valid uid (see [`valid_uid`]).
    #[error("credential has an invalid uid: 1 to 256 bytes, no control characters")]
    InvalidUid,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Longest uid, in bytes.
pub const MAX_UID_LEN: usize = 256;

/// Whether `uid` is a valid user id: 1 to [`MAX_UID_LEN`] bytes of UTF-8 with no control
/// characters. The push API checks the uids it is given by the same rule, so a uid a
/// device can act for is exactly a uid a push can name.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= MAX_UID_LEN && !uid.chars().any(char::is_control)
}

/// Mints a credential for `uid` of the app `app` whose secret is `secret`, valid for
/// `ttl_secs` from `now_secs`.
pub fn mint(app: &str, secret: &[u8], uid: &str, now_secs: u64, ttl_secs: u64) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
    };
    let claims = Claims {
        app: app.to_owned(),
        sub: uid.to_owned(),
        iat: now_secs,
        exp: now_secs.saturating_add(ttl_secs),
    };
    // Serializing these two plain structs cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let claims = serde_json::to_vec(&claims).unwrap_or_default();
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

/// Checks a credential at `now_secs`; `secret_of` gives the secret of an app id, if the app
/// exists.
pub fn verify<'a>(
    credential: &str,
    secret_of: impl Fn(&str) -> Option<&'a [u8]>,
    now_secs: u64,
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
    let secret = secret_of(&claims_value.app).ok_or(CredentialError::UnknownApp)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| CredentialError::Malformed)?;
    let signing_input = credential
        .rsplit_once('.')
        .map_or("", |(signing_input, _)| signing_input);
    mac(secret, signing_input.as_bytes())
        .verify_slice(&signature)
        .map_err(|_| CredentialError::Signature)?;
    if claims_value.exp.saturating_add(LEEWAY_SECS) < now_secs {
        return Err(CredentialError::Expired);
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

    fn demo(id: &str) -> Option<&'static [u8]> {
        (id == "demo").then_some(SECRET)
    }

    #[test]
    fn minted_credentials_verify() {
        let credential = mint("demo", SECRET, "alice", 1_000, 60);
        let claims = verify(&credential, demo, 1_030).expect("valid credential");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.app, "demo");
    }

    #[test]
    fn refuses_expired_forged_and_foreign_credentials() {
        let credential = mint("demo", SECRET, "alice", 1_000, 60);
        assert_eq!(
            verify(&credential, demo, 1_000 + 60 + LEEWAY_SECS + 1),
            Err(CredentialError::Expired)
        );
        let forged = mint("demo", OTHER, "alice", 1_000, 60);
        assert_eq!(
            verify(&forged, demo, 1_000),
            Err(CredentialError::Signature)
        );
        assert_eq!(
            verify(&credential, |_| None, 1_000),
            Err(CredentialError::UnknownApp)
        );
        assert_eq!(verify("a.b", demo, 1_000), Err(CredentialError::Malformed));
        assert_eq!(
            verify("!!.??.**", demo, 1_000),
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
            verify(&credential, demo, 1_000),
            Err(CredentialError::Algorithm)
        );
    }

    #[test]
    fn uids_are_checked_by_one_rule() {
        for uid in ["alice", "张伟", "a b", &"u".repeat(MAX_UID_LEN)] {
            assert!(valid_uid(uid), "{uid}");
            let credential = mint("demo", SECRET, uid, 1_000, 60);
            assert!(verify(&credential, demo, 1_000).is_ok(), "{uid}");
        }
        for uid in [
            "",
            "carl\0evil",
            "line\nbreak",
            "\u{7f}",
            &"u".repeat(MAX_UID_LEN + 1),
        ] {
            assert!(!valid_uid(uid), "{uid:?}");
            let credential = mint("demo", SECRET, uid, 1_000, 60);
            assert_eq!(
                verify(&credential, demo, 1_000),
                Err(CredentialError::InvalidUid),
                "{uid:?}"
            );
        }
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let credential = mint("demo", SECRET, "alice", 1_000, 60);
        let mut parts: Vec<&str> = credential.split('.').collect();
        let evil =
            URL_SAFE_NO_PAD.encode(br#"{"app":"demo","sub":"mallory","iat":1000,"exp":1060}"#);
        parts[1] = &evil;
        assert_eq!(
            verify(&parts.join("."), demo, 1_000),
            Err(CredentialError::Signature)
        );
    }
}
