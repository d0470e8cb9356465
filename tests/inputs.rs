//! Expanding inputs into image files (`cac_edge::inputs`) and reading them (`decode_file`):
//! symbolic-link loops, files reached twice, FIFOs and devices. The binary is run with a time
//! limit: before these rules, a link to `.` made one image be classified 41 times, two such
//! links never finished, a FIFO blocked the run and `/dev/zero` was read until memory ran out.
#![cfg(unix)]

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cac_edge::inputs::{scan, ScanOptions, SkipReason};
use cac_edge::preprocess::{decode_file, DecodeLimits};
use common::*;
use serde_json::Value;

fn classify(cache: &str, extra: &[&str]) -> Output {
    run_bounded(classify_command(cache).args(["--device", "cpu", "--threads", "1"]).args(extra))
}

fn paths_of(lines: &[Value]) -> Vec<String> {
    lines.iter().map(|line| line["path"].as_str().unwrap().to_string()).collect()
}

/// `dir/images` holding two photos; returns that folder.
fn image_folder(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["chelsea.png", "rocket.jpg"] {
        std::fs::copy(fixture("images/photos").join(name), images.join(name)).unwrap();
    }
    images
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------------------------- the binary

#[test]
fn a_link_to_its_own_folder_is_not_followed_and_each_image_is_classified_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let images = image_folder(dir.path());
    symlink(".", images.join("self")).unwrap();
    symlink(".", images.join("again")).unwrap(); // two such links used to never finish

    let output = classify(&cache, &[s(&images)]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let expected = vec![s(&images.join("chelsea.png")).to_string(), s(&images.join("rocket.jpg")).to_string()];
    assert_eq!(paths_of(&json_lines(&output)), expected, "{stderr}");
    for link in ["self", "again"] {
        assert!(stderr.contains(&format!("{}: symbolic link to a directory, not followed", s(&images.join(link)))), "{stderr}");
    }
    assert!(stderr.contains("--follow"), "{stderr}");
    assert!(stderr.contains("2 images"), "{stderr}");

    // --follow: the links lead back to a folder already searched, so still each image once,
    // with the same results.
    let followed = classify(&cache, &["--follow", s(&images)]);
    let followed_stderr = text(&followed.stderr);
    assert_eq!(followed.status.code(), Some(0), "{followed_stderr}");
    let (plain, follow) = (json_lines(&output), json_lines(&followed));
    assert_eq!(paths_of(&follow), expected, "{followed_stderr}");
    for (a, b) in plain.iter().zip(&follow) {
        assert_eq!(a["label"], b["label"]);
        assert_eq!(a["confidence"], b["confidence"]);
    }
    assert!(followed_stderr.contains("directory already searched"), "{followed_stderr}");
}

#[test]
fn follow_reaches_linked_folders_once_and_files_reached_twice_are_classified_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let images = image_folder(dir.path());
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::copy(fixture("images/photos/flower.jpg"), elsewhere.join("flower.jpg")).unwrap();
    symlink(&elsewhere, images.join("linked")).unwrap(); // "linked" sorts between the photos
    symlink("..", elsewhere.join("up")).unwrap(); // a loop back through the parent, when followed

    // Not followed: the two photos; the photo named again explicitly is listed once.
    let output = classify(&cache, &[s(&images), s(&images.join("rocket.jpg"))]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        paths_of(&json_lines(&output)),
        vec![s(&images.join("chelsea.png")).to_string(), s(&images.join("rocket.jpg")).to_string()],
        "{stderr}"
    );
    assert!(stderr.contains("same file as"), "{stderr}");

    // Followed: the linked folder's photo too, once, even though `up` leads back to the top
    // folder and the photo is also named directly.
    let output = classify(&cache, &["--follow", s(&images), s(&elsewhere.join("flower.jpg"))]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        paths_of(&json_lines(&output)),
        vec![
            s(&images.join("chelsea.png")).to_string(),
            s(&images.join("linked/flower.jpg")).to_string(),
            s(&images.join("rocket.jpg")).to_string(),
        ],
        "{stderr}"
    );
}

#[test]
fn a_fifo_in_a_folder_is_skipped_with_a_note_and_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let images = image_folder(dir.path());
    let fifo = images.join("live.jpg");
    mkfifo(&fifo);

    let output = classify(&cache, &[s(&images)]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "a FIFO in a folder is not a failure\n{stderr}");
    assert_eq!(json_lines(&output).len(), 2, "{stderr}");
    assert!(stderr.contains(&format!("{}: not a regular file but a FIFO", s(&fifo))), "{stderr}");
}

#[test]
fn an_explicit_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let fifo = dir.path().join("camera.jpg");
    mkfifo(&fifo);
    let photo = fixture("images/photos/chelsea.png");

    let output = classify(&cache, &[s(&fifo), s(&photo)]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 2, "{stderr}");
    let failure = lines.iter().find(|line| line["path"] == s(&fifo)).expect("a line for the FIFO");
    assert!(failure["error"].as_str().unwrap().contains("not a regular file but a FIFO"), "{failure}");
    assert!(lines.iter().any(|line| line["path"] == s(&photo) && line["label"].is_string()), "{lines:?}");
    assert!(stderr.contains(s(&fifo)) && stderr.contains("1 failed"), "{stderr}");
}

#[test]
fn dev_zero_given_explicitly_fails_fast_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let start = Instant::now();
    let output = classify(&cache, &["/dev/zero"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["path"], "/dev/zero");
    assert!(lines[0]["error"].as_str().unwrap().contains("not a regular file but a character device"), "{}", lines[0]);
    assert!(stderr.contains("/dev/zero: not a regular file"), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
}

// ------------------------------------------------------------------------------- the library

fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"not read by the scan").unwrap();
}

fn skipped_reason<'a>(skipped: &'a [(PathBuf, SkipReason)], path: &Path) -> &'a SkipReason {
    &skipped
        .iter()
        .find(|(skipped, _)| skipped == path)
        .unwrap_or_else(|| panic!("{} not skipped: {skipped:?}", path.display()))
        .1
}

#[test]
fn scan_does_not_follow_linked_folders_unless_asked_and_then_enters_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (top, other) = (dir.path().join("top"), dir.path().join("other"));
    touch(&top.join("a.png"));
    touch(&top.join("sub/b.jpg"));
    touch(&other.join("c.jpg"));
    symlink(".", top.join("self")).unwrap();
    symlink("..", top.join("sub/up")).unwrap();
    symlink("../other", top.join("out")).unwrap();
    symlink("../top", other.join("back")).unwrap();

    let plain = scan(std::slice::from_ref(&top), &ScanOptions::default());
    assert_eq!(plain.files, vec![top.join("a.png"), top.join("sub/b.jpg")]);
    assert_eq!(plain.skipped.len(), 3, "{:?}", plain.skipped);
    for link in ["self", "sub/up", "out"] {
        assert_eq!(*skipped_reason(&plain.skipped, &top.join(link)), SkipReason::SymlinkedDirectory);
    }
    assert!(plain.missing.is_empty() && plain.refused.is_empty());

    let followed = scan(std::slice::from_ref(&top), &ScanOptions { follow_symlinks: true });
    assert_eq!(followed.files, vec![top.join("a.png"), top.join("out/c.jpg"), top.join("sub/b.jpg")]);
    let again = SkipReason::DirectoryAlreadyScanned { first: top.clone() };
    for link in ["self", "sub/up", "out/back"] {
        assert_eq!(*skipped_reason(&followed.skipped, &top.join(link)), again, "{link}");
    }
    assert_eq!(followed.skipped.len(), 3, "{:?}", followed.skipped);
}

#[test]
fn scan_lists_each_file_once_however_it_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top");
    touch(&top.join("a.png"));
    std::fs::hard_link(top.join("a.png"), top.join("hard.png")).unwrap();
    symlink("a.png", top.join("soft.jpg")).unwrap();
    touch(&top.join("b.JPG"));
    touch(&top.join("notes.txt"));

    let found = scan(&[top.clone(), top.join("a.png"), top.join("b.JPG"), top.clone()], &ScanOptions::default());
    assert_eq!(found.files, vec![top.join("a.png"), top.join("b.JPG")]);
    let duplicate = SkipReason::Duplicate { first: top.join("a.png") };
    assert_eq!(
        found.skipped,
        vec![
            (top.join("hard.png"), duplicate.clone()),
            (top.join("soft.jpg"), duplicate.clone()),
            (top.join("a.png"), duplicate),
            (top.join("b.JPG"), SkipReason::Duplicate { first: top.join("b.JPG") }),
            (top.clone(), SkipReason::DirectoryAlreadyScanned { first: top.clone() }),
        ]
    );
    // A file given explicitly is taken whatever its extension.
    assert_eq!(scan(&[top.join("notes.txt")], &ScanOptions::default()).files, vec![top.join("notes.txt")]);
}

#[test]
fn scan_never_opens_special_files_and_refuses_explicit_ones() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top");
    touch(&top.join("a.png"));
    mkfifo(&top.join("fifo.jpg"));
    mkfifo(&top.join("fifo.txt")); // no image extension: not looked at
    let _socket = std::os::unix::net::UnixListener::bind(top.join("socket.png")).unwrap();
    symlink("gone.jpg", top.join("broken.jpg")).unwrap();
    let explicit_fifo = dir.path().join("camera.jpg");
    mkfifo(&explicit_fifo);

    let inputs = [top.clone(), explicit_fifo.clone(), PathBuf::from("/dev/zero"), dir.path().join("nothing.jpg")];
    let found = scan(&inputs, &ScanOptions::default());
    assert_eq!(found.files, vec![top.join("a.png")]);
    assert_eq!(found.missing, vec![dir.path().join("nothing.jpg")]);
    let fifo = SkipReason::NotRegularFile { kind: "FIFO (named pipe)" };
    assert_eq!(
        found.skipped,
        vec![
            (top.join("broken.jpg"), SkipReason::BrokenSymlink),
            (top.join("fifo.jpg"), fifo.clone()),
            (top.join("socket.png"), SkipReason::NotRegularFile { kind: "socket" }),
        ]
    );
    assert_eq!(
        found.refused,
        vec![(explicit_fifo, fifo), (PathBuf::from("/dev/zero"), SkipReason::NotRegularFile { kind: "character device" })]
    );
    assert_eq!(
        found.refused[1].1.to_string(),
        "not a regular file but a character device; only image files are read (it is never opened)"
    );
}

/// Runs `decode_file` on a thread, failing the test if it does not return within 10 s.
fn decode_bounded(path: &Path, limits: DecodeLimits) -> String {
    let (sender, receiver) = std::sync::mpsc::channel();
    let owned = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = sender.send(decode_file(&owned, &limits).map(|_| ()).map_err(|error| error.to_string()));
    });
    match receiver.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(message)) => message,
        Ok(Ok(())) => panic!("{} decoded as an image", path.display()),
        Err(_) => panic!("decode_file({}) did not return within 10 s", path.display()),
    }
}

#[test]
fn decode_file_refuses_fifos_and_devices_without_blocking_or_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("live.jpg");
    mkfifo(&fifo);
    let small = DecodeLimits { max_alloc_bytes: 1 << 20, ..DecodeLimits::default() };
    let message = decode_bounded(&fifo, small);
    assert!(message.starts_with("not a regular file but a FIFO (named pipe)"), "{message}");
    let message = decode_bounded(Path::new("/dev/zero"), small);
    assert!(message.starts_with("not a regular file but a character device"), "{message}");
}

#[test]
fn decode_file_caps_the_bytes_actually_read() {
    // /proc files report a size of 0 but have content: only the bytes read can be capped.
    let status = Path::new("/proc/self/status");
    assert_eq!(std::fs::metadata(status).unwrap().len(), 0);
    let message = decode_bounded(status, DecodeLimits { max_alloc_bytes: 64, ..DecodeLimits::default() });
    assert!(message.starts_with("reading the file gave more than the decode memory limit of 64 bytes"), "{message}");
}
