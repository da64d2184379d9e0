//! A reader for MindSpore checkpoints (`.ckpt`, as `mindspore.save_checkpoint` writes
//! them): one protobuf message, no header, no checksum (see
//! `fixtures/ports/mindspore/README.md`). The schema, proto2:
//!
//! ```text
//! message Checkpoint  { repeated Value value = 1; }
//! message Value       { required string tag = 1; oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
//! message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }
//! ```
//!
//! The decoder is written by hand (varints, length-delimited fields, unknown fields
//! skipped by wire type). Every malformed input is an [`Error::Format`] naming the file
//! and the byte offset; nothing here panics on file content. Tensors are views into a
//! read-only map of the file.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use contract::error::{Error, Result};
use dump::{DType, Tensor};

/// An open, validated MindSpore checkpoint: its tensors in the order they were saved.
pub struct Checkpoint {
    path: PathBuf,
    entries: Vec<(String, Tensor)>,
    /// Position of each name in `entries`.
    index: std::collections::HashMap<String, usize>,
}

impl Checkpoint {
    /// Maps `path` and decodes every entry, checking each tensor's byte length.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let file = dump::read::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::format(
                path,
                "empty file: a MindSpore checkpoint holds at least one tensor",
            ));
        }
        // Every access is bounds-checked by the decoder below; a file cut short while
        // mapped ends the run naming it (`dump::mapped`).
        let map = Arc::new(dump::mapped::map(&file, path)?);
        let entries = decode(&map)
            .map_err(|m| Error::format(path, m.to_string()))?
            .into_iter()
            .map(|e| (e.tag, Tensor::mapped(e.dtype, e.dims, Arc::clone(&map), e.content)))
            .collect();
        Ok(Checkpoint::new(path, entries))
    }

    /// Decodes checkpoint bytes held in memory; `path` only labels errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
        let entries = decode(bytes)
            .map_err(|m| Error::format(path, m.to_string()))?
            .into_iter()
            .map(|e| (e.tag, Tensor::owned(e.dtype, e.dims, bytes[e.content].to_vec())))
            .collect();
        Ok(Checkpoint::new(path, entries))
    }

    fn new(path: &Path, entries: Vec<(String, Tensor)>) -> Checkpoint {
        let index = entries.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        Checkpoint { path: path.to_path_buf(), entries, index }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parameter names in the order they were saved.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Every (name, tensor), in the order they were saved.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }

    /// The tensor called `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The `tensor_type` strings MindSpore writes, and the dtype each stands for.
pub fn dtype_from_tensor_type(name: &str) -> Option<DType> {
    Some(match name {
        "Float32" => DType::F32,
        "Float16" => DType::F16,
        "BFloat16" => DType::BF16,
        "Float64" => DType::F64,
        "Int32" => DType::I32,
        "Int64" => DType::I64,
        "UInt8" => DType::U8,
        "Bool" => DType::Bool,
        _ => return None,
    })
}

/// A decoding failure: the byte offset and what is wrong there.
#[derive(Debug)]
struct Malformed {
    at: usize,
    what: String,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = contract::error::escape_controls(&self.what);
        write!(f, "malformed MindSpore checkpoint at byte {}: {what}", self.at)
    }
}

type Decoded<T> = std::result::Result<T, Malformed>;

fn bad<T>(at: usize, what: impl Into<String>) -> Decoded<T> {
    Err(Malformed { at, what: what.into() })
}

/// One decoded entry; `content` is a byte range of the whole buffer.
struct Entry {
    tag: String,
    dtype: DType,
    dims: Vec<usize>,
    content: Range<usize>,
}

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

/// A cursor over `buf[pos..end]`; offsets are absolute in `buf`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    fn varint(&mut self, what: &str) -> Decoded<u64> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            if self.pos >= self.end {
                return bad(start, format!("truncated varint ({what})"));
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            if i == 9 && b > 1 {
                return bad(start, format!("varint ({what}) overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bad(start, format!("varint ({what}) longer than 10 bytes"))
    }

    /// A field key: (field number, wire type), and the offset it started at.
    fn key(&mut self) -> Decoded<(u64, u8, usize)> {
        let at = self.pos;
        let k = self.varint("field key")?;
        Ok((k >> 3, (k & 7) as u8, at))
    }

    /// The byte range of a length-delimited field whose length varint starts here.
    fn len_delimited(&mut self, what: &str) -> Decoded<Range<usize>> {
        let at = self.pos;
        let n = self.varint(what)?;
        let left = (self.end - self.pos) as u64;
        if n > left {
            return bad(
                at,
                format!("{what}: length {n} runs past the end of its message ({left} bytes left)"),
            );
        }
        let r = self.pos..self.pos + n as usize;
        self.pos = r.end;
        Ok(r)
    }

    fn sub(&self, r: Range<usize>) -> Reader<'a> {
        Reader { buf: self.buf, pos: r.start, end: r.end }
    }

    /// Skips a field of an unknown number by its wire type.
    fn skip(&mut self, field: u64, wire: u8, at: usize) -> Decoded<()> {
        let fixed = |r: &mut Self, n: usize| {
            if r.end - r.pos < n {
                return bad(at, format!("field {field}: truncated {}-byte value", n));
            }
            r.pos += n;
            Ok(())
        };
        match wire {
            WIRE_VARINT => self.varint(&format!("field {field}")).map(|_| ()),
            WIRE_I64 => fixed(self, 8),
            WIRE_LEN => self.len_delimited(&format!("field {field}")).map(|_| ()),
            WIRE_I32 => fixed(self, 4),
            3 | 4 => bad(at, format!("field {field}: group wire type {wire} is not supported")),
            _ => bad(at, format!("field {field}: invalid wire type {wire}")),
        }
    }

    fn expect_wire(field: u64, wire: u8, want: u8, at: usize, name: &str) -> Decoded<()> {
        if wire != want {
            return bad(
                at,
                format!("{name} (field {field}) has wire type {wire}, expected {want}"),
            );
        }
        Ok(())
    }
}

/// Decodes a whole `Checkpoint` message.
fn decode(buf: &[u8]) -> Decoded<Vec<Entry>> {
    let mut r = Reader { buf, pos: 0, end: buf.len() };
    let mut entries: Vec<Entry> = Vec::new();
    // Tags seen so far: a set, so that a checkpoint of n entries decodes in O(n log n).
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    while !r.at_end() {
        let (field, wire, at) = r.key()?;
        if field == 1 {
            Reader::expect_wire(field, wire, WIRE_LEN, at, "Checkpoint.value")?;
            let range = r.len_delimited("Checkpoint.value")?;
            let e = decode_value(&mut r.sub(range), at)?;
            if !seen.insert(e.tag.clone()) {
                return bad(at, format!("parameter `{}` appears twice", e.tag));
            }
            entries.push(e);
        } else {
            r.skip(field, wire, at)?;
        }
    }
    if entries.is_empty() {
        return bad(0, "no tensors (not a MindSpore checkpoint?)");
    }
    Ok(entries)
}

fn decode_value(r: &mut Reader, start: usize) -> Decoded<Entry> {
    let mut tag: Option<String> = None;
    let mut tensor: Option<(Range<usize>, usize)> = None;
    while !r.at_end() {
        let (field, wire, at) = r.key()?;
        match field {
            1 => {
                Reader::expect_wire(field, wire, WIRE_LEN, at, "Value.tag")?;
                let s = r.len_delimited("Value.tag")?;
                let text = std::str::from_utf8(&r.buf[s])
                    .or_else(|_| bad(at, "Value.tag is not UTF-8"))?;
                tag = Some(text.to_string());
            }
            2 => {
                Reader::expect_wire(field, wire, WIRE_LEN, at, "Value.tensor")?;
                tensor = Some((r.len_delimited("Value.tensor")?, at));
            }
            3 => {
                let name = tag.as_deref().unwrap_or("?");
                return bad(
                    at,
                    format!("parameter `{name}` is a MapTensor, which is not supported"),
                );
            }
            _ => r.skip(field, wire, at)?,
        }
    }
    let Some(tag) = tag else { return bad(start, "entry without a parameter name (Value.tag)") };
    let Some((range, at)) = tensor else {
        return bad(start, format!("parameter `{tag}` has no tensor"));
    };
    decode_tensor(&mut r.sub(range), tag, at)
}

fn decode_tensor(r: &mut Reader, tag: String, start: usize) -> Decoded<Entry> {
    let mut dims: Vec<usize> = Vec::new();
    let mut ttype: Option<(String, usize)> = None;
    let mut content: Option<Range<usize>> = None;
    let dim = |v: u64, at: usize| -> Decoded<usize> {
        // int64 on the wire: a negative dim is a ten-byte varint with the top bit set.
        if v > i64::MAX as u64 {
            return bad(at, format!("parameter `{tag}`: negative dimension {}", v as i64));
        }
        usize::try_from(v)
            .or_else(|_| bad(at, format!("parameter `{tag}`: dimension {v} too large")))
    };
    while !r.at_end() {
        let (field, wire, at) = r.key()?;
        match (field, wire) {
            (1, WIRE_VARINT) => {
                let at = r.pos;
                let v = r.varint("TensorProto.dims")?;
                dims.push(dim(v, at)?);
            }
            (1, WIRE_LEN) => {
                // Packed dims (not what MindSpore writes, but valid protobuf).
                let range = r.len_delimited("TensorProto.dims")?;
                let mut p = r.sub(range);
                while !p.at_end() {
                    let at = p.pos;
                    let v = p.varint("TensorProto.dims")?;
                    dims.push(dim(v, at)?);
                }
            }
            (1, _) => {
                return bad(at, format!("parameter `{tag}`: TensorProto.dims has wire type {wire}"))
            }
            (2, _) => {
                Reader::expect_wire(field, wire, WIRE_LEN, at, "TensorProto.tensor_type")?;
                let s = r.len_delimited("TensorProto.tensor_type")?;
                let text = String::from_utf8_lossy(&r.buf[s]).into_owned();
                ttype = Some((text, at));
            }
            (3, _) => {
                Reader::expect_wire(field, wire, WIRE_LEN, at, "TensorProto.tensor_content")?;
                content = Some(r.len_delimited("TensorProto.tensor_content")?);
            }
            _ => r.skip(field, wire, at)?,
        }
    }
    let Some((tname, tat)) = ttype else {
        return bad(start, format!("parameter `{tag}`: no tensor_type"));
    };
    let Some(dtype) = dtype_from_tensor_type(&tname) else {
        return bad(
            tat,
            format!(
                "parameter `{tag}`: unknown tensor_type {tname:?} (known: Float32, Float16, BFloat16, Float64, Int32, Int64, UInt8, Bool)"
            ),
        );
    };
    let Some(content) = content else {
        return bad(start, format!("parameter `{tag}`: no tensor_content"));
    };
    let need = dims.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
    let Some(need) = need else {
        return bad(
            start,
            format!("parameter `{tag}`: shape {dims:?} has an element count that overflows"),
        );
    };
    if need != content.len() {
        return bad(
            content.start,
            format!(
                "parameter `{tag}`: shape {dims:?} of {tname} needs {need} bytes but tensor_content holds {}",
                content.len()
            ),
        );
    }
    Ok(Entry { tag, dtype, dims, content })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The README's example: a [1,3] float32 tensor `a.f32` holding 1, 2, 3.
    const README_EXAMPLE: &str =
        "0a 24 | 0a 05 612e663332 | 12 1b | 08 01 08 03 | 12 07 466c6f61743332 | 1a 0c 0000803f 00000040 00004040";

    fn err(bytes: &[u8]) -> String {
        match Checkpoint::from_bytes(Path::new("x.ckpt"), bytes) {
            Ok(_) => panic!("decoded a malformed checkpoint"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_readme_example_decodes() {
        let c = Checkpoint::from_bytes(Path::new("x.ckpt"), &hex(README_EXAMPLE)).unwrap();
        assert_eq!(c.keys().collect::<Vec<_>>(), ["a.f32"]);
        let t = c.get("a.f32").unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.shape(), &[1, 3]);
        assert_eq!(t.to_f64_vec(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn unknown_fields_are_skipped_by_wire_type() {
        // Checkpoint field 7 (varint), field 9 (fixed32); Value field 5 (fixed64);
        // TensorProto field 4 (length-delimited), then the README's tensor.
        let mut b = hex("38 96 01  4d 01020304");
        let mut value = hex("0a 05 612e663332  29 0102030405060708  12 1f  22 02 ffff");
        value.extend(hex("08 01 08 03 12 07 466c6f61743332 1a 0c 0000803f 00000040 00004040"));
        b.push(0x0a);
        b.push(value.len() as u8);
        b.extend(value);
        let c = Checkpoint::from_bytes(Path::new("x.ckpt"), &b).unwrap();
        assert_eq!(c.get("a.f32").unwrap().to_f64_vec(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn packed_dims_are_accepted() {
        let b = hex("0a 24 0a 05 612e663332 12 1b 0a 02 01 03 12 07 466c6f61743332 1a 0c 0000803f 00000040 00004040");
        let c = Checkpoint::from_bytes(Path::new("x.ckpt"), &b).unwrap();
        assert_eq!(c.get("a.f32").unwrap().shape(), &[1, 3]);
    }

    #[test]
    fn every_truncation_of_the_readme_example_is_an_error_not_a_panic() {
        let b = hex(README_EXAMPLE);
        for n in 0..b.len() {
            let e = err(&b[..n]);
            assert!(e.starts_with("x.ckpt: "), "{e}");
        }
        // Cut inside the content: the outer length runs past the end.
        assert_eq!(
            err(&b[..30]),
            "x.ckpt: malformed MindSpore checkpoint at byte 1: Checkpoint.value: length 36 runs past the end of its message (28 bytes left)"
        );
    }

    #[test]
    fn a_truncated_varint_names_its_offset() {
        assert_eq!(
            err(&hex("0a 80")),
            "x.ckpt: malformed MindSpore checkpoint at byte 1: truncated varint (Checkpoint.value)"
        );
        assert_eq!(
            err(&hex("0a 01 ff")),
            "x.ckpt: malformed MindSpore checkpoint at byte 2: truncated varint (field key)"
        );
    }

    #[test]
    fn an_overlong_varint_is_rejected() {
        assert!(err(&hex("0a ffffffffffffffffffff01"))
            .contains("at byte 1: varint (Checkpoint.value) overflows 64 bits"));
    }

    #[test]
    fn an_unknown_tensor_type_is_named() {
        // "Int16" (5 bytes): tensor 0x19 bytes, value 0x22.
        let mut b2 = hex("0a 22 0a 05 612e663332 12 19 08 01 08 03 12 05 496e743136 1a 0c");
        b2.extend(hex("0000803f 00000040 00004040"));
        let e = err(&b2);
        assert!(e.contains("parameter `a.f32`: unknown tensor_type \"Int16\""), "{e}");
    }

    #[test]
    fn a_content_size_mismatch_is_named() {
        // dims [1,4] but 12 bytes of content.
        let b = hex("0a 24 0a 05 612e663332 12 1b 08 01 08 04 12 07 466c6f61743332 1a 0c 0000803f 00000040 00004040");
        assert_eq!(
            err(&b),
            "x.ckpt: malformed MindSpore checkpoint at byte 26: parameter `a.f32`: shape [1, 4] of Float32 needs 16 bytes but tensor_content holds 12"
        );
    }

    #[test]
    fn missing_parts_and_bad_wire_types_are_named() {
        // A Value with only a tag.
        assert!(err(&hex("0a 07 0a 05 612e663332")).contains("parameter `a.f32` has no tensor"));
        // A tensor without tensor_type.
        assert!(err(&hex("0a 0b 0a 05 612e663332 12 02 08 01"))
            .contains("parameter `a.f32`: no tensor_type"));
        // Checkpoint.value as a varint.
        assert!(
            err(&hex("08 01")).contains("Checkpoint.value (field 1) has wire type 0, expected 2")
        );
        // Wire type 7 does not exist.
        assert!(err(&hex("17")).contains("at byte 0: field 2: invalid wire type 7"));
        // A negative dim.
        let b = hex("0a 1a 0a 05 612e663332 12 11 08 ffffffffffffffffff01 12 04 426f6f6c");
        assert!(err(&b).contains("negative dimension -1"), "{}", err(&b));
    }

    #[test]
    fn a_repeated_name_is_rejected() {
        let mut b = hex(README_EXAMPLE);
        b.extend(hex(README_EXAMPLE));
        assert!(err(&b).contains("at byte 38: parameter `a.f32` appears twice"));
    }
}
