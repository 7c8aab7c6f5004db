//! The container image is built the way CI builds and tests the binary.

fn read(path: &str) -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_string() + path).unwrap()
}

/// The `cargo build …` commands of a file, normalized.
fn cargo_builds(text: &str) -> Vec<String> {
    text.lines()
        .flat_map(|l| l.split("&&"))
        .map(str::trim)
        .filter(|c| c.starts_with("cargo build"))
        .map(|c| {
            c.trim_end_matches('\\')
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_what_ci_builds() {
    let dockerfile = read("Dockerfile");
    let ci = read(".ci/run");
    let image_builds = cargo_builds(&dockerfile);
    assert!(!image_builds.is_empty(), "the Dockerfile builds with cargo");
    for build in &image_builds {
        assert_eq!(
            build, "cargo build --release --locked -p docsidecar",
            "the image builds the sidecar in release, from Cargo.lock"
        );
        assert!(cargo_builds(&ci).contains(build), "CI runs `{build}` too");
    }
}

#[test]
fn the_dockerfile_brings_every_workspace_manifest() {
    // Cargo reads every member's manifest, even with `-p docsidecar`.
    let dockerfile = read("Dockerfile");
    let cargo = read("Cargo.toml");
    let members = cargo
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = "))
        .expect("a [workspace] members line");
    for member in members
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty() && *m != ".")
    {
        let copy = format!("COPY {member}/Cargo.toml {member}/Cargo.toml");
        assert!(dockerfile.contains(&copy), "the Dockerfile lacks `{copy}`");
    }
    let ignored = read(".dockerignore");
    assert!(
        ignored.lines().any(|l| l.trim() == "target"),
        "the build context must not carry target/"
    );
}

#[test]
fn the_image_runs_as_a_non_root_user_and_exposes_its_ports() {
    let dockerfile = read("Dockerfile");
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("a numeric user");
    assert_ne!(uid, 0);
    assert!(dockerfile.contains("EXPOSE 50051 9090"));
    // DATABASE_URL would silently override the discrete DB_* settings.
    assert!(!dockerfile.contains("DATABASE_URL="));
    let toolchain = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|t| t.split('-').next())
        .expect("a rust build image");
    let cargo = read("Cargo.toml");
    let required = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version");
    let version = |v: &str| {
        v.split('.')
            .map(|p| p.parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(
        version(toolchain) >= version(required),
        "the image's Rust {toolchain} < {required}"
    );
}
