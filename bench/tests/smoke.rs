//! The harness itself: `--quick` runs against a temporary SQLite file produce a
//! sane report (the figures of such short runs mean nothing). No PostgreSQL needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const BENCH: &str = env!("CARGO_BIN_EXE_docsidecar-bench");

/// The sidecar binary of the same profile, which `cargo test` at the workspace
/// root has built beside the harness (the sidecar's own tests need it). Built here
/// when only this package is tested.
fn sidecar() -> PathBuf {
    let beside = Path::new(BENCH).with_file_name("docsidecar");
    if !beside.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "docsidecar", "--bin", "docsidecar"]);
        if Path::new(BENCH)
            .parent()
            .is_some_and(|dir| dir.ends_with("release"))
        {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "cannot build the sidecar binary");
    }
    assert!(
        beside.is_file(),
        "no sidecar binary at {}",
        beside.display()
    );
    beside
}

#[test]
fn a_quick_run_reports_every_workload_and_target() {
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(BENCH)
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .arg("--sidecar")
        .arg(sidecar())
        .output()
        .expect("the harness starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the harness failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    println!("quick run: {:?}", started.elapsed());

    // The table.
    for heading in [
        "[get]",
        "[save]",
        "[mix]",
        "[list]",
        "[write]",
        "[sidecar process]",
        "[targets]",
    ] {
        assert!(
            stdout.contains(heading),
            "no {heading} in the table:\n{stdout}"
        );
    }
    assert!(stdout.contains("sidecar / raw"), "{stdout}");
    assert!(stdout.contains("sidecar / floor"), "{stdout}");

    // The JSON report.
    let json = out.path().join("sqlite.json");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("sqlite.json")).unwrap();
    assert_eq!(report["database"], "sqlite");
    assert_eq!(report["settings"]["quick"], true);
    let results = report["results"].as_array().unwrap();
    let concurrency: Vec<u64> = report["settings"]["concurrency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    let connections = report["settings"]["connections"].as_u64().unwrap();
    for workload in ["get", "save", "mix", "list", "write"] {
        let targets: &[&str] = if workload == "get" {
            &["raw", "floor", "sidecar", "floor-uds", "sidecar-uds"]
        } else {
            &["raw", "floor", "sidecar"]
        };
        let modes = concurrency
            .iter()
            .map(|c| ("closed", *c))
            .chain([("open", connections)]);
        for (mode, c) in modes {
            for target in targets {
                let r = results
                    .iter()
                    .find(|r| {
                        r["workload"] == workload
                            && r["target"] == *target
                            && r["mode"] == mode
                            && r["concurrency"] == c
                    })
                    .unwrap_or_else(|| panic!("no {workload} {mode} c={c} {target} result"));
                let what = format!("{workload} {mode} c={c} {target}: {r}");
                let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {what}"));
                assert!(r["ops"].as_u64().unwrap() > 0, "{what}");
                assert!(f("ops_per_sec") > 0.0, "{what}");
                assert_eq!(r["errors"], 0, "{what}");
                assert!(f("p50_us") > 0.0, "{what}");
                assert!(f("p50_us") <= f("p90_us"), "{what}");
                assert!(f("p90_us") <= f("p99_us"), "{what}");
                assert!(f("p99_us") <= f("p999_us"), "{what}");
                assert!(f("p999_us") <= f("max_us"), "{what}");
                if target.starts_with("sidecar") || target.starts_with("floor") {
                    assert!(f("cpu_mcpu") >= 0.0, "{what}");
                    assert!(f("peak_rss_mb") > 1.0, "{what}");
                }
            }
        }
    }
    let comparisons = report["comparisons"].as_array().unwrap();
    assert!(comparisons
        .iter()
        .any(|c| c["target"] == "sidecar" && c["baseline"] == "raw" && c["workload"] == "get"));
    assert!(comparisons
        .iter()
        .all(|c| c["throughput_ratio"].as_f64().unwrap() > 0.0));
    let sidecar = &report["sidecar"];
    assert!(!sidecar["startup_ms"].as_array().unwrap().is_empty());
    assert!(sidecar["startup_median_ms"].as_f64().unwrap() > 0.0);
    assert!(sidecar["idle_rss_mb"].as_f64().unwrap() > 1.0);
    let targets = report["targets"].as_array().unwrap();
    assert!(targets
        .iter()
        .any(|t| t["name"].as_str().unwrap().contains("start-up")));

    // The chart, where its font is installed (the harness warns otherwise).
    let png = out.path().join("sqlite.png");
    if Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file() {
        let bytes = std::fs::read(&png).expect("sqlite.png");
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        assert!(bytes.len() > 10_000, "an empty chart?");
    } else {
        assert!(stderr.contains("no PNG chart"), "{stderr}");
    }
}

#[test]
fn a_bad_argument_is_refused_with_its_reason() {
    let output = Command::new(BENCH)
        .args([
            "--database-url",
            "mongodb://x",
            "--quick",
            "--out",
            "/nonexistent/bench",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unsupported --database-url"), "{stderr}");
}

#[test]
fn a_quick_query_run_agrees_with_the_raw_driver_and_reports_every_stage() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(BENCH)
        .args([
            "--quick",
            "--workloads",
            "query",
            "--startup-runs",
            "0",
            "--no-png",
        ])
        .arg("--out")
        .arg(out.path())
        .arg("--sidecar")
        .arg(sidecar())
        .output()
        .expect("the harness starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The run fails if the sidecar and the raw driver return different pages.
    assert!(
        output.status.success(),
        "the harness failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("[query]"), "{stdout}");
    let json = out.path().join("sqlite.json");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("sqlite.json")).unwrap();
    let q = &report["query"];
    let stages = q["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{q}");
    for stage in stages {
        let page = stage["page"].as_array().unwrap();
        assert_eq!(page.len(), 2, "raw and sidecar: {stage}");
        for r in page {
            assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
            assert_eq!(r["errors"], 0, "{r}");
        }
    }
    // Raw, floor and sidecar; Count: raw and sidecar.
    for (part, targets) in [("throughput", 3), ("latency", 3), ("count", 2)] {
        let runs = q[part].as_array().unwrap();
        assert_eq!(runs.len(), targets, "{part}: {q}");
        assert!(runs.iter().all(|r| r["errors"] == 0), "{part}: {q}");
    }
    assert!(q["counted"].as_u64().unwrap() > 0, "{q}");
    assert!(q["raw_sql"]["query"]
        .as_str()
        .unwrap()
        .contains("docsidecar_key"));
}
