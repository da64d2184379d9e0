//! Reading `.safetensors` files: memory-mapped, header validated field by field so that
//! a malformed file gives a message naming the file and the fault, then tensors read
//! one at a time as views into the map. Writing goes through the `safetensors` crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use contract::error::{escape_controls, Error, Result};

use super::dtype::DType;
use super::tensor::{checked_numel, Tensor};

/// The largest safetensors header read: 100 MB, as the `safetensors` crate allows.
const HEADER_CAP: usize = 100_000_000;

/// The header's top-level keys in order, noting the first one listed twice.
struct Entries {
    duplicate: Option<String>,
}

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut duplicate = None;
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    if !seen.insert(k.clone()) && duplicate.is_none() {
                        duplicate = Some(k);
                    }
                }
                Ok(Entries { duplicate })
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An open, validated safetensors file.
#[derive(Clone)]
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header and every tensor's extent.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bad = |what: String| Error::format(path, what);
        let file = super::read::open_regular(path)?;
        // Every access is bounds-checked against the validated header; a file cut short
        // while mapped ends the run naming it (`mapped`).
        let map = super::mapped::map(&file, path)?;
        let len = map.len();
        if len < 8 {
            return Err(bad(format!(
                "truncated safetensors: {len} bytes, the 8-byte header length is incomplete"
            )));
        }
        let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        if n > (len - 8) as u64 {
            return Err(bad(format!(
                "header length {n} runs past the end of the file ({len} bytes)"
            )));
        }
        let n = n as usize;
        if n > HEADER_CAP {
            return Err(bad(format!(
                "header length {n} is larger than the {HEADER_CAP}-byte limit"
            )));
        }
        let header: Value = serde_json::from_slice(&map[8..8 + n])
            .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("safetensors header is not a JSON object".into()))?;
        // serde_json keeps the last of two equal keys; the header is read again as
        // a list of entries to refuse them.
        let listed: Entries = serde_json::from_slice(&map[8..8 + n])
            .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
        if let Some(k) = listed.duplicate {
            return Err(bad(format!(
                "tensor `{}` is listed twice in the header",
                escape_controls(&k)
            )));
        }
        let data_len = len - 8 - n;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (key, v) in obj {
            if key == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        metadata.insert(
                            k.clone(),
                            v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
                        );
                    }
                }
                continue;
            }
            let t = |what: &str| bad(format!("tensor `{}`: {what}", escape_controls(key)));
            let dtype_s =
                v.get("dtype").and_then(Value::as_str).ok_or_else(|| t("no string `dtype`"))?;
            let dtype = DType::from_safetensors_name(dtype_s).ok_or_else(|| {
                t(&format!(
                    "unknown dtype {dtype_s:?} (accepted: F64 F32 F16 BF16 I64 I32 U8 BOOL)"
                ))
            })?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
                })
                .ok_or_else(|| t("`shape` is not an array of non-negative integers"))?;
            let offs: Vec<usize> = v
                .get("data_offsets")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
                })
                .filter(|o: &Vec<usize>| o.len() == 2)
                .ok_or_else(|| t("`data_offsets` is not [begin, end]"))?;
            let (start, end) = (offs[0], offs[1]);
            let numel = checked_numel(&shape).ok_or_else(|| {
                t(&format!("shape {shape:?} has an element count that overflows"))
            })?;
            let bytes = numel
                .checked_mul(dtype.size())
                .ok_or_else(|| t(&format!("shape {shape:?} has a byte size that overflows")))?;
            if end < start {
                return Err(t(&format!("data_offsets [{start}, {end}] end before they begin")));
            }
            if end - start != bytes {
                return Err(t(&format!(
                    "shape {shape:?} x {dtype} needs {bytes} bytes but data_offsets [{start}, {end}] hold {}",
                    end - start
                )));
            }
            if end > data_len {
                return Err(t(&format!(
                    "data_offsets [{start}, {end}] run past the end of the data ({data_len} bytes): file truncated?"
                )));
            }
            entries.insert(
                key.clone(),
                Entry { dtype, shape, start: 8 + n + start, end: 8 + n + end },
            );
        }
        let mut extents: Vec<(&String, &Entry)> =
            entries.iter().filter(|(_, e)| e.end > e.start).collect();
        extents.sort_by_key(|(_, e)| (e.start, e.end));
        for w in extents.windows(2) {
            let ((a, ea), (b, eb)) = (w[0], w[1]);
            if eb.start < ea.end {
                return Err(bad(format!(
                    "tensors `{}` and `{}` overlap in the data (data_offsets [{}, {}] and [{}, {}])",
                    escape_controls(a),
                    escape_controls(b),
                    ea.start - 8 - n,
                    ea.end - 8 - n,
                    eb.start - 8 - n,
                    eb.end - 8 - n
                )));
            }
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), map: Arc::new(map), entries, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The tensor `key` as a view into the map, or `None` if the file has no such key.
    pub fn get(&self, key: &str) -> Option<Tensor> {
        let e = self.entries.get(key)?;
        Some(Tensor::mapped(e.dtype, e.shape.clone(), self.map.clone(), e.start..e.end))
    }

    /// Like [`get`](Self::get) but a missing key is an error naming the file.
    pub fn require(&self, key: &str) -> Result<Tensor> {
        self.get(key)
            .ok_or_else(|| Error::MissingTensor { file: self.path.clone(), key: key.to_string() })
    }
}

/// Writes `tensors` to `path` as safetensors (keys sorted, so the bytes are stable).
pub fn write(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    super::write_atomic(path, &serialize(path, tensors, metadata)?)
}

/// The safetensors bytes of `tensors` (keys sorted); errors name `path`, where they go.
pub fn serialize(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            let dt = match t.dtype() {
                DType::F64 => safetensors::Dtype::F64,
                DType::F32 => safetensors::Dtype::F32,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::I64 => safetensors::Dtype::I64,
                DType::I32 => safetensors::Dtype::I32,
                DType::U8 => safetensors::Dtype::U8,
                DType::Bool => safetensors::Dtype::BOOL,
            };
            safetensors::tensor::TensorView::new(dt, t.shape().to_vec(), t.bytes())
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::format(path, format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, &metadata).map_err(|e| Error::format(path, e.to_string()))
}
