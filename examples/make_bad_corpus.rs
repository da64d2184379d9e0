//! Writes the bad-input corpus under `fixtures/bad/`: one dump directory per way a
//! dump can be malformed. Each case is a small valid dump with exactly one fault.
//! The expected message of each case is pinned in `tests/bad_inputs.rs`.
//!
//! Run: `cargo run --example make_bad_corpus` (rewrites fixtures/bad/ in place).

use std::fs;
use std::path::Path;

const MANIFEST: &str = r#"{
  "format": "llama-parity/dump@1",
  "producer": {"framework": "bad-corpus", "version": "1"},
  "model": {"vocab_size": 16, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "hidden_act": "silu"},
  "dtype": "float32",
  "scenario": {"name": "bad", "input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]], "decode_ids": [[4]]},
  "steps": ["prefill", "decode.0"]
}
"#;

/// A safetensors header with the given JSON body, padded to 8 bytes as the format does.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Two tensors, one per step: `prefill/model.embed_tokens` [1,3,4] and `decode.0/...` [1,1,4].
fn good_activations() -> Vec<u8> {
    let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    let b: Vec<f32> = (0..4).map(|i| i as f32 - 1.5).collect();
    let header = r#"{"decode.0/model.embed_tokens":{"dtype":"F32","shape":[1,1,4],"data_offsets":[0,16]},"prefill/model.embed_tokens":{"dtype":"F32","shape":[1,3,4],"data_offsets":[16,64]}}"#;
    let mut data = f32s(&b);
    data.extend(f32s(&a));
    safetensors(header, &data)
}

/// A version-1 .npy file of little-endian f32 with the given magic and shape text.
fn npy(magic: &[u8; 6], shape: &str, values: &[f32]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&[1, 0]);
    let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend(f32s(values));
    out
}

fn case(root: &Path, name: &str, manifest: &str, activations: Option<Vec<u8>>) {
    let dir = root.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create case dir");
    fs::write(dir.join("manifest.json"), manifest).expect("write manifest");
    if let Some(a) = activations {
        fs::write(dir.join("activations.safetensors"), a).expect("write activations");
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad");
    fs::create_dir_all(&root).expect("create fixtures/bad");
    let good = good_activations();

    let mut truncated = good.clone();
    truncated.truncate(good.len() - 10);
    case(&root, "truncated_safetensors", MANIFEST, Some(truncated));

    let mut past_end = good.clone();
    past_end[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    case(&root, "header_past_end", MANIFEST, Some(past_end));

    case(
        &root,
        "header_not_json",
        MANIFEST,
        Some(safetensors("{\"prefill/model.embed_tokens\": [oops", &[0; 16])),
    );

    case(
        &root,
        "unknown_dtype",
        MANIFEST,
        Some(safetensors(
            r#"{"prefill/model.embed_tokens":{"dtype":"Q4_K","shape":[1,3,4],"data_offsets":[0,48]}}"#,
            &[0; 48],
        )),
    );

    case(
        &root,
        "size_mismatch",
        MANIFEST,
        Some(safetensors(
            r#"{"prefill/model.embed_tokens":{"dtype":"F32","shape":[1,3,4],"data_offsets":[0,40]}}"#,
            &[0; 48],
        )),
    );

    case(
        &root,
        "shape_overflow",
        MANIFEST,
        Some(safetensors(
            r#"{"prefill/model.embed_tokens":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}}"#,
            &[0; 16],
        )),
    );

    // An .npy tree whose prefill tensor has a bad magic; its decode tensor is valid.
    npy_tree(&root.join("npy_bad_magic"), &npy(b"\x93NUMPX", "(1, 3, 4)", &[0.5; 12]));

    let no_steps = MANIFEST.replace(",\n  \"steps\": [\"prefill\", \"decode.0\"]", "");
    case(&root, "manifest_without_steps", &no_steps, Some(good.clone()));

    let extra_step = MANIFEST
        .replace("[\"prefill\", \"decode.0\"]", "[\"prefill\", \"decode.0\", \"decode.1\"]")
        .replace("\"decode_ids\": [[4]]", "\"decode_ids\": [[4, 5]]");
    case(&root, "step_without_tensors", &extra_step, Some(good.clone()));

    case(
        &root,
        "manifest_not_json",
        "{\"format\": \"llama-parity/dump@1\",\n  \"producer\": {,\n}\n",
        Some(good.clone()),
    );

    // Issue 12, defect 10: a header listing one tensor twice (JSON keeps the last).
    let a = f32s(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
    let twice = r#"{"decode.0/model.embed_tokens":{"dtype":"F32","shape":[1,1,4],"data_offsets":[0,16]},"prefill/model.embed_tokens":{"dtype":"F32","shape":[1,3,4],"data_offsets":[16,64]},"prefill/model.embed_tokens":{"dtype":"F32","shape":[1,1,4],"data_offsets":[0,16]}}"#;
    let mut data = f32s(&[0.0; 4]);
    data.extend(&a);
    case(&root, "duplicate_key", MANIFEST, Some(safetensors(twice, &data)));

    // Two tensors sharing bytes.
    let overlap = r#"{"decode.0/model.embed_tokens":{"dtype":"F32","shape":[1,1,4],"data_offsets":[32,48]},"prefill/model.embed_tokens":{"dtype":"F32","shape":[1,3,4],"data_offsets":[0,48]}}"#;
    case(&root, "overlapping_offsets", MANIFEST, Some(safetensors(overlap, &a)));

    // An element count of 0 whose other dimensions overflow.
    case(
        &root,
        "shape_zero_overflow",
        MANIFEST,
        Some(safetensors(
            r#"{"prefill/model.embed_tokens":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}}"#,
            &[],
        )),
    );

    // A key whose step holds a line break and a terminal escape.
    case(
        &root,
        "control_chars_in_key",
        MANIFEST,
        Some(safetensors(
            "{\"pre\\u001b[2Jfill\\nPASS all sites/model.embed_tokens\":{\"dtype\":\"F32\",\"shape\":[1,1,4],\"data_offsets\":[0,16]}}",
            &[0; 16],
        )),
    );

    let dup_steps = MANIFEST
        .replace("[\"prefill\", \"decode.0\"]", "[\"prefill\", \"decode.0\", \"decode.0\"]");
    case(&root, "duplicate_steps", &dup_steps, Some(good.clone()));

    let no_token = MANIFEST
        .replace("[\"prefill\", \"decode.0\"]", "[\"prefill\", \"decode.0\", \"decode.5\"]");
    case(&root, "decode_step_without_token", &no_token, Some(good.clone()));

    let eps = MANIFEST.replace("\"rms_norm_eps\": 1e-6", "\"rms_norm_eps\": -1e-6");
    case(&root, "negative_eps", &eps, Some(good.clone()));

    let heads = MANIFEST.replace(
        "\"num_attention_heads\": 2, \"num_key_value_heads\": 1",
        "\"num_attention_heads\": 2305843009213693952, \"num_key_value_heads\": 1",
    );
    case(&root, "absurd_heads", &heads, Some(good.clone()));

    // An .npy whose header announces far more data than the file holds: refused from
    // the header, before any data is read.
    npy_tree(&root.join("npy_short_data"), &npy(b"\x93NUMPY", "(1000000, 1000, 4)", &[0.5; 12]));

    // manifest.json that is a directory.
    let dir = root.join("manifest_is_a_directory");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("manifest.json")).expect("mkdir");
    fs::write(dir.join("manifest.json/.keep"), "").expect("write");
    fs::write(dir.join("activations.safetensors"), &good).expect("write");

    case(&root, "valid", MANIFEST, Some(good));
    println!("wrote {}", root.display());
}

/// An `.npy` tree at `dir` whose prefill `model.embed_tokens` is `prefill` and whose
/// decode one is valid.
fn npy_tree(dir: &Path, prefill: &[u8]) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("activations/prefill")).expect("mkdir");
    fs::create_dir_all(dir.join("activations/decode.0")).expect("mkdir");
    fs::write(dir.join("manifest.json"), MANIFEST).expect("write");
    fs::write(dir.join("activations/prefill/model.embed_tokens.npy"), prefill).expect("write");
    fs::write(
        dir.join("activations/decode.0/model.embed_tokens.npy"),
        npy(b"\x93NUMPY", "(1, 1, 4)", &[0.5; 4]),
    )
    .expect("write");
}
