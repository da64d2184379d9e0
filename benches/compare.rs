//! Benchmark: comparison throughput on a Llama-2-7B-shaped dump pair, against the
//! memory-mapped read floor of the same files measured in the same run.
//!
//! The pair is made at run time under the target directory (never committed): hidden
//! 4096, 32 heads (MHA), intermediate 11008, vocab 32000, prefill 256 tokens plus 2
//! decode steps, every contract site; a float32 golden and a bfloat16 candidate
//! (the golden times 1 + 1e-3 noise, rounded). Each measurement runs in a child process
//! of this binary so that its peak RSS is its own:
//!
//! - `floor`: one thread reads every 8-byte word of both mapped files;
//! - `compare N`: `pipeline::check` of the pair on N threads (rayon; the best of two
//!   runs on every core, as for the floor), verdict and metrics written out, then
//!   compared bit for bit between 1 and N threads;
//! - `compare-summary`: the same, statistics first (`--summary-only`), every core;
//! - a numpy script computing msprobe's metrics per tensor, when `python3 -c 'import
//!   numpy'` works.
//!
//! Run: `cargo bench --bench compare`. `PARITY_BENCH_LAYERS` (default 18) and
//! `PARITY_BENCH_PREFILL` (default 256) shrink the pair.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use llama_parity::compare::statistics::SummaryOnly;
use llama_parity::compare::tolerance::Policy;
use llama_parity::contract::site::{ShapeDims, Site, Step};
use llama_parity::dump::Dump;
use llama_parity::pipeline::{self, Options};
use parity_testkit::{cpu_seconds, peak_rss, splitmix};

const H: usize = 4096;
const NH: usize = 32;
const NKV: usize = 32;
const D: usize = 128;
const I: usize = 11008;
const V: usize = 32000;
const DECODE: usize = 2;

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn shape(step: Step, site: &Site, p: usize) -> Vec<usize> {
    let dims = ShapeDims {
        batch: 1,
        prefill: p,
        heads: NH,
        kv_heads: NKV,
        head_dim: D,
        hidden: H,
        vocab: V,
        intermediate: I,
    };
    site.shape(step, &dims)
}

/// Writes one safetensors file of `tensors` (key, shape, dtype name, bytes per element),
/// each tensor's bytes made by `fill(key, shape, out)`.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &str, usize)],
    mut fill: impl FnMut(&str, &[usize], &mut Vec<u8>),
) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (k, s, dt, size) in tensors {
        let n = s.iter().product::<usize>() * size;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dt, "shape": s, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_string(&header).expect("header");
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(' ');
    }
    let tmp = path.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).expect("create"));
    w.write_all(&(h.len() as u64).to_le_bytes()).expect("write");
    w.write_all(h.as_bytes()).expect("write");
    let mut buf = Vec::new();
    for (k, s, _, _) in tensors {
        buf.clear();
        fill(k, s, &mut buf);
        w.write_all(&buf).expect("write");
    }
    w.flush().expect("flush");
    drop(w);
    std::fs::rename(&tmp, path).expect("rename");
}

/// Makes the dump pair under `dir` unless a pair of the same size is already there.
fn make_pair(dir: &Path, layers: usize, p: usize) {
    let stamp = dir.join("stamp");
    let want = format!("layers {layers} prefill {p} decode {DECODE} v2\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let t = Instant::now();
    let steps: Vec<Step> =
        std::iter::once(Step::Prefill).chain((0..DECODE).map(Step::Decode)).collect();
    let mut sites: BTreeMap<String, (Step, Site, Vec<usize>)> = BTreeMap::new();
    for &step in &steps {
        for site in Site::all(layers) {
            let s = shape(step, &site, p);
            sites.insert(format!("{step}/{site}"), (step, site, s));
        }
    }
    let ids: Vec<i64> = (0..p as u64).map(|i| (splitmix(i) % V as u64) as i64).collect();
    let decode: Vec<i64> =
        (0..DECODE as u64).map(|j| (splitmix(j + 7) % V as u64) as i64).collect();
    for (name, dtype, size) in [("golden", "F32", 4), ("candidate", "BF16", 2)] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        let manifest = serde_json::json!({
            "format": "llama-parity/dump@1",
            "producer": {"framework": format!("bench {name}"), "version": "0", "device": "cpu"},
            "model": {"vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": layers,
                      "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": D,
                      "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                      "tie_word_embeddings": false, "hidden_act": "silu"},
            "dtype": if size == 4 { "float32" } else { "bfloat16" },
            "scenario": {"name": "llama2-7b-shaped", "input_ids": [ids], "attention_mask": [vec![1; p]],
                         "decode_ids": [decode]},
            "steps": steps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        });
        std::fs::write(
            d.join("manifest.json"),
            serde_json::to_string_pretty(&manifest).expect("json"),
        )
        .expect("manifest");
        let list: Vec<(String, Vec<usize>, &str, usize)> = sites
            .iter()
            .map(|(k, (_, site, s))| match site {
                Site::PositionIds => (k.clone(), s.clone(), "I64", 8),
                _ => (k.clone(), s.clone(), dtype, size),
            })
            .collect();
        write_safetensors(&d.join("activations.safetensors"), &list, |key, s, out| {
            let (step, site, _) = &sites[key];
            let n: usize = s.iter().product();
            let seed = splitmix(key.bytes().fold(0u64, |h, b| h.wrapping_mul(131) ^ b as u64));
            match site {
                Site::PositionIds => {
                    let first = match step {
                        Step::Prefill | Step::Train => 0,
                        Step::Decode(j) => p + j,
                    };
                    for i in 0..n {
                        out.extend_from_slice(&((first + i) as i64).to_le_bytes());
                    }
                }
                _ => {
                    for i in 0..n {
                        let v = if *site == Site::Mask {
                            let (t, kpos) = (i / s[3], i % s[3]);
                            let q = if *step == Step::Prefill { t } else { s[3] - 1 };
                            if kpos <= q {
                                0.0
                            } else {
                                -1e9
                            }
                        } else {
                            let r = splitmix(seed ^ i as u64);
                            let u = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                            let noise =
                                ((r & 0xFF_FFFF) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1e-3;
                            if size == 4 {
                                u
                            } else {
                                u * (1.0 + noise)
                            }
                        };
                        if size == 4 {
                            out.extend_from_slice(&v.to_le_bytes());
                        } else {
                            out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                        }
                    }
                }
            }
        });
    }
    std::fs::write(&stamp, want).expect("stamp");
    println!("made the dump pair in {:.1} s", t.elapsed().as_secs_f64());
}

/// In a child: runs one measurement and prints `wall cpu peak_rss` (and writes metrics).
fn child(what: &str, dir: &Path) {
    let t = Instant::now();
    let cpu0 = cpu_seconds();
    match what {
        "floor" => {
            let mut sum = 0u64;
            for name in ["golden", "candidate"] {
                let f = std::fs::File::open(dir.join(name).join("activations.safetensors"))
                    .expect("open");
                // SAFETY: read-only map of a file this benchmark wrote and no one changes.
                let map = unsafe { memmap2::Mmap::map(&f) }.expect("map");
                for c in map.chunks_exact(8) {
                    sum = sum.wrapping_add(u64::from_le_bytes(c.try_into().expect("8")));
                }
                // Like the comparison, give the pages back as they are read.
                let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
            }
            std::hint::black_box(sum);
        }
        _ => {
            let g = Dump::open(&dir.join("golden")).expect("golden");
            let c = Dump::open(&dir.join("candidate")).expect("candidate");
            let policy = Policy::default();
            let summary = SummaryOnly::default();
            let opts = Options {
                summary_only: (what == "compare-summary").then_some(&summary),
                ..Options::new(&policy)
            };
            let r = pipeline::check(&g, &c, None, &opts).expect("check");
            let bits: Vec<String> = r
                .sites
                .iter()
                .map(|e| {
                    format!(
                        "{} {} {:?} {}",
                        e.step,
                        e.site,
                        e.status,
                        serde_json::to_string(&e.metrics).unwrap_or_default()
                    )
                })
                .collect();
            std::fs::write(dir.join(format!("metrics-{what}.txt")), bits.join("\n"))
                .expect("write");
            println!("verdict {:?} sites {}", r.verdict, r.sites.len());
        }
    }
    println!("RESULT {} {} {}", t.elapsed().as_secs_f64(), cpu_seconds() - cpu0, peak_rss());
}

struct Run {
    wall: f64,
    cpu: f64,
    rss: u64,
    out: String,
}

fn measure(what: &str, dir: &Path, threads: Option<usize>) -> Run {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.env("PARITY_BENCH_CHILD", what).env("PARITY_BENCH_DIR", dir);
    if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let o = cmd.output().expect("child");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what}: {out}{}", String::from_utf8_lossy(&o.stderr));
    let line = out.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("RESULT line");
    let v: Vec<f64> = line.split_whitespace().map(|x| x.parse().expect("number")).collect();
    Run { wall: v[0], cpu: v[1], rss: v[2] as u64, out }
}

const NUMPY: &str = r#"
import json, sys, time, numpy as np
def load(path):
    m = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(np.frombuffer(m[:8], dtype="<u8")[0])
    h = json.loads(bytes(m[8:8 + n]))
    h.pop("__metadata__", None)
    out = {}
    for k, v in h.items():
        a, b = v["data_offsets"]
        raw = m[8 + n + a: 8 + n + b]
        if v["dtype"] == "F32": x = raw.view("<f4")
        elif v["dtype"] == "BF16": x = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else: x = raw.view("<i8")
        out[k] = x
    return out
t = time.time()
g, c = load(sys.argv[1]), load(sys.argv[2])
for k in g:
    a = g[k].astype(np.float64); b = c[k].astype(np.float64)
    d = b - a; ad = np.abs(d)
    cos = (a @ b) / (np.sqrt(a @ a) * np.sqrt(b @ b) + 1e-300)
    rel = ad / np.where(a == 0, 1e-30, np.abs(a))
    r = (cos, ad.max(), rel.max(), (rel < 1e-3).mean(), (rel < 5e-3).mean(), np.sqrt(d @ d) / np.sqrt(a @ a + 1e-300))
print("RESULT", time.time() - t)
"#;

fn main() {
    let dir = PathBuf::from(option_env!("CARGO_TARGET_TMPDIR").unwrap_or("target/tmp"))
        .join("bench-compare");
    if let Ok(what) = std::env::var("PARITY_BENCH_CHILD") {
        let d = std::env::var_os("PARITY_BENCH_DIR").map_or(dir, PathBuf::from);
        return child(&what, &d);
    }
    // `cargo bench` passes `--bench`; nothing else is taken.
    let layers = env_usize("PARITY_BENCH_LAYERS", 18);
    let p = env_usize("PARITY_BENCH_PREFILL", 256);
    make_pair(&dir, layers, p);
    let size = |n: &str| {
        std::fs::metadata(dir.join(n).join("activations.safetensors")).map_or(0, |m| m.len())
    };
    let (gb, cb) = (size("golden"), size("candidate"));
    let bytes = (gb + cb) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "dump pair: golden {:.2} GB (float32) + candidate {:.2} GB (bfloat16); {layers} layers, prefill {p} + {DECODE} decode steps; {cores} cores",
        gb as f64 / 1e9,
        cb as f64 / 1e9
    );
    let gbs = |r: &Run| bytes / r.wall / 1e9;
    // Warm the page cache once, then take the best of two floors.
    let _ = measure("floor", &dir, None);
    let f1 = measure("floor", &dir, None);
    let f2 = measure("floor", &dir, None);
    let floor = if f1.wall <= f2.wall { f1 } else { f2 };
    println!(
        "{:<34} {:>8} {:>8} {:>10} {:>10} {:>12} {:>11}",
        "measurement", "wall s", "CPU s", "GB/s", "x floor", "peak RSS MiB", "cores busy"
    );
    let row = |name: &str, r: &Run| {
        println!(
            "{:<34} {:>8.2} {:>8.2} {:>10.2} {:>10.3} {:>12.0} {:>11.2}",
            name,
            r.wall,
            r.cpu,
            gbs(r),
            floor.wall / r.wall,
            r.rss as f64 / (1 << 20) as f64,
            r.cpu / r.wall
        );
    };
    row("mmap read floor, 1 thread", &floor);
    // The best of two, as for the floor.
    let (a1, a2) = (measure("compare-n", &dir, None), measure("compare-n", &dir, None));
    let all = if a1.wall <= a2.wall { a1 } else { a2 };
    row(&format!("parity compare, {cores} threads"), &all);
    let one = measure("compare-1", &dir, Some(1));
    row("parity compare, 1 thread", &one);
    let summary = measure("compare-summary", &dir, None);
    row(&format!("parity compare --summary-only, {cores}"), &summary);
    let same = std::fs::read(dir.join("metrics-compare-n.txt")).ok()
        == std::fs::read(dir.join("metrics-compare-1.txt")).ok();
    println!(
        "{}; metrics bit-identical between 1 and {cores} threads: {}",
        all.out.lines().next().unwrap_or_default(),
        if same { "yes" } else { "NO" }
    );
    let numpy = Command::new("python3").args(["-c", "import numpy"]).output();
    if numpy.as_ref().is_ok_and(|o| o.status.success()) {
        let script = dir.join("numpy_metrics.py");
        std::fs::write(&script, NUMPY).expect("script");
        let t = Instant::now();
        let o = Command::new("python3")
            .arg(&script)
            .arg(dir.join("golden/activations.safetensors"))
            .arg(dir.join("candidate/activations.safetensors"))
            .output()
            .expect("python3");
        let wall = t.elapsed().as_secs_f64();
        if o.status.success() {
            println!(
                "numpy script (msprobe's metrics per tensor, float64): {wall:.2} s, {:.2} GB/s; parity is {:.2}x faster",
                bytes / wall / 1e9,
                wall / all.wall
            );
        } else {
            println!("numpy script failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    } else {
        println!("numpy script: skipped (python3 -c 'import numpy' fails here)");
    }
    assert!(same, "metrics differ between 1 and {cores} threads");
}
