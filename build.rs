//! Records what `cac-edge --version` reports: the git commit the binary was built from and the
//! cargo features it was built with (a field engineer's first question about a box).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|commit| commit.trim().to_string())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(key, _)| key.strip_prefix("CARGO_FEATURE_").map(|name| name.to_lowercase().replace('_', "-")))
        .filter(|name| name != "default")
        .collect();
    features.sort();
    println!("cargo:rustc-env=CAC_EDGE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=CAC_EDGE_FEATURES={}", features.join(","));
    // A new commit changes HEAD (detached) or the branch it points to; both are watched.
    for path in git_paths_to_watch() {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// .git/HEAD and the ref it names, when this is a git checkout (not in a published crate).
fn git_paths_to_watch() -> Vec<String> {
    let git_dir = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|dir| dir.trim().to_string());
    let Some(git_dir) = git_dir else { return Vec::new() };
    let head = format!("{git_dir}/HEAD");
    let mut paths = vec![head.clone()];
    if let Some(reference) =
        std::fs::read_to_string(&head).ok().and_then(|text| text.strip_prefix("ref: ").map(|r| r.trim().to_string()))
    {
        paths.push(format!("{git_dir}/{reference}"));
    }
    paths
}
