//! Where keys live, as a URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The store URL a gateway uses when none is configured.
pub const DEFAULT_STORE_URL: &str = "sqlite:keygate.db";

/// Where keys live: `sqlite:PATH`, the path relative (`sqlite:keygate.db`) or absolute
/// (`sqlite:/var/lib/keygate/keygate.db`), or a PostgreSQL database
/// (`postgres://user:password@host:5432/keygate`, `postgresql://…`, a Unix socket directory
/// as the host: `postgres://keygate@%2Frun%2Fpostgresql/keygate`). `sqlite://PATH` is read
/// the same way as `sqlite:PATH`, so `sqlite:///var/lib/keygate.db` is absolute.
///
/// Printed (and debug-printed) without its password.
///
/// ```
/// use keygate_store::StoreUrl;
/// let url: StoreUrl = "sqlite:keygate.db".parse()?;
/// assert_eq!(url, StoreUrl::Sqlite("keygate.db".into()));
/// assert_eq!(url.to_string(), "sqlite:keygate.db");
///
/// let url: StoreUrl = "postgres://keygate:hunter2@db.internal/keygate".parse()?;
/// assert_eq!(url.to_string(), "postgres://keygate:***@db.internal/keygate");
/// assert!("redis://localhost".parse::<StoreUrl>().is_err());
/// # Ok::<(), keygate_store::StoreUrlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(PostgresUrl),
}

/// A PostgreSQL connection URL: [`as_str`](Self::as_str) gives it whole (to connect with);
/// `Display` and `Debug` hide its password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The whole URL, password included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://user:password@host... → scheme://user:***@host...
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("postgres", &self.0));
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let path = match path.split_once('?') {
            // Parameters may carry a password too: named only.
            Some((p, query)) => {
                let names: Vec<&str> = query
                    .split('&')
                    .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
                    .map(|k| if k == "password" { "password=***" } else { k })
                    .collect();
                format!("{p}?{}", names.join("&"))
            }
            None => path.to_owned(),
        };
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                let hidden = if userinfo.contains(':') { ":***" } else { "" };
                write!(f, "{scheme}://{user}{hidden}@{host}{path}")
            }
            None => write!(f, "{scheme}://{authority}{path}"),
        }
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({self})")
    }
}

impl StoreUrl {
    /// The database file, for a file-backed store.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StoreUrl::Sqlite(path) => Some(path),
            StoreUrl::Postgres(_) => None,
        }
    }
}

/// A store URL that is not one of the accepted forms.
///
/// The message names the scheme only: a URL may carry a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported store URL{scheme}: accepted forms are sqlite:PATH (for example {DEFAULT_STORE_URL}) and postgres://USER:PASSWORD@HOST/DATABASE"
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
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(PostgresUrl(s.to_owned())));
        }
        let scheme = match s.split_once(':') {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
            {
                format!(" scheme {scheme:?}")
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
            StoreUrl::Postgres(url) => url.fmt(f),
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
            "mysql://admin:hunter2@db/keys",
            "redis://localhost",
            "keygate.db",
            "sqlite:",
        ] {
            let msg = text.parse::<StoreUrl>().unwrap_err().to_string();
            assert!(msg.contains("sqlite:PATH"), "{msg}");
            assert!(msg.contains("postgres://"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn postgres_urls_are_kept_whole_and_printed_without_their_password() {
        for (text, shown) in [
            (
                "postgres://k:hunter2@db:5432/keys",
                "postgres://k:***@db:5432/keys",
            ),
            ("postgresql://k@db/keys", "postgresql://k@db/keys"),
            (
                "postgres://k@%2Frun%2Fpg/keys",
                "postgres://k@%2Frun%2Fpg/keys",
            ),
            (
                "postgres://db/keys?user=k&password=hunter2&sslmode=disable",
                "postgres://db/keys?user&password=***&sslmode",
            ),
            ("postgres://k:hunter2@db", "postgres://k:***@db"),
        ] {
            let url: StoreUrl = text.parse().unwrap();
            let StoreUrl::Postgres(pg) = &url else {
                panic!("{text} is not a PostgreSQL URL");
            };
            assert_eq!(pg.as_str(), text);
            assert_eq!(url.to_string(), shown);
            assert!(!format!("{url:?}").contains("hunter2"));
            assert_eq!(url.path(), None);
        }
    }
}
