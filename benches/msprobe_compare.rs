//! msprobe benchmark: `parity compare` against msprobe's own `compare` on the same pair
//! of real msprobe dumps, in the same run.
//!
//! At run time it records the pair with msprobe itself (`benches/msprobe_compare.py
//! make`: PyTorch, level mix, tensor mode, every API and module with their parameters,
//! as msprobe writes them) of `benches/scenarios/msprobe_bench_f32.json` (random
//! weights, 4 layers, hidden 512, batch 2 with padding, prefill 192 and one decode
//! step; several hundred MB a dump): the golden is HF's correct run, the candidate the
//! same model with `rope.pos_reset` planted. The pair lives under
//! `target/msprobe-bench/` (never committed) and is made once.
//!
//! Then, on that pair:
//! - msprobe's compare in its own process, after `import msprobe` (`pt_compare` on
//!   each step's pair of `dump.json` files: what `msprobe compare -tp NPU/dump.json -gp
//!   BENCH/dump.json` runs), import time left out;
//! - the same through msprobe's command line, `msprobe compare -tp ... -gp ...` once a
//!   step, wall time (interpreter start and imports included);
//! - `parity compare GOLDEN_MSPROBE_DUMP CANDIDATE_MSPROBE_DUMP` (the golden read as an
//!   msprobe dump with its manifest.json), wall time of the process, best of three;
//!
//! and prints the times, the bytes each dump holds and the ratios. The ratio the
//! benchmark stands on is msprobe's in-process compare time over parity's whole wall.
//!
//! `cargo bench --bench msprobe_compare`. Needs the msprobe venv (`MSPROBE_PYTHON`,
//! default `~/.cache/llama-parity/msprobe-venv/bin/python`; docs/msprobe.md) and
//! a release build of `parity`. `MSPROBE_BENCH_THREADS` (default 2) sets parity's
//! threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SCENARIO: &str = "benches/scenarios/msprobe_bench_f32.json";
const FAULT: &str = "rope.pos_reset";

/// Bytes of every file under `dir`.
fn du(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        n += if p.is_dir() { du(&p) } else { e.metadata().map(|m| m.len()).unwrap_or(0) };
    }
    n
}

/// The `dump.json` of `root/step/<rank|proc>/`.
fn dump_json(root: &Path, step: &str) -> PathBuf {
    let dir = root.join(step);
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path().join("dump.json"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(found.len(), 1, "{}: one rank or proc folder expected", dir.display());
    found[0].clone()
}

/// Wall seconds of a command that must exit with one of `ok` codes; its stdout.
fn wall(label: &str, cmd: &mut Command, ok: &[i32]) -> (f64, String) {
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{label}: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok.contains(&code),
        "{label} exited {code}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let home = std::env::var("HOME").unwrap_or_default();
    let venv = PathBuf::from(home).join(".cache/llama-parity/msprobe-venv");
    let python = std::env::var("MSPROBE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| venv.join("bin/python"));
    let msprobe = python.with_file_name("msprobe");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let parity = target.join("release/parity");
    assert!(parity.is_file(), "build first: cargo build --release ({})", parity.display());
    let threads = std::env::var("MSPROBE_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let scratch = target.join("msprobe-bench");
    let pair = scratch.join("pair");
    let (golden, candidate) = (pair.join("golden"), pair.join("candidate"));
    if !candidate.join("manifest.json").is_file() {
        let _ = std::fs::remove_dir_all(&pair);
        let t = Instant::now();
        let st = Command::new(&python)
            .arg(root.join("benches/msprobe_compare.py"))
            .args(["make", "--scenario", SCENARIO, "--fault", FAULT, "--forwards", "2", "--out"])
            .arg(&pair)
            .current_dir(&root)
            .status()
            .expect("run benches/msprobe_compare.py make");
        assert!(st.success(), "making the msprobe pair failed");
        eprintln!("made the msprobe pair in {:.0} s", t.elapsed().as_secs_f64());
    }
    let steps = ["step0", "step1"];
    let (gb, cb) = (du(&golden), du(&candidate));

    // msprobe's compare, in process (imports left out).
    let out = scratch.join("msprobe-out");
    let _ = std::fs::remove_dir_all(&out);
    let (_, text) = wall(
        "msprobe compare (in process)",
        Command::new(&python)
            .arg(root.join("benches/msprobe_compare.py"))
            .args(["time", "--golden"])
            .arg(&golden)
            .arg("--candidate")
            .arg(&candidate)
            .arg("--out")
            .arg(&out),
        &[0],
    );
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("msprobe_compare.py time prints one JSON line");
    let ms_inproc = v["compare_s"].as_f64().expect("compare_s");
    let ms_import = v["import_s"].as_f64().unwrap_or(f64::NAN);

    // msprobe's command line, one call a step.
    let mut ms_cli = 0.0;
    for step in steps {
        let o = scratch.join("msprobe-cli-out").join(step);
        let _ = std::fs::remove_dir_all(&o);
        std::fs::create_dir_all(&o).expect("msprobe output dir");
        let (s, _) = wall(
            "msprobe compare (command line)",
            Command::new(&msprobe)
                .arg("compare")
                .arg("-tp")
                .arg(dump_json(&candidate, step))
                .arg("-gp")
                .arg(dump_json(&golden, step))
                .arg("-o")
                .arg(&o),
            &[0],
        );
        ms_cli += s;
    }

    // parity compare on the same pair: best of three (exit 1: the candidate diverges).
    let report = scratch.join("parity-report");
    let mut best = f64::INFINITY;
    let mut summary = String::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(&report);
        let (s, o) = wall(
            "parity compare",
            Command::new(&parity)
                .arg("compare")
                .arg(&golden)
                .arg(&candidate)
                .arg("--report")
                .arg(&report)
                .env("RAYON_NUM_THREADS", &threads),
            &[0, 1],
        );
        best = best.min(s);
        summary = o;
    }
    let rep: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report.join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    let first = &rep["first_divergence"];

    let mb = |b: u64| b as f64 / 1e6;
    println!("\nmsprobe benchmark: the same pair of msprobe dumps, {threads} parity threads");
    println!(
        "golden dump {:.0} MB, candidate dump {:.0} MB ({} steps)",
        mb(gb),
        mb(cb),
        steps.len()
    );
    println!("{:<48} {:>9} {:>12}", "run", "time s", "x parity");
    for (name, secs) in [
        ("msprobe compare, in process (import excluded)", ms_inproc),
        ("msprobe compare, command line (wall)", ms_cli),
        ("parity compare (wall, best of 3)", best),
    ] {
        println!("{name:<48} {secs:>9.2} {:>12.1}", secs / best);
    }
    println!("(msprobe import: {ms_import:.2} s)");
    println!(
        "parity: {} at {} {}; msprobe throughput {:.3} GB/s, parity {:.3} GB/s (dump bytes / time)",
        rep["verdict"].as_str().unwrap_or("?"),
        first["step"].as_str().unwrap_or("-"),
        first["site"].as_str().unwrap_or("-"),
        (gb + cb) as f64 / 1e9 / ms_inproc,
        (gb + cb) as f64 / 1e9 / best
    );
    if std::env::var_os("MSPROBE_BENCH_VERBOSE").is_some() {
        println!("{summary}");
    }
}
