//! The README's runnable examples (blocks after `<!-- runnable -->`), run as
//! printed and in order against a fresh sidecar, through `buf curl`: a gRPC
//! client no one here wrote, using reflection as grpcurl does. A placeholder
//! (`01a2…`, `<nextPageToken>`) takes the value the previous steps returned;
//! a `# → …` line after a command is what it must answer: a status code name
//! means that error, `"key":value` pairs must appear in the response.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const CODES: &[&str] = &[
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// One command of a runnable block.
#[derive(Debug)]
struct Example {
    line: usize,
    words: Vec<String>,
    expect: Option<String>,
}

/// Splits shell text into words: single and double quotes, backslash-newline
/// continuations; `None` while a quote is open (the command goes on).
fn words(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => w.push(chars.next()?),
                        c => w.push(c),
                    }
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    out.push(w);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(word);
    Some(out)
}

fn examples(readme: &str) -> Vec<Example> {
    let mut found = Vec::new();
    let mut lines = readme.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        if line.trim() != "<!-- runnable -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(|(_, l)| l),
            Some("```sh"),
            "a runnable block is ```sh"
        );
        let mut pending: Option<(usize, String)> = None;
        for (n, line) in lines.by_ref() {
            if line == "```" {
                break;
            }
            if let Some((start, mut text)) = pending.take() {
                text.push('\n');
                text.push_str(line);
                match words(&text) {
                    Some(_) if text.ends_with('\\') => pending = Some((start, text)),
                    Some(w) => found.push(Example {
                        line: start + 1,
                        words: w,
                        expect: None,
                    }),
                    None => pending = Some((start, text)),
                }
                continue;
            }
            if let Some(expect) = line.strip_prefix("# →") {
                let last: &mut Example =
                    found.last_mut().expect("an expectation follows a command");
                last.expect = Some(expect.trim().to_string());
            } else if line.starts_with("grpcurl") {
                match words(line) {
                    Some(w) if !line.ends_with('\\') => found.push(Example {
                        line: n + 1,
                        words: w,
                        expect: None,
                    }),
                    _ => pending = Some((n, line.to_string())),
                }
            }
        }
    }
    found
}

/// `buf`, as CI installs it (or `DOCSIDECAR_BUF`, or on the PATH).
fn buf() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("DOCSIDECAR_BUF") {
        return Some(path.into());
    }
    let ci = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/.buf/node_modules/.bin/buf");
    if ci.exists() {
        return Some(ci);
    }
    Command::new("buf")
        .arg("--version")
        .output()
        .ok()
        .map(|_| "buf".into())
}

/// Replaces placeholders in a request body with what earlier steps returned
/// (for the same document id when there is one).
fn fill(value: &mut Value, key: &str, seen: &HashMap<String, String>, id: Option<&str>) {
    match value {
        Value::Object(map) => {
            let id = map.get("id").and_then(Value::as_str).map(String::from);
            for (k, v) in map.iter_mut() {
                fill(v, k, seen, id.as_deref());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| fill(v, key, seen, id)),
        Value::String(s) if s.contains('…') || (s.starts_with('<') && s.ends_with('>')) => {
            let source = match s.strip_prefix('<').and_then(|s| s.strip_suffix('>')) {
                Some(name) => name.to_string(),
                None if key == "expectedRev" => "rev".into(),
                None => key.to_string(),
            };
            let of_id = id.map(|id| format!("{source}@{id}"));
            *s = of_id
                .and_then(|k| seen.get(&k))
                .or_else(|| seen.get(&source))
                .unwrap_or_else(|| panic!("no earlier step returned `{source}` for {s}"))
                .clone();
        }
        _ => {}
    }
}

/// JSON text without the whitespace between tokens (strings kept intact).
fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Checks a response against a `# →` line: its `"key":value` pairs (values
/// without a placeholder) and keys appear; repeated keys in that order.
fn check_shown(example: &Example, shown: &str, output: &str) {
    let output = compact(output);
    let shown = compact(shown);
    let mut after: HashMap<String, usize> = HashMap::new();
    let mut rest = shown.as_str();
    while let Some(start) = rest.find('"') {
        let tail = &rest[start + 1..];
        let Some(end) = tail.find('"') else { break };
        let key = &tail[..end];
        let after_key = &tail[end + 1..];
        rest = after_key;
        let Some(value_text) = after_key.strip_prefix(':') else {
            continue;
        };
        let value: String = if let Some(v) = value_text.strip_prefix('"') {
            let close = v.find('"').unwrap_or(v.len());
            format!("\"{}\"", &v[..close])
        } else {
            value_text
                .chars()
                .take_while(|c| !matches!(c, ',' | '}' | ']' | '{' | '['))
                .collect()
        };
        let needle = if value.contains('…') || value.is_empty() {
            format!("\"{key}\":")
        } else {
            format!("\"{key}\":{value}")
        };
        let from = after.get(key).copied().unwrap_or(0);
        match output[from..].find(&needle) {
            Some(at) => {
                after.insert(key.to_string(), from + at + needle.len());
            }
            None => panic!(
                "README line {}: expected {needle} in the response (in order), got {output}",
                example.line
            ),
        }
    }
}

async fn run(example: &Example, buf: &PathBuf, addr: &str, seen: &mut HashMap<String, String>) {
    let mut args: Vec<String> = vec!["curl".into(), "--protocol".into(), "grpc".into()];
    let mut target = None;
    let mut describe = None;
    let mut words = example.words.iter().skip(1);
    while let Some(w) = words.next() {
        match w.as_str() {
            "-plaintext" => args.push("--http2-prior-knowledge".into()),
            "-d" => {
                let body = words.next().expect("-d takes the request");
                let mut json: Value = serde_json::from_str(body).unwrap_or_else(|e| {
                    panic!("README line {}: -d is not JSON: {e}", example.line)
                });
                fill(&mut json, "", seen, None);
                args.extend(["-d".into(), json.to_string()]);
            }
            "-H" => args.extend(["-H".into(), words.next().expect("a header").clone()]),
            "-max-time" => args.extend([
                "--timeout".into(),
                format!("{}s", words.next().expect("seconds")),
            ]),
            "localhost:50051" => {}
            "list" => args.push("--list-services".into()),
            "describe" => {
                args.push("--list-methods".into());
                describe = words.next().cloned();
            }
            method if method.contains('/') => target = Some(format!("http://{addr}/{method}")),
            other => panic!("README line {}: unknown grpcurl word {other}", example.line),
        }
    }
    args.push(target.unwrap_or_else(|| format!("http://{addr}")));
    let command = tokio::process::Command::new(buf).args(&args).output();
    let out = tokio::time::timeout(Duration::from_secs(60), command)
        .await
        .expect("buf curl finishes")
        .expect("buf curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let expect = example.expect.clone().unwrap_or_default();
    let code = expect
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .find(|w| CODES.contains(w));
    match code {
        Some(code) => {
            assert!(
                !out.status.success(),
                "README line {}: expected {code}, got {stdout}",
                example.line
            );
            let wire = format!("\"code\": \"{}\"", code.to_ascii_lowercase());
            assert!(
                stderr.contains(&wire),
                "README line {}: expected {code}, got {stderr}",
                example.line
            );
            if let Some(message) = expect.strip_prefix(&format!("{code}: ")) {
                assert!(
                    stderr.contains(message),
                    "README line {}: expected the message {message:?}, got {stderr}",
                    example.line
                );
            }
        }
        None => assert!(
            out.status.success(),
            "README line {}: {:?} failed: {stdout}{stderr}",
            example.line,
            example.words
        ),
    }
    if let Some(service) = describe {
        assert!(
            stdout.contains(&format!("{service}/")),
            "README line {}: {stdout}",
            example.line
        );
    }
    if let Some(shown) = expect.find('{').map(|at| &expect[at..]) {
        check_shown(example, shown, &stdout);
    }
    // What later placeholders may take: the top-level strings of each
    // message, also as `field@id` when the message names a document.
    for message in serde_json::Deserializer::from_str(&stdout).into_iter::<Value>() {
        if let Ok(Value::Object(map)) = message {
            let id = map.get("id").and_then(Value::as_str).map(String::from);
            for (k, v) in map {
                if let Value::String(s) = v {
                    if let Some(id) = &id {
                        seen.insert(format!("{k}@{id}"), s.clone());
                    }
                    seen.insert(k, s);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_examples_run_as_printed() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let examples = examples(&readme);
    assert!(
        examples.len() >= 20,
        "found only {} runnable examples",
        examples.len()
    );
    let Some(buf) = buf() else {
        if std::env::var("DOCSIDECAR_REQUIRE_DB").is_ok_and(|v| v == "1") {
            panic!("DOCSIDECAR_REQUIRE_DB=1 but buf is missing (.ci/run installs it in .ci/.buf)");
        }
        eprintln!("skipped: no buf (npm install @bufbuild/buf, or set DOCSIDECAR_BUF)");
        return;
    };
    let t = TestServer::start(Backend::Sqlite, &[]).await.unwrap();
    let addr = t.local_addr.trim_start_matches("http://").to_string();
    let mut seen = HashMap::new();
    for example in &examples {
        run(example, &buf, &addr, &mut seen).await;
    }
    t.stop().await;
}

#[test]
fn shell_words_and_expectations_are_read_as_a_shell_would() {
    assert_eq!(
        words("a 'b c' \"d\\\"e\" \\\nf").unwrap(),
        ["a", "b c", "d\"e", "f"]
    );
    assert!(
        words("a '{\"x\":").is_none(),
        "an open quote continues on the next line"
    );
    let readme = "<!-- runnable -->\n```sh\n# c\ngrpcurl -d '{\"a\":\n 1}' \\\n  x/Y\n# → NOT_FOUND: gone\n```\n";
    let found = examples(readme);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].words, ["grpcurl", "-d", "{\"a\":\n 1}", "x/Y"]);
    assert_eq!(found[0].expect.as_deref(), Some("NOT_FOUND: gone"));
}
