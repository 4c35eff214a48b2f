//! The demo key file: five keys that each show one kind of rule.

use std::io::{self, Write};
use std::num::NonZeroU32;
use std::path::Path;

use keygate::{
    Access, Budget, KeyFile, KeyFormat, KeyId, KeyRecord, ModelPattern, ModelRules, Money, Period,
    Permissions, ProjectRecord, SecretKey, Timestamp,
};

/// A demo key created on first run.
#[derive(Debug)]
pub struct DemoKey {
    /// Its name (`full`, `chat-mini`, ...).
    pub name: &'static str,
    /// What it may do, in words.
    pub description: &'static str,
    /// The secret, shown once.
    pub secret: SecretKey,
}

/// A demo key: name, description, and how to make its record.
type Spec = (&'static str, &'static str, fn(&mut KeyRecord));

/// The demo keys.
fn specs() -> Vec<Spec> {
    vec![
        ("full", "everything (permissions All)", |_k| {}),
        (
            "chat-mini",
            "chat.completions write + models read, only gpt-4o-mini, budget $0.05/day",
            |k| {
                k.permissions = Permissions::Restricted(
                    [
                        ("chat.completions".to_owned(), Access::Write),
                        ("models".to_owned(), Access::Read),
                    ]
                    .into(),
                );
                if let Ok(p) = ModelPattern::new("gpt-4o-mini") {
                    k.models = ModelRules::allow_only([p]);
                }
                k.limits.budgets.push(Budget {
                    amount: Money::from_micros(50_000),
                    period: Period::Day,
                    model: None,
                });
            },
        ),
        (
            "readonly",
            "read-only: GET /v1/models works, POSTs get 403",
            |k| {
                k.permissions = Permissions::ReadOnly;
            },
        ),
        (
            "limited",
            "everything, at most 2 requests per minute",
            |k| {
                k.limits.requests_per_minute = NonZeroU32::new(2);
            },
        ),
        (
            "vpn-only",
            "everything, but only from 10.0.0.0/8 (so not from here)",
            |k| {
                if let Ok(net) = "10.0.0.0/8".parse() {
                    k.allowed_ips = vec![net];
                }
            },
        ),
    ]
}

/// The demo project and keys, and the keys' secrets.
///
/// # Errors
///
/// When the operating system's randomness fails.
pub fn records() -> io::Result<(KeyFile, Vec<DemoKey>)> {
    let now = Timestamp::from_unix_secs(keygate::Clock::system().now().as_unix_secs());
    let format = KeyFormat::default();
    let mut file = KeyFile::default();
    file.projects.push(ProjectRecord::new("demo"));
    let mut keys = Vec::new();
    for (name, description, edit) in specs() {
        let secret = format.generate().map_err(io::Error::other)?;
        let id = KeyId::generate().map_err(io::Error::other)?;
        let mut record = KeyRecord::new(id, "demo", secret.digest(), now);
        record.name = name.to_owned();
        record.permissions = Permissions::All;
        edit(&mut record);
        file.keys.push(record);
        keys.push(DemoKey {
            name,
            description,
            secret,
        });
    }
    Ok((file, keys))
}

/// Writes the demo key file at `path` and returns the keys with their secrets.
///
/// # Errors
///
/// When randomness or writing the file fails.
pub fn create(path: &Path) -> io::Result<Vec<DemoKey>> {
    let (file, keys) = records()?;
    file.save_atomic(path).map_err(io::Error::other)?;
    Ok(keys)
}

/// Puts the demo keys into the SQLite store at `path` if it holds no key yet (creating the
/// database if needed); returns them with their secrets, or `None` when the store already has
/// keys.
///
/// # Errors
///
/// When the database cannot be opened or written, or randomness fails.
pub fn create_in_store(path: &Path) -> io::Result<Option<Vec<DemoKey>>> {
    let mut db = keygate_store::Db::open(path).map_err(io::Error::other)?;
    if !db.keys(None).map_err(io::Error::other)?.is_empty() {
        return Ok(None);
    }
    let (file, keys) = records()?;
    db.import(&file, "demo").map_err(io::Error::other)?;
    Ok(Some(keys))
}

/// Prints the demo keys: with their secrets right after creation, else their names and how
/// to make new ones.
///
/// # Errors
///
/// When writing to `out` fails.
pub fn print(
    out: &mut dyn Write,
    addr: std::net::SocketAddr,
    source: &str,
    created: Option<&[DemoKey]>,
) -> io::Result<()> {
    match created {
        Some(keys) => {
            writeln!(
                out,
                "created demo keys in {source} (secrets are shown only now):"
            )?;
            for k in keys {
                writeln!(out, "  {:<10} {}", k.name, k.secret.expose())?;
                writeln!(out, "  {:<10} {}", "", k.description)?;
            }
        }
        None => {
            writeln!(out, "using the keys in {source}; the demo keys are:")?;
            for (name, description, _) in specs() {
                writeln!(out, "  {name:<10} {description}")?;
            }
            writeln!(
                out,
                "their secrets were shown on first run; delete the database to make new ones, or create a key:"
            )?;
            writeln!(
                out,
                "  keygate --store {source} keys create --project demo --permissions all"
            )?;
        }
    }
    writeln!(
        out,
        "try: curl -s http://{addr}/v1/models -H \"Authorization: Bearer <key>\""
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate::{FileStore, KeyFormat, Secret};

    #[test]
    fn demo_file_serves_every_printed_key_with_its_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        let keys = create(&path).unwrap();
        let store = FileStore::open(&path).unwrap().store();
        let now = keygate::Clock::system().now();
        for k in &keys {
            let digest = KeyFormat::default().parse(k.secret.expose()).unwrap();
            let found = store.get(&digest).unwrap();
            assert_eq!(found.key.name, k.name);
            assert_eq!(found.key.check_live(Secret::Current, now), Ok(()));
        }
        let find = |name: &str| {
            let k = keys.iter().find(|k| k.name == name).unwrap();
            store.get(&k.secret.digest()).unwrap().key
        };
        assert_eq!(find("readonly").permissions, Permissions::ReadOnly);
        assert_eq!(
            find("limited").limits.requests_per_minute,
            NonZeroU32::new(2)
        );
        assert_eq!(find("vpn-only").allowed_ips.len(), 1);
        let mini = find("chat-mini");
        assert!(mini.models.allow.is_some());
        assert_eq!(mini.limits.budgets.len(), 1);
        assert_eq!(mini.permissions.access("chat.completions"), Access::Write);
    }

    #[test]
    fn demo_keys_go_into_an_empty_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let keys = create_in_store(&db).unwrap().unwrap();
        assert_eq!(keys.len(), specs().len());
        assert!(
            create_in_store(&db).unwrap().is_none(),
            "a second run adds nothing"
        );
        let store = keygate_store::SqliteStore::open(&db).unwrap();
        for k in &keys {
            let found = store.store().get(&k.secret.digest()).unwrap();
            assert_eq!(found.key.name, k.name);
        }
    }

    #[test]
    fn later_runs_print_no_secret_and_name_the_cli() {
        let mut out = Vec::new();
        let addr = "127.0.0.1:8080".parse().unwrap();
        print(&mut out, addr, "sqlite:keygate.db", None).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("sk-kg-"));
        assert!(text.contains("shown on first run"));
        assert!(text.contains("keygate --store sqlite:keygate.db keys create"));
        assert!(text.contains("http://127.0.0.1:8080/v1/models"));
    }
}
