//! Files that must survive a crash or a power cut: every cache, cache-metadata update, feature
//! store, report and plot cac-edge writes goes through [`write_atomic`].
//!
//! The sequence is the one that keeps the old file whole until the new one is complete on disk:
//! write a temporary sibling, fsync it, rename it over the target, fsync the directory. The
//! temporary file is created with the process umask (0644 under umask 022), so a service user
//! can read a cache that root rebuilt. Its name is recognisable
//! (`.<name>.cac-edge-tmp-<pid>-<n>`): one left behind by a killed writer is removed by the next
//! write into the same directory once its process is gone.
//!
//! Writers of one directory take an exclusive advisory lock (`flock`) on the directory for the
//! write and the rename, so two concurrent `cache build` runs to one path serialise (the last one
//! wins, whole). Readers need no lock: a rename is atomic, so a reader opens either the old file
//! or the new one, and a reader that mapped the old file keeps it until it lets go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};

/// The marker in the names of our temporary files.
const TEMP_MARKER: &str = ".cac-edge-tmp-";

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Writes `path` atomically and durably. `write` creates and fills the temporary file whose path
/// it is given (with `File::create` or any writer that creates it with the default mode).
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir)?;
    let _lock = DirLock::exclusive(&dir)?;
    remove_stale_temporaries(&dir);
    let temporary = temporary_path(path);
    let written =
        write(&temporary).and_then(|()| File::open(&temporary)?.sync_all()).and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        // Best effort: the write error is the one worth reporting.
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    sync_dir(&dir)
}

/// [`write_atomic`] for bytes already in memory (reports, plots, the verification stamp).
pub(crate) fn write_atomic_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, |temporary| std::fs::write(temporary, bytes))
}

/// Writes a safetensors file with [`write_atomic`], streaming the tensors' bytes (a 100 000-class
/// cache is 400 MB: no second copy in memory). The layout is exactly what
/// `safetensors::serialize` produces (tensors ordered by descending dtype, then name; the JSON
/// header padded with spaces to 8 bytes). `safetensors::serialize_to_file` is not used: it writes
/// through its own 0600 temporary file (`.tmpXXXXXX`), named like nothing of ours, without fsync.
pub(crate) fn write_safetensors<'a, S: AsRef<str> + Ord>(
    path: &Path,
    tensors: impl IntoIterator<Item = (S, TensorView<'a>)>,
    metadata: HashMap<String, String>,
) -> io::Result<()> {
    let mut tensors: Vec<(S, TensorView<'a>)> = tensors.into_iter().collect();
    tensors.sort_by(|(left_name, left), (right_name, right)| right.dtype().cmp(&left.dtype()).then(left_name.cmp(right_name)));
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, view)| {
            let end = offset + view.data().len();
            let info = TensorInfo { dtype: view.dtype(), shape: view.shape().to_vec(), data_offsets: (offset, end) };
            offset = end;
            (name.as_ref().to_string(), info)
        })
        .collect();
    let header = Metadata::new(Some(metadata), infos).map_err(|error| io::Error::other(error.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(io::Error::other)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomic(path, |temporary| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(temporary)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, view) in &tensors {
            out.write_all(view.data())?;
        }
        out.flush()
    })
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let serial = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}{TEMP_MARKER}{}-{serial}", std::process::id()))
}

/// Removes our temporary files whose writing process no longer exists (killed mid-write).
/// Files of live processes, including our own other writes, are left alone.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else { continue };
        if !process_exists(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!("removed {}, left by an interrupted write", entry.path().display()),
                Err(error) => tracing::debug!("could not remove {}: {error}", entry.path().display()),
            }
        }
    }
}

/// The pid in a temporary file name of ours, `.<name>.cac-edge-tmp-<pid>-<serial>`.
fn temporary_owner(name: &str) -> Option<u32> {
    let rest = &name[name.rfind(TEMP_MARKER)? + TEMP_MARKER.len()..];
    let (pid, serial) = rest.split_once('-')?;
    serial.parse::<u64>().ok()?;
    pid.parse().ok()
}

#[cfg(target_os = "linux")]
fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_exists(_pid: u32) -> bool {
    // Without /proc we cannot tell: keep the file rather than delete a live writer's.
    true
}

/// fsync of a directory makes a rename in it durable (POSIX; a no-op elsewhere).
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// An advisory `flock` on a directory, released on drop.
struct DirLock(File);

impl DirLock {
    fn exclusive(dir: &Path) -> io::Result<DirLock> {
        let file = File::open(dir)?;
        file.lock()?;
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised_and_others_are_not() {
        let temporary = temporary_path(Path::new("/tmp/x/cache.safetensors"));
        let name = temporary.file_name().unwrap().to_str().unwrap();
        assert_eq!(temporary_owner(name), Some(std::process::id()));
        assert_eq!(temporary_owner("cache.safetensors"), None);
        assert_eq!(temporary_owner(".cache.safetensors.cac-edge-tmp-12"), None);
        assert_eq!(temporary_owner(".tmpAbC123"), None);
    }

    #[test]
    fn a_dead_writers_temporary_is_removed_and_a_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // No process has a pid near u32::MAX (Linux caps pids at 2^22); our own pid is alive.
        let dead = dir.path().join(format!(".a.bin{TEMP_MARKER}{}-0", u32::MAX - 1));
        let live = dir.path().join(format!(".b.bin{TEMP_MARKER}{}-0", std::process::id()));
        std::fs::write(&dead, b"half").unwrap();
        std::fs::write(&live, b"in progress").unwrap();
        write_atomic_bytes(&dir.path().join("a.bin"), b"whole").unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
        assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), b"whole");
    }

    #[cfg(unix)]
    #[test]
    fn files_get_the_umask_permissions_not_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomic_bytes(&path, b"{}").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // The test process's umask is whatever the runner has; the file must carry exactly
        // 0666 minus it, never tempfile's 0600.
        assert_eq!(mode, 0o666 & !current_umask(), "mode {mode:o}");
    }

    #[cfg(unix)]
    fn current_umask() -> u32 {
        // /proc/self/status has "Umask:\t0022" on Linux 4.7+.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|line| line.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }

    #[test]
    fn safetensors_are_written_byte_for_byte_as_the_safetensors_crate_serialises_them() {
        use safetensors::tensor::Dtype;
        let floats: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = b"a\nbc".to_vec();
        let ids: Vec<u8> = [3u64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = || {
            vec![
                ("names", TensorView::new(Dtype::U8, vec![4], &bytes).unwrap()),
                ("features", TensorView::new(Dtype::F32, vec![2, 3], &floats).unwrap()),
                ("ids", TensorView::new(Dtype::U64, vec![2], &ids).unwrap()),
            ]
        };
        let metadata = HashMap::from([("format".to_string(), "test".to_string()), ("k".to_string(), "v".to_string())]);
        let expected = safetensors::serialize(tensors(), Some(metadata.clone())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_safetensors(&path, tensors(), metadata).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        std::fs::write(&path, b"old").unwrap();
        let error = write_atomic(&path, |temporary| {
            std::fs::write(temporary, b"partial")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
