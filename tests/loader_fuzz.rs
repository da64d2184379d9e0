//! Fuzzing every loader on the stable toolchain (issue 12): a deterministic
//! mutator (proptest's ChaCha generator, fixed seed) over the corpus of each input kind
//! (safetensors header and tensors, `.npy`, manifest, policy, key map, `.ckpt`, the
//! pickle and zip of msprobe's `.pt`, msprobe's `dump.json`, an HF checkpoint's index,
//! a `--baseline` report, a cached noise floor, a LoRA adapter's config), each
//! loader time-boxed to `PARITY_FUZZ_SECONDS` (default 20 s). The invariant: a loader
//! returns a value or an error on any bytes; it never panics, never takes more than
//! 5 s on one input, and the process's peak RSS stays under 2 GiB.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_parity::compare::tolerance::Policy;
use llama_parity::dump::{Dump, Manifest, SafetensorsFile};
use llama_parity::weights::ckpt::Checkpoint;
use llama_parity::weights::keymap::KeyMap;
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The time box of one loader.
fn budget() -> Duration {
    let s = std::env::var("PARITY_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    Duration::from_secs_f64(s)
}

/// Bytes a mutation likes to plant: JSON and protobuf structure, and numbers at the
/// edges of every integer width.
const TOKENS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"18446744073709551615",
    b"4611686018427387904",
    b"1e308",
    b"NaN",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\x1b",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x00\x00\x00\x00\x00\x00\x00\x40",
    b"\"shape\":[0,4611686018427387904,4]",
    b"\"data_offsets\":[0,18446744073709551615]",
];

/// One to four stacked mutations of `seed`.
fn mutate(rng: &mut TestRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if b.is_empty() { 0 } else { rng.random_range(0..b.len()) };
        match rng.random_range(0..7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.random_range(0..8),
            1 if !b.is_empty() => b[at] = rng.random(),
            2 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                b.splice(at..at, t.iter().copied());
            }
            3 if !b.is_empty() => {
                let end = (at + rng.random_range(1..=16)).min(b.len());
                b.drain(at..end);
            }
            4 => b.truncate(at),
            5 if !b.is_empty() => {
                // Overwrite the digits at `at` with a token.
                let end =
                    b[at..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |p| at + p);
                let t = TOKENS[rng.random_range(0..5)];
                b.splice(at..end.max(at), t.iter().copied());
            }
            _ if !b.is_empty() => {
                let end = (at + rng.random_range(1..=64)).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    b
}

/// Runs `load` on mutations of `seeds` until the time box ends; asserts no panic, no
/// slow input, bounded memory; prints the counts.
fn fuzz(name: &str, seed: u64, seeds: &[Vec<u8>], load: impl Fn(&[u8]) -> bool) {
    fuzz_for(budget(), name, seed, seeds, load)
}

/// [`fuzz`] for half the time box: the readers added with the msprobe and checkpoint
/// inputs, so that they add little to CI.
fn fuzz_half(name: &str, seed: u64, seeds: &[Vec<u8>], load: impl Fn(&[u8]) -> bool) {
    fuzz_for(budget() / 2, name, seed, seeds, load)
}

fn fuzz_for(
    budget: Duration,
    name: &str,
    seed: u64,
    seeds: &[Vec<u8>],
    load: impl Fn(&[u8]) -> bool,
) {
    assert!(!seeds.is_empty(), "{name}: no corpus");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let start = Instant::now();
    let (mut execs, mut accepted, mut slowest) = (0u64, 0u64, Duration::ZERO);
    let mut crashes = Vec::new();
    while start.elapsed() < budget {
        let s = &seeds[rng.random_range(0..seeds.len())];
        let input = if execs == 0 { s.clone() } else { mutate(&mut rng, s) };
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| load(&input))) {
            Ok(ok) => accepted += ok as u64,
            Err(_) => crashes.push(input),
        }
        slowest = slowest.max(t.elapsed());
        execs += 1;
    }
    let rss = parity_testkit::peak_rss();
    eprintln!(
        "fuzz {name}: {execs} executions, {accepted} accepted, {} crashes, slowest {:.3} s, peak RSS {} MiB",
        crashes.len(),
        slowest.as_secs_f64(),
        rss >> 20
    );
    assert!(
        crashes.is_empty(),
        "{name}: {} inputs panicked, first: {:?}",
        crashes.len(),
        crashes[0]
    );
    assert!(slowest < Duration::from_secs(5), "{name}: one input took {slowest:?}");
    assert!(rss < 2 << 30, "{name}: peak RSS {} MiB", rss >> 20);
    assert!(execs > 10, "{name}: only {execs} executions");
}

fn files(dir: &Path, pick: impl Fn(&Path) -> bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d).expect("read_dir").flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() && pick(&p) {
                out.push(std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn ends(ext: &'static str) -> impl Fn(&Path) -> bool {
    move |p| p.to_string_lossy().ends_with(ext)
}

#[test]
fn safetensors_loader_never_panics_on_mutated_files() {
    let seeds = files(&root().join("fixtures/bad"), ends(".safetensors"));
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("a.safetensors");
    fuzz("safetensors", 1, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        let Ok(f) = SafetensorsFile::open(&p) else { return false };
        let keys: Vec<String> = f.keys().map(str::to_string).collect();
        for k in keys {
            let t = f.require(&k).expect("a listed key");
            let mut s = 0.0;
            for i in 0..t.numel() {
                s += t.get_f64(i);
            }
            std::hint::black_box(s);
        }
        true
    });
}

#[test]
fn npy_loader_never_panics_on_mutated_files() {
    let tree = root().join("fixtures/bad/npy_bad_magic");
    let seeds = files(&root().join("fixtures/bad"), ends(".npy"));
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(d.path().join("activations/prefill")).expect("mkdir");
    std::fs::create_dir_all(d.path().join("activations/decode.0")).expect("mkdir");
    std::fs::copy(tree.join("manifest.json"), d.path().join("manifest.json")).expect("copy");
    let good = tree.join("activations/decode.0/model.embed_tokens.npy");
    std::fs::copy(good, d.path().join("activations/decode.0/model.embed_tokens.npy"))
        .expect("copy");
    let p = d.path().join("activations/prefill/model.embed_tokens.npy");
    fuzz("npy", 2, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        let Ok(dump) = Dump::open(d.path()) else { return false };
        let step = llama_parity::contract::site::Step::Prefill;
        let sites = dump.sites(step).to_vec();
        let mut ok = true;
        for s in &sites {
            match dump.get(step, s) {
                Ok(Some(t)) => {
                    std::hint::black_box((0..t.numel()).map(|i| t.get_f64(i)).sum::<f64>());
                }
                _ => ok = false,
            }
        }
        ok
    });
}

#[test]
fn manifest_loader_never_panics_on_mutated_files() {
    let seeds = files(&root().join("fixtures/bad"), ends("manifest.json"));
    fuzz("manifest", 3, &seeds, |b| {
        Manifest::parse(&String::from_utf8_lossy(b), Path::new("manifest.json")).is_ok()
    });
}

#[test]
fn policy_loader_never_panics_on_mutated_files() {
    let seeds: Vec<Vec<u8>> = [
        r#"{ "defaults": { "bfloat16": { "max_rel_l2": 0.05 } },
  "rules": [ { "site": "model.layers.*.self_attn.probs", "step": "decode.*", "max_rel_l2": 0.1 },
             { "site": "lm_head", "skip": true } ] }"#,
        r#"{"rules": [{"site": "*", "dtype": "float16", "min_cosine": 0.99, "max_abs": 1e-3}]}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("policy.json");
    fuzz("policy", 4, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        Policy::load(&p).is_ok()
    });
}

#[test]
fn keymap_loader_never_panics_on_mutated_files() {
    let seeds = files(&root().join("fixtures/ports/mindspore"), ends("keymap.json"));
    fuzz("keymap", 5, &seeds, |b| {
        let Ok(m) = KeyMap::parse(&String::from_utf8_lossy(b), Path::new("keymap.json")) else {
            return false;
        };
        std::hint::black_box(m.to_port("model.layers.3.self_attn.q_proj.weight"));
        true
    });
}

#[test]
fn ckpt_loader_never_panics_on_mutated_files() {
    let seeds = files(&root().join("fixtures/ports/mindspore/ckpt"), ends(".ckpt"));
    fuzz("ckpt", 6, &seeds, |b| {
        let Ok(c) = Checkpoint::from_bytes(Path::new("m.ckpt"), b) else { return false };
        for (_, t) in c.iter() {
            std::hint::black_box((0..t.numel()).map(|i| t.get_f64(i)).sum::<f64>());
        }
        true
    });
}

/// The `data.pkl` of each of the first `n` `.pt` files of the msprobe fixtures.
fn pickles(n: usize) -> Vec<Vec<u8>> {
    use std::io::Read;
    files(&root().join("fixtures/msprobe/gqa_pad_f32"), ends(".pt"))
        .into_iter()
        .take(n)
        .map(|zip| {
            let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip)).expect("zip");
            let name = z
                .file_names()
                .filter_map(|n| n.ok())
                .find(|n| n.ends_with("data.pkl"))
                .expect("pkl")
                .into_owned();
            let mut b = Vec::new();
            z.by_name(&name).expect("pkl").read_to_end(&mut b).expect("read");
            b
        })
        .collect()
}

#[test]
fn pickle_reader_never_panics_on_mutated_pickles() {
    fuzz_half("pickle", 7, &pickles(8), |b| llama_parity::dump::pickle::tensor_info(b).is_ok());
}

#[test]
fn pt_reader_never_panics_on_mutated_files() {
    let seeds: Vec<Vec<u8>> = files(&root().join("fixtures/msprobe/gqa_pad_f32"), ends(".pt"))
        .into_iter()
        .take(8)
        .collect();
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("t.pt");
    fuzz_half("pt", 8, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        let Ok(t) = llama_parity::dump::msprobe::pt::read(&p) else { return false };
        std::hint::black_box((0..t.numel()).map(|i| t.get_f64(i)).sum::<f64>());
        true
    });
}

#[test]
fn msprobe_dump_json_reader_never_panics_on_mutated_files() {
    use llama_parity::dump::msprobe::{map::SiteMap, MsprobeDump};
    let d = tempfile::tempdir().expect("tempdir");
    let dump = d.path().join("dump");
    crate::helpers::copy_tree(&root().join("fixtures/msprobe/gqa_pad_f32"), &dump);
    let step = dump.join("step0");
    let rank = std::fs::read_dir(&step).expect("step").next().expect("rank").expect("e").path();
    let p = rank.join("dump.json");
    let seeds = vec![std::fs::read(&p).expect("dump.json")];
    let golden = Dump::open(&root().join("golden/gqa_pad_f32")).expect("golden");
    let map = SiteMap::hf();
    fuzz_half("msprobe dump.json", 9, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        let Ok(m) = MsprobeDump::open(&dump, &map) else { return false };
        m.to_dump(&map, &golden.manifest).is_ok()
    });
}

#[test]
fn checkpoint_index_reader_never_panics_on_mutated_files() {
    let d = tempfile::tempdir().expect("tempdir");
    let ckpt = d.path().join("ckpt");
    crate::helpers::copy_tree(&root().join("fixtures/checkpoints/tiny_llama3"), &ckpt);
    let p = ckpt.join("model.safetensors.index.json");
    let seeds = vec![std::fs::read(&p).expect("index")];
    fuzz_half("checkpoint index", 10, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        llama_parity::weights::checkpoint::HfCheckpoint::open(&ckpt).is_ok()
    });
}

#[test]
fn baseline_reader_never_panics_on_mutated_reports() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("accepted");
    let args = ["compare", "golden/gqa_pad_f32", "golden/gqa_pad_f32", "--no-floor"];
    let r = crate::helpers::parity(&[&args[..], &["--report", out.to_str().unwrap()]].concat());
    assert_eq!(r.0, Some(0), "{r:?}");
    let seeds = vec![std::fs::read(out.join("report.json")).expect("report.json")];
    let p = d.path().join("baseline.json");
    fuzz_half("baseline", 11, &seeds, |b| {
        std::fs::write(&p, b).expect("write");
        llama_parity::report::baseline::Baseline::load(&p).is_ok()
    });
}

#[test]
fn floor_cache_reader_never_panics_on_mutated_entries() {
    use llama_parity::compare::floor::{golden_hash, FloorCache};
    use llama_parity::dump::Precision;
    let d = tempfile::tempdir().expect("tempdir");
    let cache = FloorCache { dir: d.path().join("floors") };
    let dir = cache.dir.to_str().unwrap().to_string();
    let r = crate::helpers::parity(&[
        "compare",
        "golden/gqa_pad_f32",
        "golden/gqa_pad_f32",
        "--floor-cache",
        &dir,
    ]);
    assert_eq!(r.0, Some(0), "{r:?}");
    let golden_dir = root().join("golden/gqa_pad_f32");
    let golden = Dump::open(&golden_dir).expect("golden");
    let hash = golden_hash(&golden_dir).expect("hash");
    let path = cache.path(&hash, Precision::F32);
    let seeds = vec![std::fs::read(&path).expect("the floor the comparison cached")];
    // The unmutated entry is believed: the fuzzing starts from a floor that loads.
    assert!(matches!(cache.load(&hash, Precision::F32, &golden), Ok(Some(_))));
    fuzz_half("floor cache", 12, &seeds, |b| {
        std::fs::write(&path, b).expect("write");
        matches!(cache.load(&hash, Precision::F32, &golden), Ok(Some(_)))
    });
}

#[test]
fn adapter_config_reader_never_panics_on_mutated_configs() {
    use llama_parity::weights::adapter::AdapterConfig;
    let seeds = files(&root().join("fixtures/lora/golden"), |p| {
        p.file_name().is_some_and(|n| n == "adapter_config.json")
    });
    assert!(seeds.len() >= 4, "the LoRA set's adapter configs");
    let p = Path::new("adapter/adapter_config.json");
    fuzz_half("adapter config", 13, &seeds, |b| {
        std::str::from_utf8(b).is_ok_and(|t| AdapterConfig::parse(t, p).is_ok())
    });
}
