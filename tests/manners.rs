//! The manners of a command line people live with, each checked through the binary: file
//! permissions that follow the umask, each OS error said once, a missing cache that says how to
//! build one, quiet stops on a closed pipe, no silent "0 images", a stderr that cannot be written
//! never stopping the results, `--version`, completions, the man page, and doctor's two faces.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// `command` run under `sh -c 'umask MASK; exec …'`, so the binary inherits that umask.
fn with_umask(mask: &str, command: &Command) -> std::process::Output {
    let mut shell = Command::new("sh");
    shell.arg("-c").arg(format!("umask {mask} && exec \"$@\"")).arg("sh").arg(command.get_program());
    shell.args(command.get_args());
    run_bounded(&mut shell)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn caches_are_written_with_the_umask_not_0600() {
    let dir = tempfile::tempdir().unwrap();
    // What a build killed mid-write leaves (its pid long gone): the next write removes it.
    let stale = dir.path().join(format!(".cache-022.safetensors.cac-edge-tmp-{}-0", u32::MAX - 1));
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    for (mask, expected) in [("022", 0o644), ("027", 0o640)] {
        let cache = dir.path().join(format!("cache-{mask}.safetensors"));
        let output = with_umask(mask, &cache_build_command(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache));
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert_eq!(mode(&cache), expected, "umask {mask}: mode {:o}", mode(&cache));
    }
    // Nothing but the two caches is left in the folder: no temporary file, the stale one removed.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn an_os_error_appears_once_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-classes.txt");
    let output = cache_build_cli(&bundle_dir(), &missing, &fixture("base.txt"), &dir.path().join("c.safetensors"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-classes.txt"), "{stderr}");
}

#[test]
fn a_missing_cache_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("never-built.safetensors");
    let output = classify_command(&cache).args(["--device", "cpu"]).arg(fixture("images/photos/chelsea.png")).output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("never-built.safetensors") && stderr.contains("no cache here yet"), "{stderr}");
    assert!(stderr.contains("cac-edge cache build --bundle"), "{stderr}");
    assert!(output.stdout.is_empty());
}

/// The README's commands use the cache path that `cache build` writes by default.
#[test]
fn the_readme_names_the_cache_that_cache_build_writes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let manifest = std::fs::read_to_string(root.join("onnx/demo/bundle.toml")).unwrap();
    let name = manifest.lines().find_map(|line| line.strip_prefix("name = ")).unwrap().trim_matches('"');
    let expected = format!("calibration-cache/{name}.safetensors");
    let mentions: Vec<&str> = readme
        .split(|c: char| c.is_whitespace() || c == '`')
        .filter(|word| word.starts_with("calibration-cache/") && word.ends_with(".safetensors") && !word.contains('<'))
        .collect();
    assert!(!mentions.is_empty(), "the README shows a cache path");
    for mention in mentions {
        assert_eq!(mention, expected);
    }
}

/// `cac-edge classify … | head -1`: the reader leaves after one line; cac-edge stops at once and
/// quietly (exit 0, nothing on stderr), like ripgrep, instead of "error: Broken pipe" and exit 2
/// while the run goes on.
#[test]
fn a_closed_stdout_stops_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    // More lines than a pipe buffers (64 KiB), so the writer meets the closed pipe.
    let images = dir.path().join("many");
    std::fs::create_dir(&images).unwrap();
    let photo = std::fs::read(fixture("images/modes/tiny.png")).unwrap();
    for index in 0..400 {
        std::fs::write(images.join(format!("{index:03}.png")), &photo).unwrap();
    }
    let mut child = classify_command(&cache)
        .args(["--device", "cpu", "--threads", "1", "--batch-size", "1"])
        .arg(&images)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("\"label\""), "{first}");
    // The reader is gone (dropped above, like `head -1` exiting).
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error") && !stderr.contains("Broken pipe") && !stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("400 images"), "the run stopped instead of going on: {stderr}");
}

#[test]
fn no_image_found_is_exit_1_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    let output = classify_command(&cache).args(["--device", "cpu"]).arg(&empty).output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no image files found") && stderr.contains("empty"), "{stderr}");
    assert!(output.stdout.is_empty());
}

/// A camera box whose log disk is full: every result is still written, the exit code still says
/// what happened, and nothing panics (before: exit 101 at the first message, 2 of 21 images out).
#[test]
fn a_stderr_that_cannot_be_written_does_not_stop_the_results() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let output = classify_command(&cache)
        .args(["--device", "auto"])
        .args([fixture("images/photos"), fixture("images/bad")])
        .stderr(full)
        .output()
        .unwrap();
    let lines = json_lines(&output);
    let photos = std::fs::read_dir(fixture("images/photos")).unwrap().count();
    let bad = std::fs::read_dir(fixture("images/bad")).unwrap().count();
    assert_eq!(lines.len(), photos + bad, "every image has its line");
    assert_eq!(lines.iter().filter(|line| line.get("error").is_some()).count(), bad);
    assert_eq!(output.status.code(), Some(1), "some images failed: exit 1, not a panic's 101");
}

/// `cache build … | true`: the cache is written, the closed stdout is no error.
#[test]
fn cache_build_into_a_closed_pipe_succeeds_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("c.safetensors");
    let mut child = cache_build_command(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("error"), "{stderr}");
    assert!(cache.is_file());
}

#[test]
fn version_names_the_commit_the_ort_api_level_and_the_features() {
    let output = cac_edge(&["--version"]);
    let version = text(&output.stdout);
    assert!(output.status.success());
    assert!(version.starts_with(&format!("cac-edge {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    assert!(version.contains("ONNX Runtime API level 17+"), "{version}");
    let features = version.split("features: ").nth(1).unwrap_or_default();
    assert!(features.contains("cli") && features.contains("tooling"), "{version}");
    let commit = version.split("(commit ").nth(1).unwrap().split(';').next().unwrap();
    assert!(commit == "unknown" || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{version}");
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let bash = cac_edge(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = text(&bash.stdout);
    assert!(script.contains("_cac__edge()") && script.contains("classify") && script.contains("--max-image-side"), "{script}");
    let man = cac_edge(&["man"]);
    assert!(man.status.success());
    let page = text(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH cac-edge"), "{page}");
    assert!(page.contains("classify"), "{page}");
}

#[test]
fn doctor_speaks_text_by_default_and_json_when_asked() {
    let text_output = cac_edge(&["doctor", "--device", "cpu"]);
    assert!(text_output.status.success(), "{}", text(&text_output.stderr));
    let shown = text(&text_output.stdout);
    assert!(shown.contains("[ok  ] machine") && shown.contains("[ok  ] onnxruntime"), "{shown}");
    let json_output = cac_edge(&["doctor", "--device", "cpu", "--json"]);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&json_output.stdout).expect("doctor --json is JSON");
    assert!(checks.iter().any(|check| check["name"] == "machine" && check["status"] == "ok"));

    // No library: the fix speaks to someone with an installed binary, not a source checkout.
    let missing = command().args(["doctor", "--ort-lib", "/nonexistent/libonnxruntime.so"]).output().unwrap();
    let shown = text(&missing.stdout);
    assert_eq!(missing.status.code(), Some(2), "{shown}");
    assert!(shown.contains("[FAIL] onnxruntime") && shown.contains("ORT_DYLIB_PATH") && shown.contains("PyPI"), "{shown}");
}

#[test]
fn bench_needs_its_images_and_absurd_options_are_refused_at_parse_time() {
    let refuse = |args: &[&str], expected: &str| {
        let output = cac_edge(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"));
    };
    refuse(&["bench", "--bundle", "b", "--cache", "c"], "required");
    let classify = |extra: &[&'static str]| [&["classify", "--bundle", "b", "--cache", "c", "x.jpg"], extra].concat();
    refuse(&classify(&["--threads", "100000"]), "--threads");
    refuse(&classify(&["--threads", "0"]), "--threads");
    refuse(&classify(&["--max-image-side", "0"]), "--max-image-side");
    refuse(&classify(&["--threshold", "1.5"]), "--threshold");
    refuse(&classify(&["--batch-size", "0"]), "--batch-size");
    refuse(&classify(&["--calibration", "platt"]), "expected none, cac, ts or dac");
}

#[test]
fn quiet_leaves_only_errors_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/chelsea.png");
    let run = |quiet: bool| {
        let mut command = classify_command(&cache);
        command.args(["--device", "auto"]).arg(&photo);
        if quiet {
            command.arg("-q");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stderr)
    };
    let normal = run(false);
    assert!(normal.contains("1 images: ") && normal.contains("running on CPU"), "{normal}");
    assert_eq!(run(true), "");
}

/// A damaged feature row under --no-verify is used as is: the run says that it did not check.
#[test]
fn no_verify_is_said_on_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/chelsea.png");
    let run = |extra: &[&str]| {
        let output = classify_command(&cache).args(["--device", "cpu"]).args(extra).arg(&photo).output().unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stderr)
    };
    assert!(run(&["--no-verify"]).contains("warning: --no-verify: the cache data and the image encoders were not checked"));
    assert!(!run(&[]).contains("--no-verify"));
}

/// ONNX Runtime's own log lines go through the same filter and format as cac-edge's (no raw
/// coloured lines), and a batch in which every image failed never reaches the encoder (before: a
/// red "Reshape" error from running it on zero images).
#[test]
fn onnx_runtime_logs_go_through_tracing_and_failed_batches_skip_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let classify = |filter: Option<&str>, images: &Path| {
        let mut command = classify_command(&cache);
        command.args(["--device", "cpu"]).arg(images).env_remove("RUST_LOG");
        if let Some(filter) = filter {
            command.env("RUST_LOG", filter);
        }
        let output = command.output().unwrap();
        (output.status.code(), text(&output.stderr))
    };
    let photo = fixture("images/photos/chelsea.png");
    let (code, stderr) = classify(Some("ort=info"), &photo);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.lines().any(|line| line.starts_with("ort::")), "ONNX Runtime's lines under the ort target: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "no terminal colour codes: {stderr:?}");
    let (_, quiet_by_default) = classify(None, &photo);
    assert!(!quiet_by_default.contains("ort::"), "{quiet_by_default}");

    // Warnings and errors of ONNX Runtime are shown by default: a run on zero images would log one.
    let (code, stderr) = classify(None, &fixture("images/bad"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("Reshape") && !stderr.contains("ort::"), "{stderr}");
}

/// The package is publishable as declared: its licence files exist, it says where it comes from,
/// the fixtures and the demo bundle stay out of the published crate, and release binaries are
/// stripped.
#[test]
fn the_manifest_declares_what_a_published_crate_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let package = manifest["package"].as_table().unwrap();
    assert_eq!(package["license"].as_str(), Some("MIT OR Apache-2.0"));
    for licence in ["LICENSE-MIT", "LICENSE-APACHE"] {
        let text = std::fs::read_to_string(root.join(licence)).unwrap();
        assert!(text.contains("Permission is hereby granted") || text.contains("Apache License"), "{licence}");
    }
    for key in ["repository", "keywords", "categories", "readme", "description"] {
        assert!(package.contains_key(key), "package.{key}");
    }
    let exclude: Vec<&str> = package["exclude"].as_array().unwrap().iter().filter_map(|value| value.as_str()).collect();
    for heavy in ["/tests", "/onnx", "/calibration-cache"] {
        assert!(exclude.contains(&heavy), "{heavy} excluded from the published crate");
    }
    assert_eq!(manifest["profile"]["release"]["strip"].as_bool(), Some(true));
}

/// Two `cache build` runs to one path at once: both succeed, the result is one whole cache, and
/// no temporary file is left (writers of a directory hold a lock for the write and the rename).
#[test]
fn concurrent_cache_builds_leave_one_whole_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shared.safetensors");
    let start = || {
        cache_build_command(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (start(), start());
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let info = cac_edge(&["cache", "info", "--cache", cache.to_str().unwrap()]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    assert!(text(&info.stdout).contains("num_classes: 12"));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("shared.safetensors")]);
}
