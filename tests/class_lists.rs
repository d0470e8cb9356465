//! Class lists through `cac-edge cache build` on the test bundle: a byte-order mark, a list of
//! one class, names that are the same class for the model (case, spacing, Unicode form) and
//! names that tokenize identically once cut to the context length.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// The fixture's deployed classes (12), without its comment line.
fn fixture_classes() -> Vec<String> {
    std::fs::read_to_string(fixture("classes.txt"))
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn cache_build(classes: &Path, base: &Path, output: &Path) -> Output {
    cache_build_cli(&bundle_dir(), classes, base, output)
}

/// `cache info`'s `key: value` line for `key`.
fn info_value(cache: &Path, key: &str) -> String {
    let output = cac_edge(&["cache", "info", "--cache", cache.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let prefix = format!("{key}: ");
    text(&output.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(str::to_string)).unwrap()
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_first_class_name() {
    let dir = tempfile::tempdir().unwrap();
    let names = fixture_classes().join("\n") + "\n";
    let plain = write(dir.path(), "classes.txt", &names);
    let bom = write(dir.path(), "classes-bom.txt", &format!("\u{feff}{names}"));
    let bom_base = write(dir.path(), "base-bom.txt", "\u{feff}cat\nrocket\ncoffee mug\nbuilding\nfire truck\ndog\n");

    let reference = dir.path().join("plain.safetensors");
    let output = cache_build(&plain, &fixture("base.txt"), &reference);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for (classes, base, name) in
        [(&bom, &fixture("base.txt"), "a.safetensors"), (&bom, &bom_base, "b.safetensors"), (&plain, &bom_base, "c.safetensors")]
    {
        let cache = dir.path().join(name);
        let output = cache_build(classes, base, &cache);
        assert!(output.status.success(), "{} + {}: {}", classes.display(), base.display(), text(&output.stderr));
        // The same classes, base flags and features as the list without the mark.
        assert_eq!(info_value(&cache, "class 0"), "cat (base, dac factor 1.0000)");
        for key in ["source_hash", "data_sha256"] {
            assert_eq!(info_value(&cache, key), info_value(&reference, key), "{name}: {key}");
        }
    }
}

#[test]
fn a_list_of_one_class_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let classes = write(dir.path(), "one.txt", "# the only thing this camera sees\ncat\n");
    let output = cache_build(&classes, &classes, &dir.path().join("c.safetensors"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}: only 1 class", classes.display())), "{stderr}");
    assert!(stderr.contains("at least two") && stderr.contains("confidence 1.0"), "{stderr}");
    assert!(!dir.path().join("c.safetensors").exists());
}

#[test]
fn names_that_differ_only_in_case_spacing_or_unicode_form_are_refused_naming_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture's 12 classes are on lines 1-12; "fire truck" on line 10, "dog" on 11.
    for near in ["Dog", "DOG", "fire  truck", "fire\ttruck", "fire\u{a0}truck", "ｄｏｇ", "fire\u{2003}Truck"] {
        let classes = write(dir.path(), "classes.txt", &format!("{}\n{near}\n", fixture_classes().join("\n")));
        let output = cache_build(&classes, &fixture("base.txt"), &dir.path().join("c.safetensors"));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{near:?}: {stderr}");
        let first_line = if near.to_lowercase().contains("fire") { 10 } else { 11 };
        assert!(stderr.contains(&format!("{}:13: class '{near}'", classes.display())), "{near:?}: {stderr}");
        assert!(stderr.contains(&format!("(line {first_line})")), "{near:?}: {stderr}");
        assert!(stderr.contains("only in case, spacing or Unicode form") && stderr.contains("rename or remove one"), "{stderr}");
        assert!(!dir.path().join("c.safetensors").exists());
    }
    // Composed and decomposed é: the same text in two Unicode normal forms.
    let classes = write(dir.path(), "classes.txt", "caf\u{e9}\ncat\ncafe\u{301}\n");
    let output = cache_build(&classes, &write(dir.path(), "base.txt", "cat\n"), &dir.path().join("c.safetensors"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("classes.txt:3") && stderr.contains("(line 1)"), "{stderr}");
}

#[test]
fn names_that_tokenize_identically_within_the_context_length_are_refused() {
    // The test bundle's context is 77 tokens: "a photo of a {}." keeps the first 71 tokens of a name.
    let dir = tempfile::tempdir().unwrap();
    let prefix = vec!["red"; 80].join(" ");
    let mut names = fixture_classes();
    names.push(format!("{prefix} apple"));
    names.push(format!("{prefix} fox"));
    let classes = write(dir.path(), "classes.txt", &(names.join("\n") + "\n"));
    let output = cache_build(&classes, &fixture("base.txt"), &dir.path().join("c.safetensors"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&classes.display().to_string()), "{stderr}");
    assert!(stderr.contains(&format!("class 13 '{prefix} apple' and class 14 '{prefix} fox'")), "{stderr}");
    assert!(stderr.contains("context length of 77 tokens") && stderr.contains("rename or remove one"), "{stderr}");
    assert!(!dir.path().join("c.safetensors").exists());

    // Names that differ within the kept tokens are fine.
    names.pop();
    names.push(format!("fox {prefix}"));
    let classes = write(dir.path(), "classes.txt", &(names.join("\n") + "\n"));
    let output = cache_build(&classes, &fixture("base.txt"), &dir.path().join("c.safetensors"));
    assert!(output.status.success(), "{}", text(&output.stderr));
}
