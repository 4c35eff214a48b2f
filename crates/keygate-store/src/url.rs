//! Where keys live, as a URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The store URL a gateway uses when none is configured.
pub const DEFAULT_STORE_URL: &str = "sqlite:keygate.db";

/// Where keys live: `sqlite:PATH`, the path relative (`sqlite:keygate.db`) or absolute
/// (`sqlite:/var/lib/keygate/keygate.db`). `sqlite://PATH` is read the same way, so
/// `sqlite:///var/lib/keygate.db` is absolute.
///
/// ```
/// use keygate_store::StoreUrl;
/// let url: StoreUrl = "sqlite:keygate.db".parse()?;
/// assert_eq!(url, StoreUrl::Sqlite("keygate.db".into()));
/// assert_eq!(url.to_string(), "sqlite:keygate.db");
/// assert!("redis://localhost".parse::<StoreUrl>().is_err());
/// # Ok::<(), keygate_store::StoreUrlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// A SQLite database file.
    Sqlite(PathBuf),
}

impl StoreUrl {
    /// The database file, for a file-backed store.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StoreUrl::Sqlite(path) => Some(path),
        }
    }
}

/// A store URL that is not one of the accepted forms.
///
/// The message names the scheme only: a URL may carry a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported store URL{scheme}: accepted forms are sqlite:PATH (for example {DEFAULT_STORE_URL})"
)]
pub struct StoreUrlError {
    scheme: String,
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreUrlError {
                    scheme: " (sqlite: without a path)".to_owned(),
                });
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        let scheme = match s.split_once(':') {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
            {
                let later = if matches!(scheme, "postgres" | "postgresql") {
                    ", not supported yet"
                } else {
                    ""
                };
                format!(" scheme {scheme:?}{later}")
            }
            _ => " (no scheme)".to_owned(),
        };
        Err(StoreUrlError { scheme })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => {
                let path = path.display().to_string();
                // A path that itself starts with `//` would otherwise lose it when parsed back.
                let slashes = if path.starts_with("//") { "//" } else { "" };
                write!(f, "sqlite:{slashes}{path}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_parse_and_print_back() {
        for (text, path) in [
            ("sqlite:keygate.db", "keygate.db"),
            ("sqlite:/var/lib/k.db", "/var/lib/k.db"),
            ("sqlite://k.db", "k.db"),
            ("sqlite:///abs/k.db", "/abs/k.db"),
            ("sqlite:////net/share/k.db", "//net/share/k.db"),
        ] {
            let url: StoreUrl = text.parse().unwrap();
            assert_eq!(url, StoreUrl::Sqlite(path.into()), "{text}");
            assert_eq!(url.to_string().parse::<StoreUrl>().unwrap(), url, "{text}");
        }
        assert_eq!(
            DEFAULT_STORE_URL.parse::<StoreUrl>().unwrap().to_string(),
            DEFAULT_STORE_URL
        );
    }

    #[test]
    fn other_urls_are_refused_naming_the_accepted_forms_but_no_password() {
        for text in [
            "postgres://admin:hunter2@db/keys",
            "redis://localhost",
            "keygate.db",
            "sqlite:",
        ] {
            let msg = text.parse::<StoreUrl>().unwrap_err().to_string();
            assert!(msg.contains("sqlite:PATH"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        let msg = "postgres://x".parse::<StoreUrl>().unwrap_err().to_string();
        assert!(msg.contains("\"postgres\", not supported yet"), "{msg}");
    }
}
