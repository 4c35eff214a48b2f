//! The built `keygate` binary: exit codes, streams, and the key file it leaves.

use std::path::Path;
use std::process::{Command, Output};

fn keygate(file: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .env("KEYGATE_KEYS_FILE", file)
        .args(args)
        .output()
        .expect("the keygate binary runs")
}

#[test]
fn binary_exit_codes_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");

    let out = keygate(&file, &["projects", "create", "default"]);
    assert!(out.status.success(), "{out:?}");

    let out = keygate(
        &file,
        &[
            "--json",
            "keys",
            "create",
            "--project",
            "default",
            "--permissions",
            "all",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["key"]["id"].as_str().unwrap().to_owned();
    let before = std::fs::read(&file).unwrap();

    // A flag clap rejects: usage error, exit 2, message on stderr, nothing on stdout.
    let out = keygate(
        &file,
        &["keys", "create", "--project", "default", "--rpm", "zero"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rpm"));

    // Values that parse but do not make sense together: exit 2 too.
    let out = keygate(&file, &["keys", "create", "--project", "default"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));

    // An unknown key: exit 1.
    let out = keygate(&file, &["keys", "revoke", "key_nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_nope"));

    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "a failed command wrote"
    );

    let out = keygate(&file, &["keys", "revoke", &id]);
    assert!(out.status.success(), "{out:?}");

    let out = keygate(&file, &["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keys"));

    // --file wins over the environment.
    let other = dir.path().join("other.toml");
    let out = keygate(
        &file,
        &["--file", other.to_str().unwrap(), "projects", "create", "x"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(other.exists());
}
