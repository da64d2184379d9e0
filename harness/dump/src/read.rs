//! Opening input files safely: only regular files are read (a FIFO would block
//! forever, `/dev/zero` never ends), and text inputs are read under a size cap.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use contract::error::{Error, Result};

/// The largest JSON input read (`manifest.json`, a policy, a key map): 64 MiB.
pub const JSON_CAP: u64 = 64 << 20;

/// Opens `path` for reading if it is a regular file (after symlinks), and refuses
/// anything else (a directory, a FIFO, a device) with a message naming it. The open
/// itself never blocks: a FIFO swapped in after the check is opened non-blocking and
/// then refused.
pub fn open_regular(path: &Path) -> Result<File> {
    let kind = |m: &std::fs::Metadata| {
        let t = m.file_type();
        if t.is_dir() {
            "a directory"
        } else {
            use std::os::unix::fs::FileTypeExt;
            if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
    };
    let refuse = |m: &std::fs::Metadata| {
        Error::format(path, format!("{} where a regular file is expected", kind(m)))
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    Ok(file)
}

/// Reads the regular file `path` whole, refusing one larger than `cap` bytes (checked
/// before reading, and again while reading in case it grows).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_big = |n: u64| {
        Error::format(path, format!("{n} bytes is larger than the {cap}-byte limit for this file"))
    };
    if len > cap {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_capped`] for JSON text under [`JSON_CAP`], as UTF-8.
pub fn read_json_text(path: &Path) -> Result<String> {
    let bytes = read_capped(path, JSON_CAP)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(path, format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()))
    })
}
