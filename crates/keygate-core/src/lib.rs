//! Shared types of keygate: the key format and digests, key and project records, the
//! [`KeyStore`] trait and the [`Snapshot`] stores serve from, the values layers hand each other
//! in `http::Extensions`, and the one [`Denial`] builder every layer answers with. The stores
//! themselves (memory, TOML file, SQLite) are in `keygate-store`.
//!
//! ```
//! use keygate_core::{KeyFormat, KeyId, KeyRecord, Permissions, ProjectRecord, Snapshot, Timestamp};
//!
//! // Make a key: the secret is shown once; only its digest is stored.
//! let format = KeyFormat::default();
//! let secret = format.generate()?;
//! let mut record = KeyRecord::new(KeyId::generate()?, "default", secret.digest(), Timestamp::UNIX_EPOCH);
//! record.permissions = Permissions::ReadOnly;
//! let keys = Snapshot::new([ProjectRecord::new("default")], [record])?;
//!
//! // A request presents the secret; parsing checks the checksum before any lookup.
//! let digest = format.parse(secret.expose())?;
//! let found = keys.get(&digest).expect("the key is in the snapshot");
//! assert_eq!(found.key.permissions, Permissions::ReadOnly);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod auth;
mod clock;
pub mod conditions;
mod denial;
mod ext;
pub mod facts;
mod key;
mod limits;
pub mod objects;
mod principal;
mod record;
pub mod redact;
mod rights;
mod store;
mod trace;

pub use auth::{NoTokens, TokenError, TokenVerifier};
pub use clock::{Clock, ManualClock, Timestamp};
pub use conditions::Condition;
pub use denial::{
    Denial, INVALID_CREDENTIAL_MESSAGE, ResponseBody, ResponseFuture, Stage, deny, is_grpc,
    is_json_media_type, retry_after_secs,
};
pub use ext::{
    Alert, AlertKind, AlertSink, ClientIp, EndpointMatch, RequestedModel, Usage, UsageMeter,
    UsageSource,
};
pub use facts::{Generation, ModelSource, ObjectRef, PromptSize, Protocol, RefAt, RequestFacts};
pub use key::{
    BuildDigestHasher, CHECKSUM_LEN, DEFAULT_PREFIX, DigestHasher, DigestParseError, KeyDigest,
    KeyFormat, KeyFormatConfigError, KeyFormatError, KeyId, RANDOM_LEN, RandomError, SecretKey,
};
pub use limits::{Budget, Limits, ModelLimits, Money, MoneyParseError, Period};
pub use objects::{
    MemoryRegistry, ObjectKind, ObjectRecord, ObjectRegistry, RegistryError, RegistryFuture,
};
pub use principal::{Credential, LimitScope, Principal};
pub use record::{
    KeyRecord, PreviousSecret, ProjectRecord, Rejection, Restriction, Secret, canonical_ip,
    ip_in_ranges,
};
pub use redact::{
    DEFAULT_SECRET_PREFIXES, REDACTED, SecretPrefixError, SecretScanner, could_be_secret,
    redact_path,
};
pub use rights::{Access, EndpointGroup, ModelPattern, ModelPatternError, ModelRules, Permissions};
pub use store::{KeyStore, Lookup, Snapshot, SnapshotError, StoreError};
pub use trace::{Cut, RequestTrace};
