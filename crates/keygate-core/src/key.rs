//! The key format: `<prefix><random><checksum>`, its digest, and public key ids.
//!
//! A key is a configurable prefix (default `sk-kg-`), 32 base62 characters drawn from the
//! operating system's random source (about 190 bits), and a CRC32 of everything before it
//! written as 6 base62 characters. The checksum lets a typo or a made-up string be rejected
//! before any store lookup, and lets secret scanners match keygate keys with few false alarms.
//! Only the SHA-256 [`KeyDigest`] of a key is ever stored.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Base62 characters of randomness in a key.
pub const RANDOM_LEN: usize = 32;
/// Base62 characters of checksum at the end of a key.
pub const CHECKSUM_LEN: usize = 6;
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "sk-kg-";
/// The longest key prefix, in bytes.
pub(crate) const MAX_PREFIX_LEN: usize = 32;
const KEY_ID_PREFIX: &str = "key_";
const KEY_ID_RANDOM_LEN: usize = 16;

/// Why a presented string is not a well-formed key. Never carries the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// The key does not start with the expected prefix.
    #[error("key does not start with the expected prefix")]
    Prefix,
    /// The key has the wrong length.
    #[error("key has the wrong length")]
    Length,
    /// The key holds a character outside base62.
    #[error("key holds a character outside base62")]
    Charset,
    /// The checksum does not match.
    #[error("key checksum does not match")]
    Checksum,
}

/// Why a key format cannot be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFormatConfigError {
    /// The prefix is empty, longer than 32 bytes, or holds characters other than ASCII
    /// letters, digits, `-` and `_`.
    #[error("key prefix must be 1 to 32 ASCII letters, digits, '-' or '_'")]
    InvalidPrefix,
}

/// Failure of the operating system's random source.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(getrandom::Error);

/// The shape of keys: their prefix. Parsing and generation both go through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    prefix: Box<str>,
}

impl Default for KeyFormat {
    fn default() -> Self {
        KeyFormat {
            prefix: DEFAULT_PREFIX.into(),
        }
    }
}

impl KeyFormat {
    /// A format with the given prefix.
    ///
    /// # Errors
    ///
    /// [`KeyFormatConfigError::InvalidPrefix`] for an empty, over-long or oddly spelt prefix.
    pub fn with_prefix(prefix: &str) -> Result<Self, KeyFormatConfigError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(KeyFormatConfigError::InvalidPrefix);
        }
        Ok(KeyFormat {
            prefix: prefix.into(),
        })
    }

    /// The prefix of every key in this format.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Length in bytes of every key in this format.
    pub fn key_len(&self) -> usize {
        self.prefix.len() + RANDOM_LEN + CHECKSUM_LEN
    }

    /// Whether `s` starts with this format's prefix (a cheap test, no validation).
    pub fn has_prefix(&self, s: &str) -> bool {
        s.starts_with(&*self.prefix)
    }

    /// Makes a fresh key from the operating system's random source.
    ///
    /// # Errors
    ///
    /// When the random source fails; no key is made from weaker randomness.
    pub fn generate(&self) -> Result<SecretKey, RandomError> {
        let mut s = String::with_capacity(self.key_len());
        s.push_str(&self.prefix);
        push_random_base62(&mut s, RANDOM_LEN)?;
        let crc = crc32fast::hash(s.as_bytes());
        push_fixed_base62(&mut s, u64::from(crc), CHECKSUM_LEN);
        Ok(SecretKey(Zeroizing::new(s)))
    }

    /// Checks that `s` is a well-formed key in this format and returns its digest.
    ///
    /// Runs in time linear in the key's length and allocates nothing.
    ///
    /// # Errors
    ///
    /// A [`KeyFormatError`] naming which check failed (for logs and tests; a denial sent to a
    /// client must not say which).
    pub fn parse(&self, s: &str) -> Result<KeyDigest, KeyFormatError> {
        let rest = s
            .strip_prefix(&*self.prefix)
            .ok_or(KeyFormatError::Prefix)?;
        if rest.len() != RANDOM_LEN + CHECKSUM_LEN {
            return Err(KeyFormatError::Length);
        }
        if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyFormatError::Charset);
        }
        let split = s.len() - CHECKSUM_LEN;
        let expected = crc32fast::hash(&s.as_bytes()[..split]);
        let got = decode_base62(&s.as_bytes()[split..]);
        if got != Some(u64::from(expected)) {
            return Err(KeyFormatError::Checksum);
        }
        Ok(KeyDigest::of(s))
    }
}

/// A key's secret: shown once at creation, never stored, never logged.
///
/// `Debug` and `Display` print a redaction; the memory is wiped on drop. Call
/// [`SecretKey::expose`] to hand the secret to the person who asked for it.
pub struct SecretKey(Zeroizing<String>);

impl SecretKey {
    /// The secret itself. Show it once, to the person who created the key.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest to store.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(&self.0)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The SHA-256 digest of a key: the only form in which a key is stored.
///
/// Serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `secret`.
    pub fn of(secret: &str) -> Self {
        KeyDigest(Sha256::digest(secret.as_bytes()).into())
    }

    /// From raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    ///
    /// When `s` is not exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(DigestParseError);
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Ok(KeyDigest(out))
    }
}

fn hex_val(c: u8) -> Result<u8, DigestParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(DigestParseError),
    }
}

/// A digest that is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key digest must be 64 hex digits")]
pub struct DigestParseError;

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already uniformly distributed; eight bytes of it make a good hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A hasher for maps keyed by [`KeyDigest`]: uses the digest's own bytes, no rehashing.
///
/// Safe against hash flooding because a lookup cannot insert: a client choosing keys whose
/// digests collide only slows its own failed lookups against a table of honest digests.
#[derive(Default, Clone, Copy, Debug)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// `BuildHasher` for [`DigestHasher`].
pub type BuildDigestHasher = BuildHasherDefault<DigestHasher>;

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({self})")
    }
}

impl Serialize for KeyDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        KeyDigest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A key's public id (`key_…`): what logs, audit records, limits and the CLI name it by.
///
/// Cheap to clone (shared string). Never derived from the secret.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(std::sync::Arc<str>);

impl KeyId {
    /// A fresh random id `key_` + 16 base62 characters.
    ///
    /// # Errors
    ///
    /// When the operating system's random source fails.
    pub fn generate() -> Result<Self, RandomError> {
        let mut s = String::with_capacity(KEY_ID_PREFIX.len() + KEY_ID_RANDOM_LEN);
        s.push_str(KEY_ID_PREFIX);
        push_random_base62(&mut s, KEY_ID_RANDOM_LEN)?;
        Ok(KeyId(s.into()))
    }

    /// An id with the given text (ids of keys made elsewhere, subjects of external tokens).
    pub fn new(id: impl Into<std::sync::Arc<str>>) -> Self {
        KeyId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<KeyId> for std::sync::Arc<str> {
    /// The shared text, without copying it (for labels, maps keyed by `Arc<str>`).
    fn from(id: KeyId) -> Self {
        id.0
    }
}

impl std::borrow::Borrow<str> for KeyId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn push_random_base62(out: &mut String, n: usize) -> Result<(), RandomError> {
    let mut pushed = 0;
    let mut buf = [0u8; 64];
    while pushed < n {
        getrandom::fill(&mut buf).map_err(RandomError)?;
        for &b in &buf {
            // 248 = 4 * 62: rejecting the top 8 values keeps every character equally likely.
            if b < 248 && pushed < n {
                out.push(char::from(BASE62[usize::from(b % 62)]));
                pushed += 1;
            }
        }
    }
    Ok(())
}

pub(crate) fn push_fixed_base62(out: &mut String, mut v: u64, width: usize) {
    let mut digits = [b'0'; 16];
    for d in digits[..width].iter_mut().rev() {
        *d = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out.extend(digits[..width].iter().map(|&b| char::from(b)));
}

pub(crate) fn decode_base62(s: &[u8]) -> Option<u64> {
    s.iter().try_fold(0u64, |acc, &c| {
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_key_parses_to_its_digest() {
        let format = KeyFormat::default();
        let key = format.generate().unwrap();
        assert!(key.expose().starts_with("sk-kg-"));
        assert_eq!(key.expose().len(), format.key_len());
        assert_eq!(format.parse(key.expose()).unwrap(), key.digest());
    }

    #[test]
    fn two_generated_keys_differ() {
        let format = KeyFormat::default();
        assert_ne!(
            format.generate().unwrap().expose(),
            format.generate().unwrap().expose()
        );
    }

    #[test]
    fn each_malformed_shape_is_rejected() {
        let format = KeyFormat::default();
        let key = format.generate().unwrap();
        let good = key.expose();
        assert_eq!(
            format.parse(&good.replacen("sk-kg-", "sk-xx-", 1)),
            Err(KeyFormatError::Prefix)
        );
        assert_eq!(format.parse(""), Err(KeyFormatError::Prefix));
        assert_eq!(
            format.parse(&good[..good.len() - 1]),
            Err(KeyFormatError::Length)
        );
        assert_eq!(
            format.parse(&format!("{good}A")),
            Err(KeyFormatError::Length)
        );
        let mut bad = good.to_owned();
        bad.replace_range(10..11, "!");
        assert_eq!(format.parse(&bad), Err(KeyFormatError::Charset));
        let mut bad = good.to_owned();
        bad.replace_range(10..11, "é");
        assert!(format.parse(&bad).is_err());
    }

    #[test]
    fn one_changed_character_fails_the_checksum() {
        let format = KeyFormat::default();
        let key = format.generate().unwrap();
        let good = key.expose();
        for i in format.prefix().len()..good.len() {
            let mut bytes = good.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(format.parse(&typo), Err(KeyFormatError::Checksum), "at {i}");
        }
    }

    #[test]
    fn custom_prefix_is_validated_and_used() {
        assert!(KeyFormat::with_prefix("").is_err());
        assert!(KeyFormat::with_prefix("sk live").is_err());
        let format = KeyFormat::with_prefix("acme_").unwrap();
        let key = format.generate().unwrap();
        assert!(key.expose().starts_with("acme_"));
        assert!(format.parse(key.expose()).is_ok());
        assert_eq!(
            KeyFormat::default().parse(key.expose()),
            Err(KeyFormatError::Prefix)
        );
    }

    #[test]
    fn secret_is_redacted_in_debug_and_display() {
        let key = KeyFormat::default().generate().unwrap();
        assert!(!format!("{key:?}{key}").contains(key.expose()));
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = KeyDigest::of("hello");
        assert_eq!(
            d.to_string(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(KeyDigest::from_hex(&d.to_string()).unwrap(), d);
        assert!(KeyDigest::from_hex("zz").is_err());
        assert!(KeyDigest::from_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn key_id_and_group_give_their_shared_text_without_copying() {
        let text: std::sync::Arc<str> = "key_abc".into();
        let id = KeyId::new(text.clone());
        let back: std::sync::Arc<str> = id.into();
        assert!(std::sync::Arc::ptr_eq(&text, &back));
        let name: std::sync::Arc<str> = "chat.completions".into();
        let group = crate::EndpointGroup::new(name.clone());
        let back: std::sync::Arc<str> = group.into();
        assert!(std::sync::Arc::ptr_eq(&name, &back));
    }

    #[test]
    fn key_ids_have_the_public_prefix() {
        let id = KeyId::generate().unwrap();
        assert!(id.as_str().starts_with("key_"));
        assert_eq!(id.as_str().len(), 20);
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic_and_rarely_pass(s in "\\PC{0,64}") {
            let format = KeyFormat::default();
            if format.parse(&s).is_ok() {
                // Only a string with a valid checksum may pass.
                let split = s.len() - CHECKSUM_LEN;
                prop_assert_eq!(
                    decode_base62(&s.as_bytes()[split..]),
                    Some(u64::from(crc32fast::hash(&s.as_bytes()[..split])))
                );
            }
        }

        #[test]
        fn base62_fixed_width_round_trips(v in 0u64..(1u64 << 32)) {
            let mut s = String::new();
            push_fixed_base62(&mut s, v, CHECKSUM_LEN);
            prop_assert_eq!(s.len(), CHECKSUM_LEN);
            prop_assert_eq!(decode_base62(s.as_bytes()), Some(v));
        }
    }
}
