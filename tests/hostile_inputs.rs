//! Hostile inputs of the newer kinds (msprobe dumps, their maps, weights by reference):
//! each is refused with exit 2 and one line naming the file, tensor or field, never a
//! panic, a hang or a silent pass. Each hostile input is made at test time from the
//! committed fixtures; each test names the defect of "Hardening of the new inputs" it
//! pins.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::{copy_tree, rewrite_pickle, root};

/// Runs `parity ARGS` from the repository root, killing it after 60 s (a hang fails
/// the test). Returns (exit code, stdout, stderr).
fn parity(args: &[&str]) -> (Option<i32>, String, String) {
    crate::helpers::parity_in(&root(), args)
}

/// Exit 2 and one error line, `parity: error: …`, holding every one of `what` (other
/// lines only `parity: ` progress).
fn assert_refused(res: &(Option<i32>, String, String), what: &[&str]) {
    let (code, _, err) = res;
    assert_eq!(*code, Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err:?}");
    assert!(err.lines().all(|l| l.starts_with("parity: ")), "a stray line: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    for w in what {
        assert!(lines[0].contains(w), "{w:?} not in {err:?}");
    }
}

/// A copy of `fixtures/msprobe/<sub>` in a temp dir, as `<tmp>/dump`.
fn copy_fixture(sub: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = tmp.path().join("dump");
    copy_tree(&root().join("fixtures/msprobe").join(sub), &dst);
    (tmp, dst)
}

/// The one rank folder of step `n` of a dump.
fn rank_dir(dump: &Path, n: usize) -> PathBuf {
    let step = dump.join(format!("step{n}"));
    std::fs::read_dir(&step).expect("step").next().expect("a rank").expect("entry").path()
}

/// `file` with its first `from` replaced by `to` (which must be there).
fn replace_once(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).expect("read");
    assert!(text.contains(from), "{from:?} not in {}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).expect("write");
}

/// In `file`, after the first `anchor`, the text from `start` through the next `end`
/// replaced by `new`.
fn replace_span(file: &Path, anchor: &str, start: &str, end: &str, new: &str) {
    let t = std::fs::read_to_string(file).expect("read");
    let at = t.find(anchor).expect("anchor");
    let from = at + t[at..].find(start).expect("start");
    let to = from + t[from..].find(end).expect("end") + end.len();
    std::fs::write(file, format!("{}{new}{}", &t[..from], &t[to..])).expect("write");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `parity compare golden/gqa_pad_f32 DUMP` and `parity import msprobe DUMP --out O`,
/// each with `extra`.
fn compare_and_import(
    dump: &Path,
    out: &Path,
    extra: &[&str],
) -> Vec<(Option<i32>, String, String)> {
    [
        vec!["compare", "golden/gqa_pad_f32", s(dump)],
        vec!["import", "msprobe", s(dump), "--out", s(out)],
    ]
    .into_iter()
    .map(|cmd| parity(&cmd.into_iter().chain(extra.iter().copied()).collect::<Vec<_>>()))
    .collect()
}

/// Defect 10: a UTF-8 byte order mark at the start of dump.json made the scan for
/// `NaN`/`Infinity` tokens slice inside a character, and `parity compare`, `parity
/// import` and an msprobe golden panicked. The mark is skipped.
#[test]
fn a_byte_order_mark_in_dump_json_is_skipped_not_a_panic() {
    let (tmp, dump) = copy_fixture("gqa_pad_f32");
    let dj = rank_dir(&dump, 0).join("dump.json");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(&dj).expect("read"));
    std::fs::write(&dj, bytes).expect("write");
    for (code, _, err) in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, _, err) = parity(&["compare", s(&dump), "golden/gqa_pad_f32"]);
    assert!(!err.contains("panicked"), "{err}");
    assert!(matches!(code, Some(0) | Some(2)), "{err}");
}

/// Defect 3: a `null` Max/Min/Mean/Norm of a float tensor in a statistics dump counted
/// as "no difference", and a faulty statistics dump with its statistics nulled passed.
/// msprobe writes null only for integer tensors.
#[test]
fn a_null_statistic_of_a_float_tensor_is_bad_input() {
    for stat in ["Max", "Min", "Mean", "Norm"] {
        let (_tmp, dump) = copy_fixture("stats/gqa_pad_f32__norm_layernorm");
        let dj = rank_dir(&dump, 0).join("dump.json");
        // The first float record is the embedding's output.
        let text = std::fs::read_to_string(&dj).expect("read");
        let at = text.find("\"torch.float32\"").expect("a float record");
        let key = format!("\"{stat}\": ");
        let from = at + text[at..].find(&key).expect("stat") + key.len();
        let end = from + text[from..].find([',', '\n']).expect("end");
        let text = format!("{}null{}", &text[..from], &text[end..]);
        std::fs::write(&dj, text).expect("write");
        let r = parity(&["compare", "golden/gqa_pad_f32", s(&dump)]);
        assert_refused(&r, &[s(&dj), "Module.model.embed_tokens.Embedding.forward.0", stat]);
    }
}

/// Defect 5: a step's dump.json that is a FIFO, a dangling symlink or a directory
/// dropped the step silently (a pos_reset dump then passed, its decode step unseen);
/// in step0, step1 was compared as prefill.
#[test]
fn a_step_whose_dump_json_cannot_be_read_is_refused() {
    type Break = fn(&Path);
    let cases: [(&str, Break); 3] = [
        ("FIFO", |p| {
            assert!(Command::new("mkfifo").arg(p).status().expect("mkfifo").success());
        }),
        ("dangling symlink", |p| {
            std::os::unix::fs::symlink(p.with_file_name("gone.json"), p).expect("symlink")
        }),
        ("directory", |p| std::fs::create_dir(p).expect("mkdir")),
    ];
    for step in [1, 0] {
        for (what, breaker) in &cases {
            let (tmp, dump) = copy_fixture("gqa_pad_f32__rope_pos_reset");
            let dj = rank_dir(&dump, step).join("dump.json");
            std::fs::remove_file(&dj).expect("rm");
            breaker(&dj);
            for r in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
                assert_eq!(r.0, Some(2), "{what} in step{step}: {r:?}");
                assert_refused(&r, &[&format!("step{step}"), "dump.json"]);
            }
        }
    }
}

/// Defect 12: a one-rank statistics dump read through a map with `"ranks":
/// "concat(9)"` indexed past the recorded shape and panicked.
#[test]
fn a_concat_axis_past_the_shape_is_refused() {
    let (tmp, dump) = copy_fixture("stats/gqa_pad_f32");
    let map = tmp.path().join("map.json");
    let hf = std::fs::read_to_string(root().join("harness/dump/src/msprobe/maps/hf.json"))
        .expect("hf map");
    let from = r#""module": "model.embed_tokens", "take": "output.0""#;
    assert!(hf.contains(from));
    let to = format!(r#"{from}, "ranks": "concat(9)""#);
    std::fs::write(&map, hf.replacen(from, &to, 1)).expect("write");
    let r = parity(&["compare", "golden/gqa_pad_f32", s(&dump), "--msprobe-map", s(&map)]);
    assert_refused(&r, &["axis 9", "Module.model.embed_tokens.Embedding.forward.0"]);
    let (tmp2, dump) = copy_fixture("gqa_pad_f32");
    let out = tmp2.path().join("o");
    for r in compare_and_import(&dump, &out, &["--msprobe-map", s(&map)]) {
        assert_refused(&r, &["axis 9"]);
    }
}

/// Defect 9b: malformed records (`output: null`, an entry that is a string, `task:
/// 123`) counted as missing sites instead of bad input.
#[test]
fn malformed_msprobe_records_are_bad_input_naming_the_record() {
    type Break = fn(&Path);
    let cases: [(&str, Break, &str); 4] = [
        (
            "output null",
            |dj| {
                replace_span(
                    dj,
                    "\"Module.lm_head.Linear.forward.0\"",
                    "\"output\": [",
                    "\n   ]",
                    "\"output\": null",
                )
            },
            "Module.lm_head.Linear.forward.0",
        ),
        (
            "string record",
            |dj| {
                replace_span(
                    dj,
                    "\"Module.lm_head.Linear.forward.0\"",
                    "\"output\": [",
                    "\n   ]",
                    "\"output\": [\"oops\"]",
                )
            },
            "Module.lm_head.Linear.forward.0",
        ),
        (
            "string entry",
            |dj| {
                replace_span(
                    dj,
                    "",
                    "\"Module.lm_head.Linear.forward.0\": {",
                    "\n  }",
                    "\"Module.lm_head.Linear.forward.0\": \"oops\"",
                )
            },
            "Module.lm_head.Linear.forward.0",
        ),
        ("task 123", |dj| replace_once(dj, r#""task": "tensor""#, r#""task": 123"#), "task"),
    ];
    for (what, breaker, names) in &cases {
        let (tmp, dump) = copy_fixture("gqa_pad_f32");
        let dj = rank_dir(&dump, 0).join("dump.json");
        breaker(&dj);
        for r in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
            assert!(r.0 == Some(2), "{what}: {r:?}");
            assert_refused(&r, &[s(&dj), names]);
        }
    }
}

/// Defect 6: a `.pt` whose shape's element count wraps to 0 (`[2^30, 2^30, 16]`, with
/// dump.json agreeing) was read as an empty tensor and `parity import msprobe` exited 0.
#[test]
fn a_pt_shape_whose_element_count_overflows_is_refused() {
    let (tmp, dump) = copy_fixture("gqa_pad_f32");
    let rank = rank_dir(&dump, 0);
    let entry = "Module.model.layers.0.input_layernorm.LlamaRMSNorm.forward.0";
    let pt = rank.join("dump_tensor_data").join(format!("{entry}.output.0.pt"));
    // size (2, 9, 64) stride (576, 64, 1) to size (2^30, 2^30, 16) stride (0, 0, 1).
    let from: &[u8] = b"K\x02K\tK@\x87q\x06M@\x02K@K\x01\x87";
    let to: &[u8] = b"J\x00\x00\x00\x40J\x00\x00\x00\x40K\x10\x87q\x06K\x00K\x00K\x01\x87";
    rewrite_pickle(&pt, |pkl| {
        let at = pkl.windows(from.len()).position(|w| w == from).expect("the shape in the pickle");
        let mut out = pkl.to_vec();
        out.splice(at..at + from.len(), to.iter().copied());
        out
    });
    let dj = rank.join("dump.json");
    let t = std::fs::read_to_string(&dj).expect("read");
    let at = t.find(&format!("\"{entry}\"")).expect("entry");
    let o = at + t[at..].find("\"output\"").expect("output");
    let from = o + t[o..].find("\"shape\": [").expect("shape");
    let end = from + t[from..].find(']').expect("]") + 1;
    let t = format!("{}\"shape\": [1073741824, 1073741824, 16]{}", &t[..from], &t[end..]);
    std::fs::write(&dj, t).expect("write");
    for r in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
        assert_refused(&r, &[s(&pt), "overflows"]);
    }
}

/// A copy of `fixtures/checkpoints/tiny_llama3` and its golden in a temp dir (`g` and
/// `tiny_llama3`, so the golden's `../tiny_llama3` still finds it), the golden's
/// `weights.sha256` edited by `edit`.
fn checkpoint_and_golden(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = root().join("fixtures/checkpoints");
    copy_tree(&src.join("tiny_llama3"), &tmp.path().join("tiny_llama3"));
    copy_tree(&src.join("tiny_llama3_golden"), &tmp.path().join("g"));
    let m = tmp.path().join("g/manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).expect("read")).expect("json");
    edit(&mut v["weights"]["sha256"]);
    std::fs::write(&m, v.to_string()).expect("write");
    tmp
}

/// Defect 18: names in `weights.sha256` were not checked against the checkpoint: a
/// name "/dev/zero" or a FIFO hung the run, and "/etc/hostname" was hashed and its
/// digest printed.
#[test]
fn weights_sha256_names_only_regular_files_inside_the_checkpoint() {
    let zeros = serde_json::Value::from("00".repeat(32));
    for name in ["/dev/zero", "/etc/hostname", "../g/manifest.json", ""] {
        let tmp = checkpoint_and_golden(|h| h[name] = zeros.clone());
        let g = tmp.path().join("g");
        let r = parity(&["run", s(&g), "--impl", "reference"]);
        assert_refused(&r, &["weights.sha256", &format!("{name:?}")]);
    }
    let tmp = checkpoint_and_golden(|h| h["fifo"] = zeros.clone());
    let fifo = tmp.path().join("tiny_llama3/fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let r = parity(&["run", s(&tmp.path().join("g")), "--impl", "reference"]);
    assert_refused(&r, &["fifo", "FIFO"]);
}

/// Defect 22: the 64 MiB JSON cap was not applied to msprobe's dump.json and
/// construct.json, the checkpoint's index, `--msprobe-map`; a FIFO as construct.json
/// was taken for an absent one.
#[test]
fn the_json_cap_and_regular_file_rule_cover_the_new_json_inputs() {
    let cap = 64u64 << 20;
    let grow = |p: &Path| {
        let f = std::fs::OpenOptions::new().write(true).open(p).expect("open");
        f.set_len(cap + 1).expect("set_len");
    };
    for file in ["dump.json", "construct.json"] {
        let (tmp, dump) = copy_fixture("gqa_pad_f32");
        let p = rank_dir(&dump, 0).join(file);
        grow(&p);
        for r in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
            assert_refused(&r, &[s(&p), "limit"]);
        }
    }
    let (tmp, dump) = copy_fixture("gqa_pad_f32");
    let p = rank_dir(&dump, 0).join("construct.json");
    std::fs::remove_file(&p).expect("rm");
    assert!(Command::new("mkfifo").arg(&p).status().expect("mkfifo").success());
    for r in compare_and_import(&dump, &tmp.path().join("o"), &[]) {
        assert_refused(&r, &[s(&p), "FIFO"]);
    }
    let (tmp, dump) = copy_fixture("gqa_pad_f32");
    let map = tmp.path().join("map.json");
    std::fs::copy(root().join("harness/dump/src/msprobe/maps/hf.json"), &map).expect("copy");
    grow(&map);
    for r in compare_and_import(&dump, &tmp.path().join("o"), &["--msprobe-map", s(&map)]) {
        assert_refused(&r, &[s(&map), "limit"]);
    }
    let tmp = checkpoint_and_golden(|h| {
        h.as_object_mut().expect("object").remove("model.safetensors.index.json");
    });
    let index = tmp.path().join("tiny_llama3/model.safetensors.index.json");
    grow(&index);
    let r = parity(&["run", s(&tmp.path().join("g")), "--impl", "reference"]);
    assert_refused(&r, &["model.safetensors.index.json", "limit"]);
}

/// Defect 24: a manifest beside an msprobe dump whose scenario differs from the
/// golden's was reported with an empty path (`parity: error: : scenario.input_ids
/// differs…`), and a dump with a step but no mapped tensors as `<in-memory dump>`.
#[test]
fn messages_about_an_msprobe_dump_name_its_files() {
    let (_tmp, dump) = copy_fixture("gqa_pad_f32");
    let m = dump.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).expect("read")).expect("json");
    let id = v["scenario"]["input_ids"][0][8].as_i64().expect("a token id");
    v["scenario"]["input_ids"][0][8] = serde_json::Value::from(if id == 5 { 6 } else { 5 });
    std::fs::write(&m, v.to_string()).expect("write");
    let r = parity(&["compare", "golden/gqa_pad_f32", s(&dump)]);
    assert_refused(&r, &[s(&m), "input_ids"]);
    let (tmp, dump) = copy_fixture("gqa_pad_f32");
    let map = tmp.path().join("map.json");
    let hf = std::fs::read_to_string(root().join("harness/dump/src/msprobe/maps/hf.json"))
        .expect("hf map");
    // Every rule reads an entry no forward has: the steps are found, their tensors not.
    let nowhere = hf
        .replace("\"take\": \"output.", "\"take\": \"output.7")
        .replace("\"take\": \"input.", "\"take\": \"input.7")
        .replace("\"take\": \"kwargs.", "\"take\": \"kwargs.x");
    std::fs::write(&map, nowhere).expect("write");
    let r = parity(&["compare", "golden/gqa_pad_f32", s(&dump), "--msprobe-map", s(&map)]);
    assert_refused(&r, &[s(&dump), "has no tensors"]);
    assert!(!r.2.contains("<in-memory dump>"), "{r:?}");
}

/// Defects 19 and 22: a `--baseline` that is a FIFO used to hang, and one of 418 MB was
/// read whole; it is now read as every other JSON input: a regular file under the
/// 64 MiB cap, else exit 2 naming it.
#[test]
fn a_baseline_that_is_a_fifo_or_over_the_json_cap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo.json");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let big = tmp.path().join("big.json");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    for (file, says) in [(&fifo, "a FIFO"), (&big, "limit")] {
        let res = parity(&[
            "compare",
            "golden/gqa_pad_f32",
            "golden/gqa_pad_bf16",
            "--no-floor",
            "--baseline",
            s(file),
        ]);
        assert_refused(&res, &[s(file), says]);
    }
}

/// Defect 2, its second half: a shard changed in place, with a digest-cache entry
/// planted for it (named as the cache names an entry: the file's canonical path, size,
/// times, inode and device), passes the digest check; its weights then no longer belong
/// to the golden's activations, so the golden is not reproduced and the run exits 2.
#[test]
fn a_planted_digest_cache_entry_for_a_changed_shard_never_passes() {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let tmp = checkpoint_and_golden(|_| {});
    let name = "model-00002-of-00004.safetensors";
    let shard = tmp.path().join("tiny_llama3").join(name);
    // Every bfloat16 weight of the shard times 1.5, in place: same size, same header.
    let mut b = std::fs::read(&shard).expect("read");
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
    for c in b[8 + n..].chunks_exact_mut(2) {
        let x = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) * 1.5;
        c.copy_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
    }
    std::fs::write(&shard, &b).expect("write");
    let g = tmp.path().join("g");
    let hashes = tmp.path().join("sha256");
    let floors = tmp.path().join("floors");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_parity"))
            .args(["run", s(&g), "--impl", "reference"])
            .env("PARITY_HASH_CACHE", &hashes)
            .env("PARITY_FLOOR_CACHE", &floors)
            .output()
            .expect("run parity");
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (out.status.code(), text(out.stdout), text(out.stderr))
    };
    // Without an entry the digest check names the shard.
    assert_refused(&run(), &[name, "sha256"]);
    // The planted entry: the manifest's digest under the changed file's key.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g.join("manifest.json")).expect("read"))
            .expect("json");
    let want = manifest["weights"]["sha256"][name].as_str().expect("digest");
    let meta = std::fs::metadata(&shard).expect("stat");
    let mut h = Sha256::new();
    h.update(std::fs::canonicalize(&shard).expect("canonical").as_os_str().as_encoded_bytes());
    for v in [meta.size() as i64, meta.mtime(), meta.mtime_nsec(), meta.ctime()] {
        h.update(v.to_le_bytes());
    }
    for v in [meta.ctime_nsec() as u64, meta.ino(), meta.dev()] {
        h.update(v.to_le_bytes());
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert!(hashes.join(&key).is_file(), "the entry the first run stored under this key");
    std::fs::write(hashes.join(&key), want).expect("plant");
    // The digest check is fooled; the reproduction check is not.
    let r = run();
    assert_refused(&r, &["not reproduced"]);
    assert!(!r.2.contains("sha256"), "the planted digest was not taken: {}", r.2);
}
