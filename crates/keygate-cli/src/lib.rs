//! The `keygate` command-line tool: `keygate serve` runs the [gateway]; the key commands
//! create, list, show, rotate, disable and revoke keys and create projects in a key file (the
//! TOML file a [`keygate_store::FileStore`] serves).
//!
//! The command logic lives here so tests run it in-process with an injected time; the binary
//! only wires process arguments, stdout and the system clock to [`run`].
//!
//! ```
//! use keygate_core::{KeyFormat, Secret, Timestamp};
//! use keygate_store::FileStore;
//!
//! let dir = std::env::temp_dir().join(format!("keygate-cli-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let file = dir.join("keys.toml");
//! let file = file.to_str().unwrap();
//! let now = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z")?;
//!
//! let mut out = Vec::new();
//! keygate_cli::run(["keygate", "--file", file, "projects", "create", "default"], now, &mut out)?;
//! let mut out = Vec::new();
//! keygate_cli::run(
//!     ["keygate", "--file", file, "--json", "keys", "create", "--project", "default",
//!      "--permissions", "read_only", "--expires-in", "30d"],
//!     now,
//!     &mut out,
//! )?;
//! let created: serde_json::Value = serde_json::from_slice(&out)?;
//! let secret = created["secret"].as_str().unwrap();
//!
//! // The key file holds the digest; the printed secret finds the key.
//! let store = FileStore::open(file)?;
//! let found = store.store().get(&KeyFormat::default().parse(secret)?).unwrap();
//! assert_eq!(found.key.check_live(Secret::Current, now), Ok(()));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use keygate_core::admin::{AdminKeyRecord, AdminScope, AuditBy, admin_key_format, admin_key_id};
use keygate_core::{
    Access, Budget, Condition, KeyDigest, KeyFormat, KeyId, KeyRecord, Limits, ModelPattern,
    ModelRules, Money, Period, Permissions, PreviousSecret, ProjectRecord, RandomError, Secret,
    Timestamp,
};
use keygate_store::{Db, FileStoreError, KeyFile, StoreUrl};
use serde_json::{Value, json};

pub mod gateway;
pub mod mock_upstream;
// The mock upstream's stateful objects, merged into `mock_upstream::router()`.
mod mock_objects;
mod remote;
mod store_ops;

use store_ops::StoreOps;

/// Why a command failed. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The arguments do not parse (or help/version was asked for): clap renders it.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// The arguments parse but do not make sense together, or a value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// No key with this id.
    #[error("no key {0:?} in the key file")]
    NoSuchKey(String),
    /// The key file could not be read, validated or written.
    #[error(transparent)]
    File(#[from] FileStoreError),
    /// The operating system's random source failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    /// The gateway could not start.
    #[error("{0}")]
    Serve(String),
    /// The store could not be opened, read or written.
    #[error(transparent)]
    Store(#[from] keygate_store::DbError),
    /// The gateway (`--server`) could not be reached, or refused the command.
    #[error("{0}")]
    Server(String),
}

impl CliError {
    /// The process exit code for this error: 2 for bad arguments (as clap), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(e) => u8::try_from(e.exit_code()).unwrap_or(2),
            CliError::Invalid(_) => 2,
            _ => 1,
        }
    }
}

fn invalid(msg: impl Into<String>) -> CliError {
    CliError::Invalid(msg.into())
}

/// Run the keygate gateway, and manage keys and projects in its store (SQLite by default), in
/// a TOML key file, or through a running gateway's admin API (`--server`).
///
/// Only digests of secrets are stored. Every change is one transaction (the store) or one
/// atomic replacement of the file.
#[derive(Debug, Parser)]
#[command(name = "keygate", version)]
struct Cli {
    /// The store the key commands and the gateway work on (`sqlite:PATH`, default
    /// `sqlite:keygate.db`; or `postgres://USER:PASSWORD@HOST/DATABASE`, key commands only
    /// so far).
    #[arg(long, global = true, env = "KEYGATE_STORE", conflicts_with = "file")]
    store: Option<String>,
    /// Work on this TOML key file instead of the store (for keys kept in git).
    #[arg(long, global = true, env = "KEYGATE_KEYS_FILE")]
    file: Option<PathBuf>,
    /// Drive a running gateway through its admin API instead (`https://keygate.example`,
    /// `http://127.0.0.1:8080`): no database access needed; every change is made and
    /// recorded by the gateway as the admin key's.
    #[arg(long, global = true, env = "KEYGATE_SERVER", conflicts_with_all = ["store", "file"])]
    server: Option<String>,
    /// The admin key (`kg-admin-…`) for `--server`; better given as KEYGATE_ADMIN_KEY, which
    /// stays out of the shell history and the process list.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// PEM certificates to trust for an `https://` `--server` (a private CA), besides the
    /// public roots.
    #[arg(long, global = true, value_name = "PEM")]
    server_ca: Option<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: every request checked, limited and audited, then forwarded to the
    /// model servers (the embedded mock with demo keys when nothing else is configured).
    Serve(Box<gateway::GatewayOptions>),
    /// Create, inspect, rotate, disable and revoke keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create and list projects.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// What keys have spent (from the store's ledger).
    #[command(subcommand)]
    Spend(SpendCommand),
    /// The objects each project owns (files, assistants, batches, ...): list them, import
    /// ones made before keygate, forget them.
    #[command(subcommand)]
    Objects(ObjectsCommand),
    /// Create, list and revoke admin keys: the credentials of the admin API (`/admin/v1/`),
    /// never of a model route.
    #[command(subcommand, name = "admin-keys")]
    AdminKeys(AdminKeysCommand),
}

#[derive(Debug, Subcommand)]
enum AdminKeysCommand {
    /// Create an admin key and print its secret, once.
    Create {
        /// Who holds it.
        #[arg(long)]
        name: String,
        /// What it may do: `read` or `manage` (every project), `read:P1,P2` or `manage:P1,P2`
        /// (those projects' keys). Only `manage` makes projects and admin keys.
        #[arg(long)]
        scope: AdminScope,
    },
    /// List admin keys (never their secrets).
    List,
    /// Revoke an admin key for good.
    Revoke {
        /// The admin key id (`adm_…`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ObjectsCommand {
    /// List a project's objects.
    List {
        /// The project.
        #[arg(long)]
        project: String,
        /// Only objects of this kind (`file`, `assistant`, `batch`, `thread`, ...).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Give a project objects made upstream without keygate (they are refused to everyone
    /// until imported). An id some project already owns keeps its owner.
    Import {
        /// The project that owns them.
        #[arg(long)]
        project: String,
        /// Their kind (`file`, `assistant`, `batch`, `thread`, `vector_store`,
        /// `fine_tuning_job`, `fine_tuning_checkpoint`, `response`, ...).
        #[arg(long)]
        kind: String,
        /// For assistants and runs: the model they use (checked against keys' model rules).
        #[arg(long)]
        model: Option<String>,
        /// For batch input files: a model their requests name (repeat for each); without
        /// it, a key with model rules cannot run a batch of the file.
        #[arg(long = "batch-model")]
        batch_models: Vec<String>,
        /// The upstream's ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Forget objects (they are then refused to everyone).
    Remove {
        /// The ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SpendCommand {
    /// Each money budget of a key and of its project in the current period: limit, spent,
    /// reserved by requests in flight, remaining, and when the period resets (UTC).
    Show {
        /// The key id (`key_…`).
        id: String,
        /// On a PostgreSQL store: the shared counters (`redis://…`, or cluster nodes
        /// comma-separated) the gateways use, to show what requests in flight hold (the
        /// ledger has what is settled).
        #[arg(long)]
        counters: Option<String>,
    },
    /// Reset a key's own money budgets in their current periods (what they settled stops
    /// counting; requests in flight keep their holds), through the gateway (`--server`), so
    /// every replica's counters see it at once; recorded as an admin event.
    Reset {
        /// The key id (`key_…`).
        id: String,
        /// Only the budget on this model pattern (`*`: the one over every model).
        #[arg(long)]
        model: Option<String>,
        /// Only the budget of this period (`day`, `week`, `month`, `lifetime`).
        #[arg(long)]
        period: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret, once.
    Create(Box<CreateKey>),
    /// List keys (never their secrets).
    List {
        /// Only keys of this project.
        #[arg(long)]
        project: Option<String>,
    },
    /// Show one key (never its secret).
    Show {
        /// The key id (`key_…`).
        id: String,
    },
    /// Change a key's name, groups, labels or conditions (what is not given is kept).
    Update(UpdateKey),
    /// Revoke a key for good.
    Revoke {
        /// The key id.
        id: String,
    },
    /// Disable a key until it is enabled again.
    Disable {
        /// The key id.
        id: String,
    },
    /// Enable a disabled key.
    Enable {
        /// The key id.
        id: String,
    },
    /// Copy the projects and keys of a TOML key file into the store (one transaction; records
    /// with the same id are replaced).
    Import {
        /// The TOML key file.
        #[arg(value_name = "FILE")]
        source: PathBuf,
    },
    /// Write every project and key as a TOML key file (digests only), to stdout or a file.
    Export {
        /// Write here (atomically) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Give a key a new secret (printed once); the old one keeps working for the grace period.
    ///
    /// Only one old secret is kept: rotating again during a grace period ends the older one at
    /// once.
    Rotate {
        /// The key id.
        id: String,
        /// How long the old secret keeps working (`0s` ends it now; `30m`, `12h`, `7d`).
        #[arg(long, value_parser = parse_duration)]
        grace: Duration,
        /// The new secret's prefix (default `sk-kg-`): give the one the key was created with.
        #[arg(long)]
        prefix: Option<String>,
    },
}

#[derive(Debug, Args)]
struct UpdateKey {
    /// The key id.
    id: String,
    /// A new human name.
    #[arg(long)]
    name: Option<String>,
    /// Replace the holder's groups with these; repeatable.
    #[arg(long = "group", value_name = "GROUP", conflicts_with = "no_groups")]
    group: Vec<String>,
    /// Remove every group.
    #[arg(long)]
    no_groups: bool,
    /// Set a `key=value` label (others are kept); repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Remove a label; repeatable.
    #[arg(long = "remove-label", value_name = "KEY")]
    remove_label: Vec<String>,
    #[command(flatten)]
    conditions: ConditionEdit,
}

/// How a change edits a record's conditions.
#[derive(Debug, Args)]
struct ConditionEdit {
    #[command(flatten)]
    set: PolicyArgs,
    /// Add the `--policy` conditions to those there are, instead of replacing them.
    #[arg(long, requires = "policy")]
    add: bool,
    /// Remove every condition.
    #[arg(long, conflicts_with = "policy")]
    no_policies: bool,
}

impl ConditionEdit {
    fn apply(&self, policies: &mut Vec<Condition>) {
        if self.no_policies {
            policies.clear();
        } else if !self.set.policy.is_empty() {
            if !self.add {
                policies.clear();
            }
            for c in &self.set.policy {
                if !policies.contains(c) {
                    policies.push(c.clone());
                }
            }
        }
    }
}

#[derive(Debug, Subcommand)]
enum ProjectsCommand {
    /// Create a project.
    Create(CreateProject),
    /// Change a project's name or conditions (what is not given is kept).
    Update {
        /// The project id.
        id: String,
        /// A new human name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conditions: ConditionEdit,
    },
    /// List projects.
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PermissionsArg {
    /// Write (and read) on every endpoint group.
    All,
    /// Read on every endpoint group.
    #[value(name = "read_only", alias = "read-only")]
    ReadOnly,
    /// Only the groups given with `--scope`.
    Restricted,
}

/// Model, limit and network rules shared by keys and projects.
#[derive(Debug, Args)]
struct RuleArgs {
    /// Allow only models matching this pattern (`gpt-4o`, `gpt-4*`); repeatable.
    #[arg(long = "allow-model", value_name = "PATTERN")]
    allow_model: Vec<ModelPattern>,
    /// Never allow models matching this pattern; repeatable. Deny wins over allow.
    #[arg(long = "deny-model", value_name = "PATTERN")]
    deny_model: Vec<ModelPattern>,
    /// Requests per minute.
    #[arg(long, value_name = "N")]
    rpm: Option<NonZeroU32>,
    /// Tokens per minute.
    #[arg(long, value_name = "N")]
    tpm: Option<NonZeroU64>,
    /// A money budget `AMOUNT/PERIOD[/MODEL]` (`50/month`, `5.00/day/gpt-4*`); periods: day,
    /// week, month, lifetime; repeatable.
    #[arg(long, value_name = "AMOUNT/PERIOD[/MODEL]", value_parser = parse_budget)]
    budget: Vec<Budget>,
    /// Allow use only from this address range (`10.0.0.0/8`, `2001:db8::/32`, or one
    /// address); repeatable.
    #[arg(long = "allow-ip", value_name = "CIDR", value_parser = parse_ip_range)]
    allow_ip: Vec<IpNet>,
    #[command(flatten)]
    policies: PolicyArgs,
}

/// Conditions every request must meet, as data in the record.
#[derive(Debug, Args)]
struct PolicyArgs {
    /// A condition every request must meet, in one line; repeatable:
    /// `members_only GROUP models=PATTERN,... endpoints=GROUP,...` (those only for the
    /// group's members), `time_window mon-fri 09:00-17:00 [group=G]` (UTC),
    /// `require_label KEY[=VALUE]`, `require_group GROUP`.
    #[arg(long = "policy", value_name = "CONDITION")]
    policy: Vec<Condition>,
}

impl RuleArgs {
    fn models(&self) -> ModelRules {
        ModelRules {
            allow: (!self.allow_model.is_empty()).then(|| self.allow_model.clone()),
            deny: self.deny_model.clone(),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            requests_per_minute: self.rpm,
            tokens_per_minute: self.tpm,
            budgets: self.budget.clone(),
            models: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Args)]
struct CreateKey {
    /// The project the key belongs to.
    #[arg(long)]
    project: String,
    /// Create the project (with no rules of its own) if it does not exist.
    #[arg(long)]
    create_project: bool,
    /// A human name.
    #[arg(long, default_value = "")]
    name: String,
    /// What the key may do. Required unless `--scope` is given (which implies `restricted`).
    #[arg(long, value_enum)]
    permissions: Option<PermissionsArg>,
    /// Access to one endpoint group, `GROUP=none|read|write` (`chat.completions=write`);
    /// repeatable; with `--permissions restricted`.
    #[arg(long, value_name = "GROUP=ACCESS", value_parser = parse_scope)]
    scope: Vec<(String, Access)>,
    #[command(flatten)]
    rules: RuleArgs,
    /// A free `key=value` tag; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// A group the key's holder belongs to; repeatable.
    #[arg(long, value_name = "GROUP")]
    group: Vec<String>,
    /// The key stops working this long from now (`90s`, `30m`, `12h`, `7d`, `2w`).
    #[arg(long, value_parser = parse_duration, conflicts_with = "expires_at")]
    expires_in: Option<Duration>,
    /// The key stops working at this instant (RFC 3339).
    #[arg(long, value_parser = parse_timestamp)]
    expires_at: Option<Timestamp>,
    /// The key does not work before this instant (RFC 3339).
    #[arg(long, value_parser = parse_timestamp)]
    not_before: Option<Timestamp>,
    /// The secret's prefix (default `sk-kg-`); the serving layer must use the same prefix.
    #[arg(long)]
    prefix: Option<String>,
    /// Make this many keys with the same rules in one transaction, printing one `ID SECRET`
    /// line each (or `{"keys":[{"id","secret"}...]}` with `--json`).
    #[arg(long, default_value = "1")]
    count: std::num::NonZeroUsize,
}

#[derive(Debug, Args)]
struct CreateProject {
    /// The project id: 1 to 64 ASCII letters, digits, `-`, `_`, `.`.
    id: String,
    /// A human name.
    #[arg(long, default_value = "")]
    name: String,
    #[command(flatten)]
    rules: RuleArgs,
}

/// Runs one `keygate` command. `args` starts with the program name, as `std::env::args_os`;
/// `now` is the time every timestamp written is taken from; output goes to `out` (text, or one
/// JSON document with `--json`).
///
/// Key commands work on the store (`--store`, default `sqlite:keygate.db`), where every change
/// is one transaction, so concurrent runs and a running gateway never lose each other's
/// writes; or, with `--file`, on a TOML key file, where a change validates the whole result
/// first and writes it with [`KeyFile::save_atomic`]. On any error nothing is changed.
///
/// # Errors
///
/// A [`CliError`]; [`CliError::exit_code`] says how the process should exit.
pub fn run<I, T>(args: I, now: Timestamp, out: &mut impl Write) -> Result<(), CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    let target = match (&cli.command, &cli.file, &cli.server) {
        (Command::Serve(_), _, _) => None,
        (_, _, Some(server)) => Some(Target::Server(Box::new(remote::Remote::connect(
            server,
            cli.admin_key.as_deref(),
            cli.server_ca.as_deref(),
        )?))),
        (_, Some(path), _) => Some(Target::File(path.clone())),
        (_, None, None) => Some(Target::open_store(
            cli.store
                .as_deref()
                .unwrap_or(keygate_store::DEFAULT_STORE_URL),
        )?),
    };
    let ctx = Ctx {
        target: target.unwrap_or(Target::File(PathBuf::new())),
        json: cli.json,
        now,
    };
    let text = match cli.command {
        Command::Serve(mut options) => {
            if options.store.is_none() {
                options.store = cli.store;
            }
            if options.keys_file.is_none() {
                options.keys_file = cli.file;
            }
            return serve(*options);
        }
        Command::Keys(cmd) => ctx.keys(cmd)?,
        Command::Projects(cmd) => ctx.projects(cmd)?,
        Command::Spend(SpendCommand::Show { id, counters }) => {
            ctx.spend(&id, counters.as_deref())?
        }
        Command::Spend(SpendCommand::Reset { id, model, period }) => {
            ctx.reset_spend(&id, model, period)?
        }
        Command::Objects(cmd) => ctx.objects(cmd)?,
        Command::AdminKeys(cmd) => ctx.admin_keys(cmd)?,
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `keygate serve`: the gateway on a multi-threaded runtime, printing to stdout, until
/// SIGTERM or Ctrl-C.
fn serve(mut options: gateway::GatewayOptions) -> Result<(), CliError> {
    if options.upstream.is_some() {
        options.upstream_api_key = std::env::var(gateway::UPSTREAM_KEY_ENV).ok();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut stdout = std::io::stdout();
        let gateway = gateway::start(options, &mut stdout)
            .await
            .map_err(|e| CliError::Serve(e.to_string()))?;
        gateway.run_until_signal().await;
        Ok(())
    })
}

/// What the key commands work on.
enum Target {
    /// A TOML key file: read, changed in memory, validated whole and replaced atomically.
    File(PathBuf),
    /// The database (SQLite or PostgreSQL): every change one transaction.
    Store(Box<dyn StoreOps>),
    /// A running gateway's admin API.
    Server(Box<remote::Remote>),
}

impl Target {
    fn open_store(url: &str) -> Result<Target, CliError> {
        let url: StoreUrl = url.parse().map_err(|e| invalid(format!("--store: {e}")))?;
        match url {
            StoreUrl::Sqlite(path) => Ok(Target::Store(Box::new(std::cell::RefCell::new(
                Db::open(&path)?,
            )))),
            StoreUrl::Postgres(pg) => Ok(Target::Store(Box::new(store_ops::PgOps::connect(
                pg.as_str(),
            )?))),
            other => Err(invalid(format!(
                "--store {other}: not supported by the key commands"
            ))),
        }
    }
}

struct Ctx {
    target: Target,
    json: bool,
    now: Timestamp,
}

impl Ctx {
    /// Everything, as a key file (from the file, or the store's export). A file that does not
    /// exist is empty when the command may create it.
    fn load(&self, may_create: bool) -> Result<KeyFile, CliError> {
        match &self.target {
            Target::File(path) => match KeyFile::load(path) {
                Err(FileStoreError::Io { source, .. })
                    if may_create && source.kind() == io::ErrorKind::NotFound =>
                {
                    Ok(KeyFile::default())
                }
                other => Ok(other?),
            },
            Target::Store(db) => Ok(db.export()?),
            Target::Server(r) => {
                let projects = r.get("/admin/v1/projects")?;
                let projects = projects["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| remote::record_of(p, remote::PROJECT_VIEW))
                    .collect::<Result<_, _>>()?;
                let keys = r
                    .all_keys(None)?
                    .iter()
                    .map(|k| remote::record_of(k, remote::KEY_VIEW))
                    .collect::<Result<_, _>>()?;
                Ok(KeyFile {
                    projects,
                    keys,
                    ..KeyFile::default()
                })
            }
        }
    }

    fn save_file(path: &Path, file: &KeyFile) -> Result<(), CliError> {
        // Never write a file a FileStore would refuse.
        file.to_snapshot(path)?;
        file.save_atomic(path)?;
        Ok(())
    }

    /// Changes one key with `change` and returns it as written.
    fn change_key(
        &self,
        id: &str,
        action: &'static str,
        change: impl FnOnce(&mut KeyRecord, Timestamp) -> Result<(), CliError>,
    ) -> Result<KeyRecord, CliError> {
        let now = self.now;
        match &self.target {
            Target::File(path) => {
                let mut file = self.load(false)?;
                let key = find_key_mut(&mut file, id)?;
                change(key, now)?;
                let key = key.clone();
                Self::save_file(path, &file)?;
                Ok(key)
            }
            Target::Store(db) => {
                let mut failed = None;
                let mut written = None;
                let mut change = Some(change);
                let result = db.update_key(id, self.by(action), &mut |key, reason| {
                    let Some(change) = change.take() else {
                        return Err("the change ran twice".to_owned());
                    };
                    match change(key, now) {
                        Ok(()) => {
                            // The reason goes with the flag: set by the CLI, cleared on
                            // enable (also of a key the wallet guard suspended).
                            if !key.disabled {
                                *reason = None;
                            } else if reason.is_none() {
                                *reason = Some("disabled with the CLI".to_owned());
                            }
                            written = Some(key.clone());
                            Ok(())
                        }
                        Err(e) => {
                            let message = e.to_string();
                            failed = Some(e);
                            Err(message)
                        }
                    }
                });
                match (result, failed, written) {
                    (_, Some(e), _) => Err(e),
                    (Err(keygate_store::DbError::NotFound(_)), None, _) => {
                        Err(CliError::NoSuchKey(id.to_owned()))
                    }
                    (Err(e), None, _) => Err(e.into()),
                    (Ok(()), None, Some(key)) => Ok(key),
                    (Ok(()), None, None) => Err(invalid(format!("key {id} was not changed"))),
                }
            }
            Target::Server(r) => {
                let path = format!("/admin/v1/keys/{}", remote::segment(id));
                let answer = match action {
                    "key.revoke" | "key.disable" | "key.enable" => {
                        let verb = action.trim_start_matches("key.");
                        r.post(&format!("{path}/{verb}"), &json!({}))?
                    }
                    "key.update" => {
                        let view = r.get(&path)?;
                        let mut key: KeyRecord = remote::record_of(&view, remote::KEY_VIEW)?;
                        let before = serde_json::to_value(&key).unwrap_or_default();
                        change(&mut key, now)?;
                        let after = serde_json::to_value(&key).unwrap_or_default();
                        let patch = remote::merge_patch(&before, &after, keygate_admin::KEY_FIELDS);
                        if patch.is_empty() {
                            view
                        } else {
                            r.patch(&path, &Value::Object(patch))?
                        }
                    }
                    other => return Err(invalid(format!("{other} is not done over --server"))),
                };
                remote::record_of(&answer, remote::KEY_VIEW)
            }
        }
    }

    /// Adds keys (all or none) to `project`, creating the project first if `create_project`.
    fn add_keys(
        &self,
        keys: &[KeyRecord],
        project: &str,
        create_project: bool,
    ) -> Result<(), CliError> {
        let missing = |project: &str| {
            invalid(format!(
                "project {project:?} does not exist: create it with `keygate projects create {project}` \
                 or pass --create-project"
            ))
        };
        match &self.target {
            Target::File(path) => {
                let mut file = self.load(true)?;
                if !file.projects.iter().any(|p| p.id == project) {
                    if !create_project {
                        return Err(missing(project));
                    }
                    let p = ProjectRecord::new(project);
                    p.validate().map_err(invalid)?;
                    file.projects.push(p);
                }
                file.keys.extend_from_slice(keys);
                Self::save_file(path, &file)
            }
            Target::Store(db) => {
                if db.project(project)?.is_none() {
                    if !create_project {
                        return Err(missing(project));
                    }
                    match db.create_project(&ProjectRecord::new(project), self.by("project.create"))
                    {
                        // Another writer made it in between: fine.
                        Ok(()) | Err(keygate_store::DbError::Exists(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(db.insert_keys(keys, self.by("key.create"))?)
            }
            // The gateway makes keys itself (see `create_key`).
            Target::Server(_) => Err(invalid("keys are made by the gateway over --server")),
        }
    }

    /// Changes one project with `change` and returns it as written.
    fn change_project(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut ProjectRecord) -> Result<(), String>,
    ) -> Result<ProjectRecord, CliError> {
        let no_such = || invalid(format!("no project {id:?}"));
        match &self.target {
            Target::File(path) => {
                let mut file = self.load(false)?;
                let p = file
                    .projects
                    .iter_mut()
                    .find(|p| p.id == id)
                    .ok_or_else(no_such)?;
                change(p).map_err(invalid)?;
                let p = p.clone();
                Self::save_file(path, &file)?;
                Ok(p)
            }
            Target::Store(db) => {
                let mut written = None;
                let result = db.update_project(id, self.by("project.update"), &mut |p| {
                    change(p)?;
                    written = Some(p.clone());
                    Ok(())
                });
                match result {
                    Err(keygate_store::DbError::NotFound(_)) => Err(no_such()),
                    Err(keygate_store::DbError::Invalid(e)) => Err(invalid(e)),
                    Err(e) => Err(e.into()),
                    Ok(()) => written.ok_or_else(no_such),
                }
            }
            Target::Server(r) => {
                let path = format!("/admin/v1/projects/{}", remote::segment(id));
                let view = r.get(&path)?;
                let mut p: ProjectRecord = remote::record_of(&view, remote::PROJECT_VIEW)?;
                let before = serde_json::to_value(&p).unwrap_or_default();
                change(&mut p).map_err(invalid)?;
                let after = serde_json::to_value(&p).unwrap_or_default();
                let patch = remote::merge_patch(&before, &after, keygate_admin::PROJECT_FIELDS);
                if patch.is_empty() {
                    return Ok(p);
                }
                remote::record_of(
                    &r.patch(&path, &Value::Object(patch))?,
                    remote::PROJECT_VIEW,
                )
            }
        }
    }

    fn add_project(&self, project: &ProjectRecord) -> Result<(), CliError> {
        project.validate().map_err(invalid)?;
        match &self.target {
            Target::File(path) => {
                let mut file = self.load(true)?;
                if file.projects.iter().any(|p| p.id == project.id) {
                    return Err(invalid(format!("project {:?} already exists", project.id)));
                }
                file.projects.push(project.clone());
                Self::save_file(path, &file)
            }
            Target::Server(r) => {
                let mut body = serde_json::to_value(project).unwrap_or_default();
                if let Some(obj) = body.as_object_mut() {
                    obj.retain(|k, _| {
                        k == "id" || keygate_admin::PROJECT_FIELDS.contains(&k.as_str())
                    });
                }
                r.post("/admin/v1/projects", &body)?;
                Ok(())
            }
            Target::Store(db) => match db.create_project(project, self.by("project.create")) {
                Err(keygate_store::DbError::Exists(_)) => {
                    Err(invalid(format!("project {:?} already exists", project.id)))
                }
                other => Ok(other?),
            },
        }
    }

    /// The command line as the actor of a change to the store.
    fn by(&self, action: &'static str) -> AuditBy<'static> {
        AuditBy {
            actor: "cli",
            action,
            at: self.now,
        }
    }

    fn output(&self, json: Value, text: String) -> String {
        if self.json {
            let mut s = serde_json::to_string_pretty(&json).unwrap_or_default();
            s.push('\n');
            s
        } else {
            text
        }
    }

    fn keys(&self, cmd: KeysCommand) -> Result<String, CliError> {
        match cmd {
            KeysCommand::Create(args) => self.create_key(*args),
            KeysCommand::List { project } => {
                let file = match &self.target {
                    // Only the project's keys, filtered by the gateway.
                    Target::Server(r) => KeyFile {
                        keys: r
                            .all_keys(project.as_deref())?
                            .iter()
                            .map(|k| remote::record_of(k, remote::KEY_VIEW))
                            .collect::<Result<_, _>>()?,
                        ..KeyFile::default()
                    },
                    _ => self.load(false)?,
                };
                let keys: Vec<&KeyRecord> = file
                    .keys
                    .iter()
                    .filter(|k| project.as_ref().is_none_or(|p| &k.project == p))
                    .collect();
                let json = json!({ "keys": keys.iter().map(|k| key_json(k, self.now)).collect::<Vec<_>>() });
                Ok(self.output(json, key_table(&keys, self.now)))
            }
            KeysCommand::Show { id } => {
                let stored = match &self.target {
                    Target::Store(db) => Some(
                        db.key(&id)?
                            .ok_or_else(|| CliError::NoSuchKey(id.clone()))?,
                    ),
                    Target::Server(r) => {
                        let view = r.get(&format!("/admin/v1/keys/{}", remote::segment(&id)))?;
                        let record: KeyRecord = remote::record_of(&view, remote::KEY_VIEW)?;
                        let mut stored = keygate_store::StoredKey::from(record);
                        stored.created_by = view["created_by"].as_str().map(str::to_owned);
                        stored.last_used_at = view["last_used_at"]
                            .as_str()
                            .and_then(|t| Timestamp::parse_rfc3339(t).ok());
                        stored.disabled_reason =
                            view["disabled_reason"].as_str().map(str::to_owned);
                        Some(stored)
                    }
                    Target::File(_) => None,
                };
                if let Some(stored) = stored {
                    let mut json = key_json(&stored.record, self.now);
                    let mut text = key_text(&stored.record, self.now);
                    if let Some(obj) = json.as_object_mut() {
                        obj.insert("disabled_reason".into(), json!(stored.disabled_reason));
                        obj.insert("created_by".into(), json!(stored.created_by));
                        obj.insert("last_used_at".into(), json!(stored.last_used_at));
                    }
                    if let Some(reason) = &stored.disabled_reason {
                        let _ = writeln!(text, "disabled because: {reason}");
                    }
                    return Ok(self.output(json!({ "key": json }), text));
                }
                let file = self.load(false)?;
                let key = find_key(&file, &id)?;
                Ok(self.output(
                    json!({ "key": key_json(key, self.now) }),
                    key_text(key, self.now),
                ))
            }
            KeysCommand::Update(u) => self.update_key(&u.id, "Updated", "key.update", |k, _| {
                if let Some(name) = &u.name {
                    k.name.clone_from(name);
                }
                if u.no_groups {
                    k.groups.clear();
                } else if !u.group.is_empty() {
                    k.groups.clone_from(&u.group);
                }
                for (a, b) in &u.label {
                    k.labels.insert(a.clone(), b.clone());
                }
                for a in &u.remove_label {
                    k.labels.remove(a);
                }
                u.conditions.apply(&mut k.policies);
                k.validate().map_err(invalid)
            }),
            KeysCommand::Revoke { id } => {
                self.update_key(&id, "Revoked", "key.revoke", |k, now| {
                    k.revoked_at.get_or_insert(now);
                    Ok(())
                })
            }
            KeysCommand::Disable { id } => {
                self.update_key(&id, "Disabled", "key.disable", |k, _| {
                    k.disabled = true;
                    Ok(())
                })
            }
            KeysCommand::Enable { id } => self.update_key(&id, "Enabled", "key.enable", |k, _| {
                if k.revoked_at.is_some() {
                    return Err(invalid(format!(
                        "key {} is revoked; a revoked key cannot be enabled",
                        k.id
                    )));
                }
                k.disabled = false;
                Ok(())
            }),
            KeysCommand::Rotate { id, grace, prefix } => self.rotate(&id, grace, prefix.as_deref()),
            KeysCommand::Import { source: file } => {
                let Target::Store(db) = &self.target else {
                    return Err(invalid(
                        "keys import copies a key file into the store: give --store, not --file",
                    ));
                };
                let keys = KeyFile::load(&file)?;
                // Refuse a set a gateway would refuse, before touching the store.
                keys.to_snapshot(&file)?;
                let outcome = db.import(&keys, "import")?;
                Ok(self.output(
                    json!({ "imported": { "projects": outcome.projects, "keys": outcome.keys } }),
                    format!(
                        "Imported {} projects and {} keys from {}.\n",
                        outcome.projects,
                        outcome.keys,
                        file.display()
                    ),
                ))
            }
            KeysCommand::Export { output } => {
                if let Target::Server(_) = &self.target {
                    return Err(invalid(
                        "keys export writes digests, which the admin API never shows: run it with --store on the gateway's database",
                    ));
                }
                let keys = self.load(false)?;
                match output {
                    Some(path) => {
                        keys.save_atomic(&path)?;
                        Ok(self.output(
                            json!({ "exported": { "projects": keys.projects.len(), "keys": keys.keys.len(), "file": path } }),
                            format!(
                                "Exported {} projects and {} keys to {}.\n",
                                keys.projects.len(),
                                keys.keys.len(),
                                path.display()
                            ),
                        ))
                    }
                    None => Ok(keys.to_toml()?),
                }
            }
        }
    }

    fn update_key(
        &self,
        id: &str,
        verb: &str,
        action: &'static str,
        change: impl FnOnce(&mut KeyRecord, Timestamp) -> Result<(), CliError>,
    ) -> Result<String, CliError> {
        let key = self.change_key(id, action, change)?;
        let text = format!("{verb} key {}.\n\n{}", key.id, key_text(&key, self.now));
        Ok(self.output(json!({ "key": key_json(&key, self.now) }), text))
    }

    fn create_key(&self, args: CreateKey) -> Result<String, CliError> {
        let permissions = match (args.permissions, args.scope.is_empty()) {
            (None, true) => {
                return Err(invalid(
                    "say what the key may do: --permissions all|read_only|restricted \
                     (restricted takes --scope GROUP=ACCESS)",
                ));
            }
            (Some(PermissionsArg::All), true) => Permissions::All,
            (Some(PermissionsArg::ReadOnly), true) => Permissions::ReadOnly,
            (Some(PermissionsArg::All | PermissionsArg::ReadOnly), false) => {
                return Err(invalid("--scope goes only with --permissions restricted"));
            }
            (Some(PermissionsArg::Restricted) | None, _) => {
                let mut map = BTreeMap::new();
                for (group, access) in &args.scope {
                    if map.insert(group.clone(), *access).is_some() {
                        return Err(invalid(format!("--scope {group} given twice")));
                    }
                }
                Permissions::Restricted(map)
            }
        };
        let format = key_format(args.prefix.as_deref())?;
        let expires_at = match (args.expires_in, args.expires_at) {
            (Some(d), _) if d.is_zero() => return Err(invalid("--expires-in must be positive")),
            (Some(d), _) => Some(self.now.saturating_add(d)),
            (None, at) => at,
        };
        if expires_at.is_some_and(|at| at <= self.now) {
            return Err(invalid("--expires-at is in the past"));
        }
        if let (Some(nb), Some(exp)) = (args.not_before, expires_at)
            && exp <= nb
        {
            return Err(invalid("the key would expire before --not-before"));
        }
        let mut labels = BTreeMap::new();
        for (k, v) in args.label {
            if labels.insert(k.clone(), v).is_some() {
                return Err(invalid(format!("--label {k} given twice")));
            }
        }

        let count = args.count.get();
        // Everything but identity and secret, the same for every key made.
        let mut template = KeyRecord::new(
            KeyId::new("key_new"),
            args.project.clone(),
            KeyDigest::of(""),
            self.now,
        );
        template.name = args.name.clone();
        template.permissions = permissions;
        template.models = args.rules.models();
        template.limits = args.rules.limits();
        template.allowed_ips = args.rules.allow_ip.clone();
        template.labels = labels;
        template.groups = args.group.clone();
        template.policies = args.rules.policies.policy.clone();
        template.not_before = args.not_before;
        template.expires_at = expires_at;
        let mut made: Vec<(KeyRecord, String)> = Vec::with_capacity(count);
        if let Target::Server(r) = &self.target {
            if args.prefix.is_some() {
                return Err(invalid(
                    "--prefix: over --server the gateway makes secrets with its own prefix",
                ));
            }
            if args.create_project {
                let path = format!("/admin/v1/projects/{}", remote::segment(&args.project));
                if r.get(&path).is_err() {
                    self.add_project(&ProjectRecord::new(args.project.clone()))?;
                }
            }
            let mut body = serde_json::to_value(&template).unwrap_or_default();
            if let Some(obj) = body.as_object_mut() {
                obj.retain(|k, _| {
                    k == "project" || keygate_admin::KEY_FIELDS.contains(&k.as_str())
                });
            }
            for _ in 0..count {
                let answer = r.post("/admin/v1/keys", &body)?;
                let key = remote::record_of(&answer["key"], remote::KEY_VIEW)?;
                let secret = answer["secret"].as_str().unwrap_or_default().to_owned();
                made.push((key, secret));
            }
        } else {
            for _ in 0..count {
                let secret = format.generate()?;
                let mut key = template.clone();
                key.id = KeyId::generate()?;
                key.digest = secret.digest();
                made.push((key, secret.expose().to_owned()));
            }
            let records: Vec<KeyRecord> = made.iter().map(|(k, _)| k.clone()).collect();
            self.add_keys(&records, &args.project, args.create_project)?;
        }
        if count > 1 {
            // Bulk: one line (or JSON object) per key; the secrets are shown only now.
            let json = json!({
                "keys": made.iter().map(|(k, s)| json!({"id": k.id.as_str(), "secret": s})).collect::<Vec<_>>()
            });
            let mut text = format!(
                "Created {count} keys in project {} (secrets shown only this once):\n",
                args.project
            );
            for (k, s) in &made {
                let _ = writeln!(text, "{} {s}", k.id);
            }
            return Ok(self.output(json, text));
        }
        let Some((key, secret)) = made.pop() else {
            return Err(invalid("--count must be at least 1"));
        };
        let headline = format!(
            "Created key {} in project {}.\n\nSecret",
            key.id, key.project
        );
        Ok(self.with_secret(&headline, &key, &secret))
    }

    /// A key and its new secret, shown this once.
    fn with_secret(&self, headline: &str, key: &KeyRecord, secret: &str) -> String {
        let text = format!(
            "{headline} (shown only this once; keygate stores only its digest):\n\n    {secret}\n\n{}",
            key_text(key, self.now),
        );
        self.output(
            json!({ "secret": secret, "key": key_json(key, self.now) }),
            text,
        )
    }

    fn rotate(&self, id: &str, grace: Duration, prefix: Option<&str>) -> Result<String, CliError> {
        if let Target::Server(r) = &self.target {
            if prefix.is_some() {
                return Err(invalid(
                    "--prefix: over --server the gateway makes secrets with its own prefix",
                ));
            }
            let answer = r.post(
                &format!("/admin/v1/keys/{}/rotate", remote::segment(id)),
                &json!({ "grace_seconds": grace.as_secs() }),
            )?;
            let key: KeyRecord = remote::record_of(&answer["key"], remote::KEY_VIEW)?;
            let secret = answer["secret"].as_str().unwrap_or_default();
            return Ok(self.with_secret(&rotated_headline(&key), &key, secret));
        }
        let format = key_format(prefix)?;
        let secret = format.generate()?;
        let digest = secret.digest();
        let key = self.change_key(id, "key.rotate", |key, now| {
            if key.revoked_at.is_some() {
                return Err(invalid(format!(
                    "key {} is revoked; create a new key instead",
                    key.id
                )));
            }
            key.previous = (!grace.is_zero()).then(|| PreviousSecret {
                digest: key.digest,
                valid_until: now.saturating_add(grace),
            });
            key.digest = digest;
            Ok(())
        })?;
        Ok(self.with_secret(&rotated_headline(&key), &key, secret.expose()))
    }

    fn objects(&self, cmd: ObjectsCommand) -> Result<String, CliError> {
        use keygate_core::{ObjectKind, ObjectRecord};
        let Target::Store(db) = &self.target else {
            return Err(invalid(
                "objects are kept in the store: give --store, not --file",
            ));
        };
        let kind_of = |k: &str| {
            ObjectKind::parse(k).ok_or_else(|| {
                let all: Vec<&str> = ObjectKind::ALL.iter().map(|k| k.as_str()).collect();
                invalid(format!("unknown kind {k:?} (one of: {})", all.join(", ")))
            })
        };
        match cmd {
            ObjectsCommand::List { project, kind } => {
                let kind = kind.as_deref().map(kind_of).transpose()?;
                let objects = db.objects(&project, kind)?;
                let mut text = format!("{:<40} {:<24} {:<24} {}\n", "ID", "KIND", "MODEL", "KEY");
                for o in &objects {
                    text.push_str(&format!(
                        "{:<40} {:<24} {:<24} {}\n",
                        o.id,
                        o.kind.as_str(),
                        o.model.as_deref().unwrap_or("-"),
                        if o.key_id.is_empty() {
                            "(imported)"
                        } else {
                            &o.key_id
                        }
                    ));
                }
                Ok(self.output(serde_json::to_value(&objects).unwrap_or_default(), text))
            }
            ObjectsCommand::Import {
                project,
                kind,
                model,
                batch_models,
                ids,
            } => {
                let kind = kind_of(&kind)?;
                if db.project(&project)?.is_none() {
                    return Err(invalid(format!("no project {project:?}")));
                }
                let at = self.now.as_unix_secs();
                let mut models = batch_models;
                models.sort();
                models.dedup();
                let records: Vec<ObjectRecord> = ids
                    .iter()
                    .map(|id| {
                        let mut r = ObjectRecord::new(id, kind, &*project, "", at);
                        r.model.clone_from(&model);
                        if !models.is_empty() {
                            r = r.with_models(models.clone());
                        }
                        r
                    })
                    .collect();
                let mut kept = Vec::new();
                for id in &ids {
                    if let Some(o) = db.object(id)?
                        && o.project != project
                    {
                        kept.push(json!({"id": id, "project": o.project}));
                    }
                }
                db.record_objects(&records)?;
                let mut text = format!(
                    "imported {} {} object(s) into project {project}\n",
                    ids.len() - kept.len(),
                    kind.as_str()
                );
                for k in &kept {
                    text.push_str(&format!(
                        "kept {} with its owner, project {}\n",
                        k["id"].as_str().unwrap_or_default(),
                        k["project"].as_str().unwrap_or_default()
                    ));
                }
                let imported: Vec<&String> = ids
                    .iter()
                    .filter(|id| !kept.iter().any(|k| k["id"] == ***id))
                    .collect();
                Ok(self.output(
                    json!({"imported": imported, "kept": kept, "project": project, "kind": kind.as_str()}),
                    text,
                ))
            }
            ObjectsCommand::Remove { ids } => {
                let mut removed = Vec::new();
                for id in &ids {
                    if db.remove_object(id)? {
                        removed.push(id.clone());
                    }
                }
                Ok(self.output(
                    json!({"removed": removed}),
                    format!("removed {} object(s)\n", removed.len()),
                ))
            }
        }
    }

    fn admin_keys(&self, cmd: AdminKeysCommand) -> Result<String, CliError> {
        let store = match &self.target {
            Target::Store(store) => Some(store),
            Target::Server(_) => None,
            Target::File(_) => {
                return Err(invalid(
                    "admin keys live in the store: give --store, not --file",
                ));
            }
        };
        let remote = |path: &str, body: Option<Value>| -> Result<Value, CliError> {
            let Target::Server(r) = &self.target else {
                return Err(invalid("not over --server"));
            };
            match body {
                Some(b) => r.post(path, &b),
                None => r.get(path),
            }
        };
        let record_of = |v: &Value| remote::record_of::<AdminKeyRecord>(v, remote::ADMIN_KEY_VIEW);
        let view = |k: &AdminKeyRecord| {
            json!({
                "id": k.id,
                "name": k.name,
                "scope": k.scope.to_string(),
                "created_at": k.created_at,
                "created_by": k.created_by,
                "revoked_at": k.revoked_at,
            })
        };
        match cmd {
            AdminKeysCommand::Create { name, scope } => {
                let (record, secret) = match store {
                    Some(store) => {
                        let secret = admin_key_format().generate()?;
                        let record = AdminKeyRecord {
                            id: admin_key_id()?,
                            name,
                            digest: secret.digest(),
                            scope,
                            created_at: self.now,
                            created_by: "cli".to_owned(),
                            revoked_at: None,
                        };
                        store.insert_admin_key(&record, self.by("admin_key.create"))?;
                        (record, secret.expose().to_owned())
                    }
                    None => {
                        let answer = remote(
                            "/admin/v1/admin-keys",
                            Some(json!({ "name": name, "scope": scope.to_string() })),
                        )?;
                        let secret = answer["secret"].as_str().unwrap_or_default().to_owned();
                        (record_of(&answer["admin_key"])?, secret)
                    }
                };
                let text = format!(
                    "Created admin key {id} ({name}, scope {scope}).\n\n\
                     Secret (shown only this once; keygate stores only its digest):\n\n    {secret}\n\n\
                     Use it as `Authorization: Bearer …` on /admin/v1/.\n",
                    id = record.id,
                    name = record.name,
                    scope = record.scope,
                );
                Ok(self.output(
                    json!({ "admin_key": view(&record), "secret": secret }),
                    text,
                ))
            }
            AdminKeysCommand::List => {
                let keys = match store {
                    Some(store) => store.admin_keys()?,
                    None => remote("/admin/v1/admin-keys", None)?["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(record_of)
                        .collect::<Result<_, _>>()?,
                };
                let mut text =
                    format!("{:<22} {:<16} {:<24} {}\n", "ID", "NAME", "SCOPE", "STATUS");
                for k in &keys {
                    let status = if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    let _ = writeln!(
                        text,
                        "{:<22} {:<16} {:<24} {status}",
                        k.id,
                        k.name,
                        k.scope.to_string()
                    );
                }
                Ok(self.output(
                    json!({ "admin_keys": keys.iter().map(view).collect::<Vec<_>>() }),
                    text,
                ))
            }
            AdminKeysCommand::Revoke { id } => {
                let record = match store {
                    Some(store) => store.revoke_admin_key(&id, self.by("admin_key.revoke"))?,
                    None => record_of(&remote(
                        &format!("/admin/v1/admin-keys/{}/revoke", remote::segment(&id)),
                        Some(json!({})),
                    )?)?,
                };
                Ok(self.output(
                    json!({ "admin_key": view(&record) }),
                    format!("Revoked admin key {}.\n", record.id),
                ))
            }
        }
    }

    fn spend(&self, id: &str, counters: Option<&str>) -> Result<String, CliError> {
        let store = match &self.target {
            Target::Store(store) => store,
            Target::Server(r) => {
                let answer = r.get(&format!("/admin/v1/keys/{}/spend", remote::segment(id)))?;
                let rows = answer["data"].as_array().cloned().unwrap_or_default();
                return Ok(self.spend_output(id, rows));
            }
            Target::File(_) => {
                return Err(invalid(
                    "spend is kept in the store's ledger: give --store, not --file",
                ));
            }
        };
        let budgets = store
            .key_budgets(id, self.now, counters)?
            .ok_or_else(|| CliError::NoSuchKey(id.to_owned()))?;
        let rows = budgets
            .iter()
            .map(|b| serde_json::to_value(b).unwrap_or_default())
            .collect();
        Ok(self.spend_output(id, rows))
    }

    fn reset_spend(
        &self,
        id: &str,
        model: Option<String>,
        period: Option<String>,
    ) -> Result<String, CliError> {
        let Target::Server(r) = &self.target else {
            return Err(invalid(
                "spend reset goes through the gateway, whose counters must see it: give --server URL with an admin key",
            ));
        };
        let answer = r.post(
            &format!("/admin/v1/keys/{}/spend/reset", remote::segment(id)),
            &json!({ "model": model, "period": period }),
        )?;
        if self.json {
            return Ok(self.output(answer, String::new()));
        }
        let mut text = String::new();
        for b in answer["reset"].as_array().into_iter().flatten() {
            let _ = writeln!(
                text,
                "Reset the {} budget on {} of key {id}: ${} no longer counts.",
                b["period"].as_str().unwrap_or_default(),
                b["model"].as_str().unwrap_or_default(),
                b["given_back"].as_str().unwrap_or_default(),
            );
        }
        text.push('\n');
        let rows = answer["data"].as_array().cloned().unwrap_or_default();
        text.push_str(&self.spend_output(id, rows));
        Ok(text)
    }

    /// Budget rows (`scope`, `owner`, `period`, `model`, `limit`, `spent`, `reserved`,
    /// `remaining`, `period_start`, `resets_at`, as the admin API gives them) as a table.
    fn spend_output(&self, key: &str, rows: Vec<Value>) -> String {
        let mut text = format!(
            "{:<8} {:<8} {:<9} {:<14} {:>12} {:>12} {:>12} {:>12}  {}\n",
            "SCOPE",
            "OWNER",
            "PERIOD",
            "MODEL",
            "LIMIT",
            "SPENT",
            "RESERVED",
            "REMAINING",
            "RESETS"
        );
        let field = |row: &Value, name: &str, none: &str| match &row[name] {
            Value::String(s) => s.clone(),
            Value::Null => none.to_owned(),
            other => other.to_string(),
        };
        for row in &rows {
            let _ = writeln!(
                text,
                "{:<8} {:<8} {:<9} {:<14} {:>12} {:>12} {:>12} {:>12}  {}",
                field(row, "scope", ""),
                field(row, "owner", ""),
                field(row, "period", ""),
                field(row, "model", ""),
                field(row, "limit", ""),
                field(row, "spent", ""),
                field(row, "reserved", "?"),
                field(row, "remaining", ""),
                field(row, "resets_at", "never"),
            );
        }
        if rows.is_empty() {
            text = format!("Key {key} and its project have no money budget.\n");
        }
        self.output(json!({ "key": key, "budgets": rows }), text)
    }

    fn projects(&self, cmd: ProjectsCommand) -> Result<String, CliError> {
        match cmd {
            ProjectsCommand::Create(args) => {
                let mut project = ProjectRecord::new(args.id);
                project.name = args.name;
                project.models = args.rules.models();
                project.limits = args.rules.limits();
                project.allowed_ips = args.rules.allow_ip.clone();
                project.policies = args.rules.policies.policy;
                self.add_project(&project)?;
                let file = self.load(false)?;
                let text = format!(
                    "Created project {}.\n\n{}",
                    project.id,
                    project_text(&project, &file)
                );
                Ok(self.output(json!({ "project": project_json(&project, &file) }), text))
            }
            ProjectsCommand::Update {
                id,
                name,
                conditions,
            } => {
                let project = self.change_project(&id, &mut |p| {
                    if let Some(name) = &name {
                        p.name.clone_from(name);
                    }
                    conditions.apply(&mut p.policies);
                    p.validate()
                })?;
                let file = self.load(false)?;
                let text = format!(
                    "Updated project {}.\n\n{}",
                    project.id,
                    project_text(&project, &file)
                );
                Ok(self.output(json!({ "project": project_json(&project, &file) }), text))
            }
            ProjectsCommand::List => {
                let file = self.load(false)?;
                let json = json!({
                    "projects": file.projects.iter().map(|p| project_json(p, &file)).collect::<Vec<_>>()
                });
                let mut text = format!("{:<24} {:<24} {:>5}  {}\n", "ID", "NAME", "KEYS", "STATUS");
                for p in &file.projects {
                    let _ = writeln!(
                        text,
                        "{:<24} {:<24} {:>5}  {}",
                        p.id,
                        p.name,
                        key_count(p, &file),
                        if p.disabled { "disabled" } else { "active" }
                    );
                }
                Ok(self.output(json, text))
            }
        }
    }
}

fn rotated_headline(key: &KeyRecord) -> String {
    let until = key.previous.as_ref().map_or_else(
        || "no longer works".to_owned(),
        |p| format!("works until {}", p.valid_until),
    );
    format!(
        "Rotated key {}; the old secret {until}.\n\nNew secret",
        key.id
    )
}

fn key_format(prefix: Option<&str>) -> Result<KeyFormat, CliError> {
    match prefix {
        Some(p) => KeyFormat::with_prefix(p).map_err(|e| invalid(format!("--prefix: {e}"))),
        None => Ok(KeyFormat::default()),
    }
}

fn find_key<'a>(file: &'a KeyFile, id: &str) -> Result<&'a KeyRecord, CliError> {
    file.keys
        .iter()
        .find(|k| k.id.as_str() == id)
        .ok_or_else(|| CliError::NoSuchKey(id.to_owned()))
}

fn find_key_mut<'a>(file: &'a mut KeyFile, id: &str) -> Result<&'a mut KeyRecord, CliError> {
    file.keys
        .iter_mut()
        .find(|k| k.id.as_str() == id)
        .ok_or_else(|| CliError::NoSuchKey(id.to_owned()))
}

fn key_count(p: &ProjectRecord, file: &KeyFile) -> usize {
    file.keys.iter().filter(|k| k.project == p.id).count()
}

/// `active`, or why the key's current secret does not work now.
fn status(k: &KeyRecord, now: Timestamp) -> &'static str {
    match k.check_live(Secret::Current, now) {
        Ok(()) => "active",
        Err(r) => r.code(),
    }
}

/// The record without digests (not secret, but of no use to a reader and better kept out of
/// terminals and tickets), plus its status.
fn key_json(k: &KeyRecord, now: Timestamp) -> Value {
    let mut v = serde_json::to_value(k).unwrap_or(Value::Null);
    keygate_core::admin::strip_digests(&mut v);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("status".into(), status(k, now).into());
    }
    v
}

fn project_json(p: &ProjectRecord, file: &KeyFile) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("keys".into(), key_count(p, file).into());
    }
    v
}

fn permissions_text(p: &Permissions) -> String {
    match p {
        Permissions::All => "all".to_owned(),
        Permissions::ReadOnly => "read_only".to_owned(),
        Permissions::Restricted(map) if map.is_empty() => "restricted (nothing)".to_owned(),
        Permissions::Restricted(map) => {
            let groups: Vec<String> = map.iter().map(|(g, a)| format!("{g}={a}")).collect();
            format!("restricted ({})", groups.join(", "))
        }
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn rules_text(
    out: &mut String,
    models: &ModelRules,
    limits: &Limits,
    ips: &[IpNet],
    policies: &[Condition],
) {
    if let Some(allow) = &models.allow {
        let _ = writeln!(out, "  allow models: {}", join(allow));
    }
    if !models.deny.is_empty() {
        let _ = writeln!(out, "  deny models:  {}", join(&models.deny));
    }
    if let Some(rpm) = limits.requests_per_minute {
        let _ = writeln!(out, "  requests/min: {rpm}");
    }
    if let Some(tpm) = limits.tokens_per_minute {
        let _ = writeln!(out, "  tokens/min:   {tpm}");
    }
    for b in &limits.budgets {
        let model = b
            .model
            .as_ref()
            .map(|m| format!(" on {m}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  budget:       {} per {}{model}",
            b.amount,
            period_name(b.period)
        );
    }
    for (pattern, l) in &limits.models {
        let _ = writeln!(
            out,
            "  limits on {pattern}: requests/min {}, tokens/min {}",
            l.requests_per_minute.map_or("-".into(), |n| n.to_string()),
            l.tokens_per_minute.map_or("-".into(), |n| n.to_string())
        );
    }
    if !ips.is_empty() {
        let _ = writeln!(out, "  allowed IPs:  {}", join(ips));
    }
    for c in policies {
        let _ = writeln!(out, "  condition:    {c}");
    }
}

fn period_name(p: Period) -> &'static str {
    match p {
        Period::Day => "day",
        Period::Week => "week",
        Period::Month => "month",
        Period::Lifetime => "lifetime",
    }
}

fn key_text(k: &KeyRecord, now: Timestamp) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "key {}", k.id);
    if !k.name.is_empty() {
        let _ = writeln!(s, "  name:         {}", k.name);
    }
    let _ = writeln!(s, "  project:      {}", k.project);
    let _ = writeln!(s, "  status:       {}", status(k, now));
    let _ = writeln!(s, "  permissions:  {}", permissions_text(&k.permissions));
    rules_text(&mut s, &k.models, &k.limits, &k.allowed_ips, &k.policies);
    if !k.labels.is_empty() {
        let labels: Vec<String> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
        let _ = writeln!(s, "  labels:       {}", labels.join(", "));
    }
    if !k.groups.is_empty() {
        let _ = writeln!(s, "  groups:       {}", k.groups.join(", "));
    }
    let _ = writeln!(s, "  created:      {}", k.created_at);
    if let Some(t) = k.not_before {
        let _ = writeln!(s, "  not before:   {t}");
    }
    if let Some(t) = k.expires_at {
        let _ = writeln!(s, "  expires:      {t}");
    }
    if let Some(t) = k.revoked_at {
        let _ = writeln!(s, "  revoked:      {t}");
    }
    if let Some(p) = &k.previous {
        let state = if now < p.valid_until {
            "works"
        } else {
            "worked"
        };
        let _ = writeln!(s, "  old secret {state} until {}", p.valid_until);
    }
    s
}

fn key_table(keys: &[&KeyRecord], now: Timestamp) -> String {
    let mut s = format!(
        "{:<22} {:<20} {:<16} {:<14} {:<14} {}\n",
        "ID", "NAME", "PROJECT", "PERMISSIONS", "STATUS", "EXPIRES"
    );
    for k in keys {
        let perms = match &k.permissions {
            Permissions::All => "all",
            Permissions::ReadOnly => "read_only",
            Permissions::Restricted(_) => "restricted",
        };
        let _ = writeln!(
            s,
            "{:<22} {:<20} {:<16} {:<14} {:<14} {}",
            k.id.as_str(),
            k.name,
            k.project,
            perms,
            status(k, now),
            k.expires_at
                .map_or_else(|| "never".to_owned(), |t| t.to_string())
        );
    }
    s
}

fn project_text(p: &ProjectRecord, file: &KeyFile) -> String {
    let mut s = format!("project {}\n", p.id);
    if !p.name.is_empty() {
        let _ = writeln!(s, "  name:         {}", p.name);
    }
    let _ = writeln!(s, "  keys:         {}", key_count(p, file));
    rules_text(&mut s, &p.models, &p.limits, &p.allowed_ips, &p.policies);
    s
}

/// Parses `90s`, `30m`, `12h`, `7d`, `2w`, or a sum of them (`1h30m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 90s, 30m, 12h, 7d or 1h30m");
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(err)?;
    }
    Ok(Duration::from_secs(total))
}

fn parse_timestamp(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(s)
        .map_err(|_| format!("{s:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"))
}

fn parse_budget(s: &str) -> Result<Budget, String> {
    let mut parts = s.splitn(3, '/');
    let (Some(amount), Some(period)) = (parts.next(), parts.next()) else {
        return Err(format!("{s:?} is not AMOUNT/PERIOD[/MODEL], like 50/month"));
    };
    let amount = Money::parse(amount).map_err(|e| format!("{amount:?}: {e}"))?;
    let period = match period {
        "day" => Period::Day,
        "week" => Period::Week,
        "month" => Period::Month,
        "lifetime" => Period::Lifetime,
        other => {
            return Err(format!(
                "{other:?} is not a period: day, week, month or lifetime"
            ));
        }
    };
    let model = parts
        .next()
        .map(|m| ModelPattern::new(m).map_err(|e| format!("{m:?}: {e}")))
        .transpose()?;
    Ok(Budget {
        amount,
        period,
        model,
    })
}

fn parse_ip_range(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address range like 10.0.0.0/8 or an address"))
}

fn parse_scope(s: &str) -> Result<(String, Access), String> {
    let (group, access) = s
        .split_once('=')
        .filter(|(g, _)| !g.is_empty())
        .ok_or_else(|| format!("{s:?} is not GROUP=ACCESS, like chat.completions=write"))?;
    let access = match access {
        "none" => Access::None,
        "read" => Access::Read,
        "write" => Access::Write,
        other => return Err(format!("{other:?} is not an access: none, read or write")),
    };
    Ok((group.to_owned(), access))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[cfg(test)]
mod tests;
