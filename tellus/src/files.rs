//! Writing files into the data directory: atomically, and secrets with mode 0600 from the
//! first byte.

use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

/// Writes `contents` to `path` through a temporary file and a rename, so a crash never
/// leaves half a file; `mode` applies from creation on.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}
