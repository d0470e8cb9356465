//! The verification stamp: which files were hashed, when they looked how.
//!
//! Hashing a ViT-B/32 image encoder (350 MB) costs about 0.2 s of every start, for a file that
//! has not changed since the cache was built. So whoever hashes a bundle file or checks the
//! cache data (`cache build`, a verifying start) records the file's identity beside the result:
//! its size, modification and status-change times, inode and device. A later start skips the
//! hash when all five are unchanged. Any write to a file changes its ctime, which no tool can set
//! back, and copying or replacing it changes the inode; what a stamp cannot see is bit rot under
//! an unchanged inode, which `cac-edge doctor` (always hashing) and a missing stamp still catch.
//!
//! The stamp is a small JSON file per cache in the user's cache directory (docs/FORMATS.md §3),
//! never beside the cache: caches live in package-owned or read-only directories
//! (/usr/share/cac-edge), which a start must not write into. It is written atomically. A stamp
//! that is missing, unreadable or of another version is empty; one that cannot be written only
//! means the next start hashes again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The stamp's `version`; another is read as empty.
const STAMP_VERSION: u32 = 1;

/// The identity of a file's current content, as far as the file system can tell without
/// reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileIdentity {
    size: u64,
    // i64 nanoseconds reach the year 2262; serde's flattening cannot carry i128.
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    device: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    identity: FileIdentity,
    /// What the file was checked against: the sha256 the manifest declares, or the cache's
    /// `data_sha256`.
    verified: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StampFile {
    version: u32,
    files: BTreeMap<PathBuf, Entry>,
}

/// The verification stamp of one cache: loaded once at start, saved if anything was added.
#[derive(Debug)]
pub struct VerificationStamp {
    /// `None` where there is no cache directory to keep it in: nothing is ever verified by it.
    path: Option<PathBuf>,
    files: BTreeMap<PathBuf, Entry>,
    changed: bool,
}

impl VerificationStamp {
    /// The stamp of the cache at `cache_path` ([`stamp_path`]); empty when there is none or it
    /// cannot be read.
    pub fn of_cache(cache_path: &Path) -> VerificationStamp {
        let path = stamp_path(cache_path);
        let files = path
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice::<StampFile>(&bytes).ok())
            .filter(|stamp| stamp.version == STAMP_VERSION)
            .map(|stamp| stamp.files)
            .unwrap_or_default();
        VerificationStamp { path, files, changed: false }
    }

    /// True when `file` was verified against `expected` and has not changed since.
    pub fn is_verified(&self, file: &Path, expected: &str) -> bool {
        let (Some(key), Some(identity)) = (key(file), identity(file)) else { return false };
        self.files.get(&key).is_some_and(|entry| entry.identity == identity && entry.verified == expected)
    }

    /// Records that `file`, as it is now, was verified against `expected`.
    pub fn record(&mut self, file: &Path, expected: &str) {
        if let (Some(key), Some(identity)) = (key(file), identity(file)) {
            let entry = Entry { identity, verified: expected.to_string() };
            if self.files.get(&key) != Some(&entry) {
                self.files.insert(key, entry);
                self.changed = true;
            }
        }
    }

    /// Writes the stamp if anything was recorded. A failure is returned for the caller to log:
    /// it costs the next start a hash, nothing else.
    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.changed {
            return Ok(());
        }
        // Entries of files that no longer exist would only grow the file.
        self.files.retain(|path, _| path.exists());
        let stamp = StampFile { version: STAMP_VERSION, files: std::mem::take(&mut self.files) };
        let bytes = serde_json::to_vec_pretty(&stamp).map_err(std::io::Error::other);
        self.files = stamp.files;
        let Some(path) = &self.path else { return Err(std::io::Error::other("no cache directory for the stamp")) };
        crate::fsio::write_atomic_bytes(path, &bytes?)?;
        self.changed = false;
        Ok(())
    }

    /// Where the stamp lives, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// `<cache dir>/cac-edge/verified/<16 hex digits of the sha256 of the cache's absolute path>.json`,
/// where the cache directory is systemd's `$CACHE_DIRECTORY` (the service's /var/cache/cac-edge),
/// else `$XDG_CACHE_HOME`, else `~/.cache`; `None` when none is set.
pub fn stamp_path(cache_path: &Path) -> Option<PathBuf> {
    use sha2::Digest;
    let root = match std::env::var_os("CACHE_DIRECTORY").filter(|value| !value.is_empty()) {
        // systemd may list several, separated by colons; the first is the service's own.
        Some(dirs) => PathBuf::from(dirs.to_string_lossy().split(':').next().unwrap_or_default()).join("verified"),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME").filter(|value| !value.is_empty()).map(PathBuf::from).or_else(|| {
                std::env::var_os("HOME").filter(|value| !value.is_empty()).map(|home| PathBuf::from(home).join(".cache"))
            })?;
            base.join("cac-edge/verified")
        }
    };
    let absolute = key(cache_path)?;
    let digest = sha2::Sha256::digest(absolute.as_os_str().as_encoded_bytes());
    Some(root.join(format!("{}.json", &crate::bundle::hex(&digest)[..16])))
}

/// Files are keyed by their absolute path, so that the same file reached through another
/// relative path is the same entry.
fn key(file: &Path) -> Option<PathBuf> {
    std::path::absolute(file).ok()
}

#[cfg(unix)]
fn identity(file: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(file).ok()?;
    let nanos = |seconds: i64, nanos: i64| seconds.saturating_mul(1_000_000_000).saturating_add(nanos);
    Some(FileIdentity {
        size: metadata.size(),
        mtime_ns: nanos(metadata.mtime(), metadata.mtime_nsec()),
        ctime_ns: nanos(metadata.ctime(), metadata.ctime_nsec()),
        inode: metadata.ino(),
        device: metadata.dev(),
    })
}

/// Without a status-change time and inode, a stamp could miss a rewrite that kept the size and
/// modification time, so nothing is ever taken as verified.
#[cfg(not(unix))]
fn identity(_file: &Path) -> Option<FileIdentity> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_is_no_longer_verified_even_with_its_size_and_mtime_kept() {
        let dir = std::env::temp_dir().join(format!("cac-edge-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cache = dir.join("c.safetensors");
        let model = dir.join("m.onnx");
        std::fs::write(&model, b"weights-1").expect("write");
        let mut stamp = VerificationStamp::of_cache(&cache);
        assert!(!stamp.is_verified(&model, "h1"));
        stamp.record(&model, "h1");
        stamp.save().expect("save");
        let reread = VerificationStamp::of_cache(&cache);
        assert!(reread.is_verified(&model, "h1"));
        assert!(!reread.is_verified(&model, "h2"), "verified against another hash");
        // Same size, modification time set back: the ctime still moves.
        let mtime = std::fs::metadata(&model).and_then(|m| m.modified()).expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, b"weights-2").expect("rewrite");
        std::fs::File::options().write(true).open(&model).and_then(|f| f.set_modified(mtime)).expect("set mtime");
        assert!(!VerificationStamp::of_cache(&cache).is_verified(&model, "h1"));
        std::fs::write(stamp_path(&cache).expect("a cache directory"), b"not json").expect("damage");
        assert!(!VerificationStamp::of_cache(&cache).is_verified(&model, "h1"), "a damaged stamp is empty");
        let _ = std::fs::remove_file(stamp_path(&cache).expect("a cache directory"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
