//! Expanding command-line inputs (files and directories) into the list of image files to
//! classify.
//!
//! Rules ([`scan`]):
//! - A file given explicitly is taken whatever its extension (the content decides); a directory
//!   is searched recursively, in sorted order, for files with an image extension
//!   ([`has_image_extension`]).
//! - Symbolic links given explicitly are followed. Symbolic links to directories found during a
//!   directory scan are not followed unless [`ScanOptions::follow_symlinks`] is set; when they
//!   are, every directory is entered at most once (it is identified by device and inode), so a
//!   link to `.` or to an ancestor cannot make the scan loop.
//! - Each file is listed once, however many inputs, links or hard links reach it (again by device
//!   and inode).
//! - Only regular files are listed. A FIFO, socket or device is never opened: one found during a
//!   directory scan is passed over ([`Scan::skipped`]); one given explicitly is refused
//!   ([`Scan::refused`]), since reading it could block forever or never end (`/dev/zero`).
//!
//! The scan only reads directory entries and file metadata; it never opens a file.

use std::collections::HashMap;
use std::fs::Metadata;
use std::path::{Path, PathBuf};

use crate::preprocess::{file_kind, has_image_extension};

/// How [`scan`] treats symbolic links found inside directories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanOptions {
    /// Follow symbolic links to directories found during a directory scan (each directory is
    /// still entered at most once). Off by default: such links are skipped.
    pub follow_symlinks: bool,
}

/// Why a path was passed over or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a regular file: a FIFO, socket, character or block device (`kind` names which).
    NotRegularFile {
        /// "FIFO (named pipe)", "socket", "character device", "block device" or "special file".
        kind: &'static str,
    },
    /// A symbolic link to a directory, found during a scan while links are not followed.
    SymlinkedDirectory,
    /// A directory already searched (reached again through a link, or given twice).
    DirectoryAlreadyScanned {
        /// The path under which it was first searched.
        first: PathBuf,
    },
    /// A file already listed under another path (a second input, a link or a hard link).
    Duplicate {
        /// The path under which it is listed.
        first: PathBuf,
    },
    /// A symbolic link whose target does not exist.
    BrokenSymlink,
    /// The directory or the entry's metadata could not be read.
    Unreadable {
        /// The operating system's error.
        error: String,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotRegularFile { kind } => {
                write!(f, "not a regular file but a {kind}; only image files are read (it is never opened)")
            }
            SkipReason::SymlinkedDirectory => {
                write!(f, "symbolic link to a directory, not followed (following linked directories is an option)")
            }
            SkipReason::DirectoryAlreadyScanned { first } => {
                write!(f, "directory already searched as {}", first.display())
            }
            SkipReason::Duplicate { first } => write!(f, "same file as {}, listed once", first.display()),
            SkipReason::BrokenSymlink => write!(f, "symbolic link to nothing (its target does not exist)"),
            SkipReason::Unreadable { error } => write!(f, "cannot read: {error}"),
        }
    }
}

/// What [`scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The regular files to classify, in input order (directories in sorted order), each once.
    pub files: Vec<PathBuf>,
    /// Explicit inputs that do not exist.
    pub missing: Vec<PathBuf>,
    /// Explicit inputs that cannot be classified (not a regular file): callers report them as
    /// failures.
    pub refused: Vec<(PathBuf, SkipReason)>,
    /// Paths passed over, with the reason: special files and links found during directory
    /// scans, duplicates, unreadable directories. Callers print a note; they are not failures.
    pub skipped: Vec<(PathBuf, SkipReason)>,
}

/// Expands `inputs` into the image files to classify; see the module documentation for the rules.
pub fn scan(inputs: &[PathBuf], options: &ScanOptions) -> Scan {
    let mut scanner = Scanner { options: *options, scan: Scan::default(), files: HashMap::new(), dirs: HashMap::new() };
    for input in inputs {
        // Explicit inputs: links are followed (the user named them).
        match std::fs::metadata(input) {
            Ok(metadata) if metadata.is_dir() => scanner.directory(input, &metadata),
            Ok(metadata) if metadata.is_file() => scanner.file(input, &metadata),
            Ok(metadata) => scanner.scan.refused.push((input.clone(), special_kind(&metadata))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => scanner.scan.missing.push(input.clone()),
            Err(error) => scanner.scan.refused.push((input.clone(), SkipReason::Unreadable { error: error.to_string() })),
        }
    }
    scanner.scan
}

/// Identity of a file or directory: (device, inode) on Unix, the canonical path elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileId {
    #[cfg_attr(not(unix), allow(dead_code, reason = "built on Unix only"))]
    Inode(u64, u64),
    #[cfg_attr(unix, allow(dead_code, reason = "built where there are no inodes only"))]
    Path(PathBuf),
}

#[cfg(unix)]
fn file_id(_path: &Path, metadata: &Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    FileId::Inode(metadata.dev(), metadata.ino())
}

#[cfg(not(unix))]
fn file_id(path: &Path, _metadata: &Metadata) -> FileId {
    FileId::Path(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

fn special_kind(metadata: &Metadata) -> SkipReason {
    SkipReason::NotRegularFile { kind: file_kind(metadata.file_type()) }
}

struct Scanner {
    options: ScanOptions,
    scan: Scan,
    /// Files listed so far: their index in `scan.files`.
    files: HashMap<FileId, usize>,
    /// Directories searched so far, with the path they were searched under.
    dirs: HashMap<FileId, PathBuf>,
}

impl Scanner {
    fn file(&mut self, path: &Path, metadata: &Metadata) {
        let id = file_id(path, metadata);
        if let Some(&index) = self.files.get(&id) {
            let first = self.scan.files[index].clone();
            self.scan.skipped.push((path.to_path_buf(), SkipReason::Duplicate { first }));
        } else {
            self.files.insert(id, self.scan.files.len());
            self.scan.files.push(path.to_path_buf());
        }
    }

    /// Searches `dir` (whose followed metadata is `metadata`) unless it was searched before.
    fn directory(&mut self, dir: &Path, metadata: &Metadata) {
        let id = file_id(dir, metadata);
        if let Some(first) = self.dirs.get(&id) {
            let first = first.clone();
            self.scan.skipped.push((dir.to_path_buf(), SkipReason::DirectoryAlreadyScanned { first }));
            return;
        }
        self.dirs.insert(id, dir.to_path_buf());
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                self.scan.skipped.push((dir.to_path_buf(), SkipReason::Unreadable { error: error.to_string() }));
                return;
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
        paths.sort();
        for path in paths {
            self.entry(&path);
        }
    }

    /// One directory entry: never opened, only its metadata is read.
    fn entry(&mut self, path: &Path) {
        let unreadable = |error: std::io::Error| SkipReason::Unreadable { error: error.to_string() };
        let own = match std::fs::symlink_metadata(path) {
            Ok(own) => own,
            Err(error) => return self.scan.skipped.push((path.to_path_buf(), unreadable(error))),
        };
        if own.is_dir() {
            return self.directory(path, &own);
        }
        let metadata = if own.file_type().is_symlink() {
            match std::fs::metadata(path) {
                Ok(target) if target.is_dir() => {
                    if self.options.follow_symlinks {
                        self.directory(path, &target);
                    } else {
                        self.scan.skipped.push((path.to_path_buf(), SkipReason::SymlinkedDirectory));
                    }
                    return;
                }
                Ok(target) => target,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    if has_image_extension(path) {
                        self.scan.skipped.push((path.to_path_buf(), SkipReason::BrokenSymlink));
                    }
                    return;
                }
                Err(error) => return self.scan.skipped.push((path.to_path_buf(), unreadable(error))),
            }
        } else {
            own
        };
        if !has_image_extension(path) {
            return;
        }
        if metadata.is_file() {
            self.file(path, &metadata);
        } else {
            self.scan.skipped.push((path.to_path_buf(), special_kind(&metadata)));
        }
    }
}
