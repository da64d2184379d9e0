//! Memory-mapped inputs, and what happens when one is cut short while it is read.
//!
//! Activations, weights and checkpoints are mapped rather than read: an 8B model's
//! weights are 16 GB. A mapped file that another process truncates while a run reads it
//! raises SIGBUS on the next access past its new end, which by default kills the process
//! with no message. [`map`] records each mapping's address range and file name in a
//! fixed table, and [`exit_on_truncation`] (called once by the `parity` binary) installs
//! a SIGBUS handler that looks the faulting address up there, writes one line naming the
//! file and exits with status 2, the status of any input the harness cannot read.
//!
//! Checking the length before and after each use would still take the signal in between,
//! and copying every input would cost the 16 GB the mapping saves, so the signal itself
//! is handled. The handler only reads the table (atomics), writes with `write(2)` and
//! leaves with `_exit(2)`, all async-signal-safe.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use contract::error::{Error, Result};

/// How many mappings the table remembers; the oldest entry is reused after that.
const SLOTS: usize = 1024;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// A leaked, NUL-free message line naming the file.
    line: AtomicPtr<u8>,
    line_len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    line: AtomicPtr::new(std::ptr::null_mut()),
    line_len: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// The next slot to fill (modulo `SLOTS`).
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Maps `file` (opened from `path`) read-only and records the mapping, so that a
/// truncation while it is read ends the run with a line naming `path`.
pub fn map(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only; a file cut short while it is mapped raises SIGBUS,
    // which the handler installed by `exit_on_truncation` turns into exit 2 naming it.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))?;
    if !map.is_empty() {
        record(map.as_ptr() as usize, map.len(), path);
    }
    Ok(map)
}

fn record(start: usize, len: usize, path: &Path) {
    let text = format!(
        "parity: error: {}: the file was truncated or replaced while it was being read (SIGBUS on its memory map)\n",
        path.display()
    );
    let text = contract::error::escape_controls(text.trim_end()) + "\n";
    let line: &'static mut [u8] = Box::leak(text.into_bytes().into_boxed_slice());
    let slot = &TABLE[NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS];
    // Emptied first, so a handler running meanwhile never pairs a range with the
    // wrong name.
    slot.start.store(0, Ordering::Release);
    slot.len.store(len, Ordering::Release);
    slot.line_len.store(line.len(), Ordering::Release);
    slot.line.store(line.as_mut_ptr(), Ordering::Release);
    slot.start.store(start, Ordering::Release);
}

/// The message line of the newest recorded mapping holding `addr`.
fn line_for(addr: usize) -> Option<(*const u8, usize)> {
    let next = NEXT.load(Ordering::Acquire);
    // Newest first: a range unmapped and mapped again names the file mapped last.
    for k in 1..=SLOTS.min(next) {
        let slot = &TABLE[(next - k) % SLOTS];
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            let line = slot.line.load(Ordering::Acquire);
            if !line.is_null() {
                return Some((line, slot.line_len.load(Ordering::Acquire)));
            }
        }
    }
    None
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    const OTHER: &[u8] =
        b"parity: error: an input file was truncated while it was being read (SIGBUS on a memory map)\n";
    // SAFETY: `info` is the siginfo the kernel passed for this signal.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (ptr, len) = line_for(addr).unwrap_or((OTHER.as_ptr(), OTHER.len()));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `ptr` points at `len` bytes
    // that are never freed.
    unsafe {
        libc::write(2, ptr.cast(), len);
        libc::_exit(2);
    }
}

/// Installs the SIGBUS handler that ends the process with exit status 2 and a line
/// naming the mapped file that was cut short. Called once, by the `parity` binary.
pub fn exit_on_truncation() {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_mapping_holding_an_address_names_the_file() {
        record(0x1000_0000, 0x1000, Path::new("/old/a.safetensors"));
        record(0x1000_0000, 0x800, Path::new("/new/b.safetensors"));
        let name = |addr| {
            line_for(addr).map(|(p, n)| {
                // SAFETY: a recorded line, never freed.
                String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p, n) }).into_owned()
            })
        };
        assert!(name(0x1000_0010).unwrap().contains("/new/b.safetensors"));
        assert!(name(0x1000_0900).unwrap().contains("/old/a.safetensors"));
        assert!(name(0x0fff_ffff).is_none());
    }
}
