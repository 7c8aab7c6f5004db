//! Configuration as operators write it, through the real binary: every
//! setting checked against its range with a message naming the variable,
//! `check` reporting the same, silent precedence made loud, flags before the
//! subcommand, and `migrate` never guessing its database.

mod common;

use common::sidecar::BIN;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary in `dir` with only `envs`; (exit code, stdout + stderr).
/// A process still running after 30 s (it started serving) fails the test.
fn run_in(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} {envs:?} did not exit (it should have refused to start): {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), args, envs)
}

#[test]
fn out_of_range_settings_stop_serve_and_check_naming_the_variable_and_range() {
    let cases: &[(&str, &str, &str)] = &[
        ("DOCSIDECAR_HEALTH_INTERVAL", "0", "from 0.1 to 3600"),
        ("DB_ACQUIRE_TIMEOUT", "0", "from 0.01 to 3600"),
        ("DB_RETRY_DELAY", "-1", "from 0.01 to 3600"),
        ("DOCSIDECAR_MAX_DOCUMENT_BYTES", "0", "from 16 to 67108864"),
        (
            "DOCSIDECAR_MAX_MESSAGE_BYTES",
            "10",
            "from 4096 to 1073741824",
        ),
        ("DOCSIDECAR_SHUTDOWN_GRACE", "soon", "from 0 to 3600"),
        ("DB_POOL_SIZE", "0", "from 1 to 1000"),
        ("DB_PORT", "0", "from 1 to 65535"),
        ("DB_PORT", "abc", "from 1 to 65535"),
        ("DOCSIDECAR_MAX_CONNECTIONS", "0", "from 1 to 100000"),
        ("DOCSIDECAR_MAX_CONCURRENT_STREAMS", "0", "from 1 to 10000"),
        ("DOCSIDECAR_IDLE_TIMEOUT", "0", "from 1 to 86400"),
        ("DOCSIDECAR_HANDSHAKE_TIMEOUT", "0", "from 0.1 to 600"),
        ("DOCSIDECAR_KEEPALIVE_INTERVAL", "0", "from 1 to 86400"),
        ("DOCSIDECAR_MAX_HEADER_BYTES", "100", "from 1024 to 1048576"),
        ("DOCSIDECAR_SCHEMA", "Bad-Name", "lowercase"),
        ("DOCSIDECAR_ADMIN_LISTEN", "nowhere", "HOST:PORT"),
        (
            "DB_SSLMODE",
            "allow",
            "disable, prefer, require, verify-ca, verify-full",
        ),
    ];
    for (var, value, range) in cases {
        for command in [&[][..], &["check"][..]] {
            let envs = [
                ("DATABASE_URL", "memory://"),
                ("DOCSIDECAR_LISTEN", "127.0.0.1:0"),
                (var, value),
            ];
            let (code, out) = run(command, &envs);
            assert_ne!(code, Some(0), "{command:?} {var}={value} was accepted");
            assert!(out.contains(var), "{command:?} {var}={value}: {out}");
            assert!(out.contains(range), "{command:?} {var}={value}: {out}");
        }
    }
    // The same value given as a flag is reported under the flag.
    let (code, out) = run(
        &["--health-interval", "0"],
        &[("DATABASE_URL", "memory://")],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("--health-interval"), "{out}");
    assert!(!out.contains("DOCSIDECAR_HEALTH_INTERVAL ("), "{out}");
}

#[test]
fn unusable_secret_files_stop_serve_and_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty-password"), "\n").unwrap();
    std::fs::write(dir.path().join("short-token"), "12345\n").unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("DATABASE_URL", "postgres://app@127.0.0.1:1/app"),
                ("DB_PASS_FILE", "empty-password"),
            ],
            "the database password file empty-password is empty",
        ),
        (
            &[
                ("DATABASE_URL", "memory://"),
                ("DOCSIDECAR_TOKEN_FILE", "short-token"),
            ],
            "is 5 bytes: tokens must be at least 16 bytes",
        ),
    ];
    for (envs, expected) in cases {
        for command in [&[][..], &["check"][..]] {
            let mut envs = envs.to_vec();
            envs.push(("DOCSIDECAR_LISTEN", "127.0.0.1:0"));
            let (code, out) = run_in(dir.path(), command, &envs);
            assert_ne!(code, Some(0), "{command:?} {envs:?} was accepted");
            assert!(out.contains(expected), "{command:?} {envs:?}: {out}");
            assert!(!out.contains("12345"), "the token leaked: {out}");
        }
    }
}

#[test]
fn migrate_without_its_own_settings_refuses_and_names_migrate_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_in(
        dir.path(),
        &["migrate"],
        &[("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/app")],
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("MIGRATE_DATABASE_URL"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(
        !dir.path().join("docsidecar.db").exists(),
        "no SQLite file was migrated instead"
    );
}

#[test]
fn flags_before_the_subcommand_are_read_as_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_in(
        dir.path(),
        &["--database-url", "sqlite://flag-before.db", "check"],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration and database OK"), "{out}");
    assert!(dir.path().join("flag-before.db").exists(), "{out}");
    // A flag the subcommand does not take is named.
    let (code, out) = run(&["--listen", "127.0.0.1:0", "wait"], &[]);
    assert_ne!(code, Some(0));
    assert!(out.contains("--listen"), "{out}");
}

#[test]
fn a_url_without_a_scheme_lists_the_schemes() {
    let (code, out) = run(&["check"], &[("DATABASE_URL", "rel3.db")]);
    assert_ne!(code, Some(0));
    assert!(out.contains("sqlite://rel3.db"), "{out}");
    for scheme in ["sqlite::memory:", "memory://", "postgres://"] {
        assert!(out.contains(scheme), "{out}");
    }
}

#[test]
fn settings_another_one_overrides_are_warned_about_without_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pass"), "file-pass-s3cret\n").unwrap();
    let (code, out) = run_in(
        dir.path(),
        &["check"],
        &[
            ("DATABASE_URL", "sqlite://x.db"),
            ("DB_HOST", "db.internal"),
            ("DB_NAME", "orders"),
            ("DB_PASS", "env-pass-s3cret"),
            ("DB_PASS_FILE", "pass"),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("DATABASE_URL is set, so DB_HOST, DB_NAME are ignored"),
        "{out}"
    );
    assert!(
        out.contains("DB_PASS and DB_PASS_FILE are both set"),
        "{out}"
    );
    for value in ["db.internal", "orders", "s3cret"] {
        assert!(!out.contains(value), "{value} in {out}");
    }
}

#[test]
fn logs_have_no_colour_codes_when_not_on_a_terminal() {
    let (code, out) = run(
        &["check"],
        &[
            ("DATABASE_URL", "sqlite::memory:"),
            ("DOCSIDECAR_LOG_FORMAT", "text"),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration and database OK"), "{out}");
    assert!(!out.contains('\u{1b}'), "ANSI escapes in {out:?}");
}
