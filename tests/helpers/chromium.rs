//! Headless Chromium for report tests: finds the browser, runs it with a fresh
//! profile, no network services, and a time limit.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the browser is expected (`PARITY_CHROMIUM` overrides).
pub fn path() -> PathBuf {
    std::env::var_os("PARITY_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// The browser, or `None` when the caller should skip (PARITY_SKIP_BROWSER=1).
/// Panics with the install command when it is missing and skipping was not asked.
pub fn find(test: &str) -> Option<PathBuf> {
    let p = path();
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("PARITY_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped: PARITY_SKIP_BROWSER=1 and no browser at {}", p.display());
        return None;
    }
    panic!(
        "{test}: no Chromium at {}. Install it with `apt-get install -y chromium` (or .ci/install-chromium), \
         point PARITY_CHROMIUM at a binary, or set PARITY_SKIP_BROWSER=1 to skip browser tests",
        p.display()
    );
}

/// Flags that keep the browser from talking to anything: no background services,
/// no component updates, no sync, no QUIC, a throwaway profile.
pub fn base_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-features=NetworkTimeServiceQuerying",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// Runs the browser with `args`; returns (stdout, stderr). Panics after `limit`.
pub fn run(browser: &Path, args: &[String], limit: Duration) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_p, err_p) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(browser)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_p).expect("stdout file"))
        .stderr(std::fs::File::create(&err_p).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish within {limit:?} (args {args:?})", browser.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_p).unwrap_or_default();
    let err = std::fs::read_to_string(&err_p).unwrap_or_default();
    assert!(status.success(), "{} failed ({status}): {err}", browser.display());
    (out, err)
}

/// A `file://` URL for `path`.
pub fn file_url(path: &Path) -> String {
    let abs = std::path::absolute(path).expect("absolute path");
    format!("file://{}", abs.display())
}

/// Takes a screenshot of `page` into `png` at `width` x `height`.
pub fn screenshot(browser: &Path, page: &Path, png: &Path, width: u32, height: u32) {
    let profile = tempfile::tempdir().expect("tempdir");
    let mut args = base_args(profile.path());
    args.push(format!("--screenshot={}", std::path::absolute(png).expect("absolute").display()));
    args.push(format!("--window-size={width},{height}"));
    args.push(file_url(page));
    run(browser, &args, Duration::from_secs(120));
}

/// Renders `page` with `--dump-dom` while Chromium writes a net log; returns the DOM
/// and the URLs the page itself asked for (requests with a document initiator).
/// Requests the browser makes on its own (update checks, account probes) carry the
/// initiator "not an origin" and are not the page's doing.
pub fn dom_and_page_requests(browser: &Path, page: &Path) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let netlog = dir.path().join("netlog.json");
    let mut args = base_args(&dir.path().join("profile"));
    args.push(format!("--log-net-log={}", netlog.display()));
    args.push("--net-log-capture-mode=Everything".into());
    args.push("--dump-dom".into());
    args.push(file_url(page));
    let (dom, _) = run(browser, &args, Duration::from_secs(120));
    let text = std::fs::read_to_string(&netlog).expect("Chromium wrote no net log");
    let log: serde_json::Value = serde_json::from_str(&text).expect("the net log is JSON");
    let mut asked = Vec::new();
    for e in log["events"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let p = &e["params"];
        let (Some(url), Some(initiator)) = (p["url"].as_str(), p["initiator"].as_str()) else {
            continue;
        };
        let local = ["file:", "data:", "about:"].iter().any(|s| url.starts_with(s));
        if initiator != "not an origin" && !local && !asked.iter().any(|a| a == url) {
            asked.push(url.to_string());
        }
    }
    (dom, asked)
}
