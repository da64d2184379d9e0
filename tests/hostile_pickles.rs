//! Hostile `.pt` files in an msprobe dump (defects 11, 13, 14 and 15 of "Hardening of the
//! new inputs"): the pickle inside each is written here as bytes, into a copy of a
//! committed fixture, and `parity import msprobe` must end with exit 2 and one line
//! naming the `.pt` file. With candle's pickle reader these panicked (a short rebuild
//! tuple), overflowed the stack (nesting 10^6 deep), ran 20-25 s to 8 GB (a memo bomb)
//! or asked for 16 GiB at once (a stride-0 view); the bounded reader refuses each.

use std::path::{Path, PathBuf};

use crate::helpers::{copy_tree, parity_in, rewrite_pickle, root};

const ENTRY: &str = "Module.model.layers.0.input_layernorm.LlamaRMSNorm.forward.0";

/// A copy of `fixtures/msprobe/gqa_pad_f32` as `<tmp>/dump`, and the `.pt` of ENTRY's
/// output in it.
fn dump_copy() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dump = tmp.path().join("dump");
    copy_tree(&root().join("fixtures/msprobe/gqa_pad_f32"), &dump);
    let step = dump.join("step0");
    let rank = std::fs::read_dir(&step).expect("step").next().expect("rank").expect("e").path();
    let pt = rank.join("dump_tensor_data").join(format!("{ENTRY}.output.0.pt"));
    assert!(pt.is_file(), "{}", pt.display());
    (tmp, dump, pt)
}

/// `parity import msprobe DUMP --out <tmp>/o` must exit 2 with one error line naming
/// `pt` and holding `what`, within the helpers' 60 s.
fn assert_import_refuses(tmp: &Path, dump: &Path, pt: &Path, what: &str) {
    let out = tmp.join("o");
    let args = ["import", "msprobe", dump.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let (code, _, err) = parity_in(&root(), &args);
    assert_eq!(code, Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(lines[0].contains(pt.to_str().unwrap()), "{err}");
    assert!(lines[0].contains(what), "{what:?} not in {err}");
}

/// The protocol-2 header and `_rebuild_tensor_v2` global every saved tensor starts with.
const HEAD: &[u8] = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00";

/// Defect 11: a rebuild call with two arguments instead of six (candle indexed past
/// the tuple and panicked).
#[test]
fn a_short_rebuild_tuple_is_refused_not_a_panic() {
    let (tmp, dump, pt) = dump_copy();
    rewrite_pickle(&pt, |_| [HEAD, b"K\x00K\x01\x86R."].concat());
    assert_import_refuses(tmp.path(), &dump, &pt, "_rebuild_tensor_v2 takes");
}

/// Defect 13: a pickle nesting one-tuples 10^6 deep (candle overflowed the stack).
#[test]
fn a_pickle_nested_a_million_deep_is_refused() {
    let (tmp, dump, pt) = dump_copy();
    rewrite_pickle(&pt, |_| {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        p
    });
    assert_import_refuses(tmp.path(), &dump, &pt, "nested more than");
}

/// Defect 14: a memo bomb under 1 kB: each round copies the last object out of the memo
/// twice, pairs the copies and memoises the pair, doubling it (candle cloned each copy
/// and ran to 8 GB).
#[test]
fn a_memo_bomb_is_refused_at_the_object_budget() {
    let (tmp, dump, pt) = dump_copy();
    rewrite_pickle(&pt, |_| {
        let mut p = b"\x80\x02)q\x00".to_vec();
        for _ in 0..100 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        p
    });
    assert_import_refuses(tmp.path(), &dump, &pt, "objects");
}

/// Defect 15: the tensor's view turned into 65536 x 65536 with strides 0 over its small
/// storage, 16 GiB of repeats that the gather allocated at once; dump.json agrees with
/// the shape, so only the view itself can be refused.
#[test]
fn a_stride_zero_view_larger_than_its_storage_is_refused_before_allocating() {
    let (tmp, dump, pt) = dump_copy();
    // size (2, 9, 64) stride (576, 64, 1) to size (65536, 65536) stride (0, 0).
    let from: &[u8] = b"K\x02K\tK@\x87q\x06M@\x02K@K\x01\x87";
    let to: &[u8] = b"J\x00\x00\x01\x00J\x00\x00\x01\x00\x86q\x06K\x00K\x00\x86";
    rewrite_pickle(&pt, |p| {
        let at = p.windows(from.len()).position(|w| w == from).expect("the view in the pickle");
        [&p[..at], to, &p[at + from.len()..]].concat()
    });
    let rank = pt.parent().unwrap().parent().unwrap();
    let dj = rank.join("dump.json");
    let t = std::fs::read_to_string(&dj).expect("read");
    let at = t.find(&format!("\"{ENTRY}\"")).expect("entry");
    let o = at + t[at..].find("\"output\"").expect("output");
    let from = o + t[o..].find("\"shape\": [").expect("shape");
    let end = from + t[from..].find(']').expect("]") + 1;
    std::fs::write(&dj, format!("{}\"shape\": [65536, 65536]{}", &t[..from], &t[end..]))
        .expect("write");
    assert_import_refuses(tmp.path(), &dump, &pt, "repeats elements");
}

/// A global outside a saved tensor's (`os.system`) is refused by name, and nothing is
/// called.
#[test]
fn a_pickle_naming_another_global_is_refused_by_name() {
    let (tmp, dump, pt) = dump_copy();
    rewrite_pickle(&pt, |_| b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.".to_vec());
    assert_import_refuses(tmp.path(), &dump, &pt, "os.system");
}
