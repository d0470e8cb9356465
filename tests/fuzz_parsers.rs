//! Mutation fuzzing, on stable Rust, of every parser a camera box runs on files from disk: the
//! bundle manifest, the text-feature cache, the class lists, the tokenizer and the image
//! decoders. Each must return an error, never panic, never hang (the harness's watchdog, see
//! tests/fuzzing/mod.rs) and never allocate without bound (tests/alloc_budget.rs measures that).
//! Whatever they accept must satisfy the invariants the rest of the program relies on.
//!
//! `cargo test --test fuzz_parsers` runs a modest number of cases; `PROPTEST_CASES=N` scales
//! them and `scripts/fuzz` runs them for a time budget. Failures are kept in
//! `proptest-regressions/fuzz_parsers.txt` and replayed first.

mod fuzzing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cac_edge::bundle::{Bundle, BundleError};
use cac_edge::cache::{write_cache, CacheContents, CacheError, CacheOpenOptions, ClassList, FeaturePrecision, TextFeatureCache};
use cac_edge::calibrate::dac_factors;
use cac_edge::preprocess::{decode_bytes, preprocess, DecodeLimits, PreprocessConfig};
use cac_edge::tokenize::{ClipTokenizer, END_OF_TEXT, START_OF_TEXT};
use fuzzing::{apply, check, mutations, Mutation};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use sha2::{Digest, Sha256};

const REGRESSIONS: &str = "fuzz_parsers";

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(relative)
}

fn read_fixture(relative: &str) -> Vec<u8> {
    let path = fixture(relative);
    std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Maps any error to a property failure, so a panic is the only other way out.
fn failed(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

// ========================================================================= bundle manifest

/// A temporary bundle: the fixture's encoders and tokenizer (symlinked) under a bundle.toml
/// that each case overwrites.
struct ScratchBundle {
    dir: tempfile::TempDir,
}

impl ScratchBundle {
    fn new() -> ScratchBundle {
        let dir = tempfile::tempdir().expect("temporary directory");
        for name in ["tokenizer.json", "image_zs.onnx", "text_zs.onnx", "text_ft.onnx"] {
            std::os::unix::fs::symlink(fixture("bundle-tiny").join(name), dir.path().join(name)).expect("symlink fixture");
        }
        ScratchBundle { dir }
    }

    fn open_with_manifest(&self, manifest: &[u8]) -> Result<Bundle, BundleError> {
        std::fs::write(self.dir.path().join("bundle.toml"), manifest).expect("write bundle.toml");
        Bundle::open(self.dir.path())
    }
}

fn fixture_manifest() -> Vec<u8> {
    read_fixture("bundle-tiny/bundle.toml")
}

/// What the encoders, tokenizer and preprocessing rely on once `Bundle::open` has accepted a
/// manifest.
fn check_opened_bundle(bundle: &Bundle) -> Result<(), TestCaseError> {
    let manifest = bundle.manifest();
    prop_assert!(bundle.embed_dim() > 0);
    prop_assert!(bundle.context_length() >= 2);
    for (role, model) in [("zero_shot", &manifest.zero_shot), ("fine_tuned", &manifest.fine_tuned)] {
        prop_assert_eq!(model.template.matches("{}").count(), 1, "{} template {:?}", role, model.template);
        prop_assert!(model.logit_scale.is_finite() && model.logit_scale > 0.0, "{} logit_scale {}", role, model.logit_scale);
    }
    let mut referenced = vec![bundle.tokenizer_path(), bundle.image_zs_path(), bundle.text_zs_path(), bundle.text_ft_path()];
    referenced.extend(bundle.image_ft_path());
    for path in referenced {
        prop_assert!(path.starts_with(bundle.dir()) && path.is_file(), "{} is not a file inside the bundle", path.display());
    }
    // The preprocessing the bundle declares must be usable: a tiny image goes through it.
    let mut config = bundle.preprocess_config();
    prop_assert!(config.image_size > 0);
    config.image_size = config.image_size.min(8); // the side the model checks later; keep it cheap here
    let tensor = preprocess(&RgbImage::from_pixel(3, 2, Rgb([10, 128, 250])), &config).map_err(|error| {
        failed(format!("bundle opened but its preprocessing is refused: {error}; preprocess {:?}", manifest.preprocess))
    })?;
    prop_assert!(tensor.iter().all(|value| value.is_finite()), "non-finite tensor from mean/std {:?}", manifest.preprocess);
    Ok(())
}

fn bundle_property(bundle: &ScratchBundle, manifest: &[u8]) -> Result<(), TestCaseError> {
    match bundle.open_with_manifest(manifest) {
        Ok(opened) => check_opened_bundle(&opened),
        Err(BundleError::ManifestRead { .. } | BundleError::ManifestInvalid { .. } | BundleError::FileMissing { .. }) => Ok(()),
        Err(other) => Err(failed(format!("Bundle::open only reads the manifest, yet failed with {other}"))),
    }
}

#[test]
fn fixture_manifest_opens_in_the_scratch_bundle() {
    // Guards the fuzz tests below: mutations must start from a manifest that is accepted.
    let bundle = ScratchBundle::new();
    let opened = bundle.open_with_manifest(&fixture_manifest()).expect("fixture manifest");
    assert_eq!(opened.name(), "tiny-test");
    check_opened_bundle(&opened).expect("fixture bundle invariants");
}

#[test]
fn bundle_manifest_survives_byte_mutations() {
    let bundle = ScratchBundle::new();
    let original = fixture_manifest();
    check("bundle_manifest_byte_mutations", REGRESSIONS, 2.0, mutations(original.len(), 8), |edits| {
        bundle_property(&bundle, &apply(&original, &edits))
    });
}

#[test]
fn bundle_manifest_survives_arbitrary_bytes_and_text() {
    let bundle = ScratchBundle::new();
    let input = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        proptest::collection::vec(proptest::char::any(), 0..512)
            .prop_map(|chars| chars.into_iter().collect::<String>().into_bytes()),
    ];
    check("bundle_manifest_arbitrary", REGRESSIONS, 1.0, input, |bytes| bundle_property(&bundle, &bytes));
}

/// Replacement values for manifest fields: wrong types, limits, NaN/inf, path escapes, and
/// templates with zero or two placeholders.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    use toml::Value;
    prop_oneof![
        select(vec![0i64, 1, 2, -1, i64::MAX, i64::MIN, u32::MAX as i64, u32::MAX as i64 + 1, 77, 224, 65536])
            .prop_map(Value::Integer),
        select(vec![0.0, -0.0, -1.0, 1e-45, 1e39, f64::MAX, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 100.0])
            .prop_map(Value::Float),
        select(vec![
            "", "{}", "{}{}", "no placeholder", "../tokenizer.json", "/etc/passwd", "tokenizer.json", "image_zs.onnx", ".",
            "./image_zs.onnx", "a/../image_zs.onnx", "bicubic", "bilinear", "cac-edge-bundle", "\u{0}", "é{}",
        ])
        .prop_map(|text| Value::String(text.to_string())),
        any::<String>().prop_map(Value::String),
        any::<bool>().prop_map(Value::Boolean),
        proptest::collection::vec(select(vec![0.5, f64::NAN, 0.0, -1.0, f64::INFINITY]).prop_map(Value::Float), 0..5)
            .prop_map(Value::Array),
        Just(Value::Table(toml::Table::new())),
    ]
}

#[derive(Debug, Clone)]
enum TomlEdit {
    Set { field: Index, value: toml::Value },
    Remove { field: Index },
    Add { table: Index, key: String, value: toml::Value },
}

fn toml_edit() -> impl Strategy<Value = TomlEdit> {
    prop_oneof![
        3 => (any::<Index>(), toml_value()).prop_map(|(field, value)| TomlEdit::Set { field, value }),
        1 => any::<Index>().prop_map(|field| TomlEdit::Remove { field }),
        1 => (any::<Index>(), select(vec!["image_encoder", "method", "extra", "lambda1", "alpha"]), toml_value())
            .prop_map(|(table, key, value)| TomlEdit::Add { table, key: key.to_string(), value }),
    ]
}

/// Paths (key sequences) of every value in the table, depth first; tables themselves included.
fn toml_paths(table: &toml::Table, prefix: &[String], out: &mut Vec<Vec<String>>, tables: &mut Vec<Vec<String>>) {
    tables.push(prefix.to_vec());
    for (key, value) in table {
        let mut path = prefix.to_vec();
        path.push(key.clone());
        out.push(path.clone());
        if let toml::Value::Table(inner) = value {
            toml_paths(inner, &path, out, tables);
        }
    }
}

fn toml_table_at<'a>(table: &'a mut toml::Table, path: &[String]) -> &'a mut toml::Table {
    match path.split_first() {
        None => table,
        Some((first, rest)) => match table.get_mut(first) {
            Some(toml::Value::Table(inner)) => toml_table_at(inner, rest),
            _ => unreachable!("paths come from toml_paths"),
        },
    }
}

fn apply_toml_edits(original: &toml::Table, edits: &[TomlEdit]) -> toml::Table {
    let mut table = original.clone();
    for edit in edits {
        let (mut fields, mut tables) = (Vec::new(), Vec::new());
        toml_paths(&table, &[], &mut fields, &mut tables);
        match edit {
            TomlEdit::Set { field, value } if !fields.is_empty() => {
                let path = &fields[field.index(fields.len())];
                let (key, parent) = path.split_last().expect("non-empty path");
                toml_table_at(&mut table, parent).insert(key.clone(), value.clone());
            }
            TomlEdit::Remove { field } if !fields.is_empty() => {
                let path = &fields[field.index(fields.len())];
                let (key, parent) = path.split_last().expect("non-empty path");
                toml_table_at(&mut table, parent).remove(key);
            }
            TomlEdit::Add { table: at, key, value } => {
                let path = &tables[at.index(tables.len())];
                toml_table_at(&mut table, path).insert(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    table
}

#[test]
fn bundle_manifest_survives_field_mutations() {
    // Byte mutations mostly break the TOML syntax; these keep it valid and attack the checks.
    let bundle = ScratchBundle::new();
    let original: toml::Table =
        toml::from_str(&String::from_utf8(fixture_manifest()).expect("UTF-8 fixture")).expect("fixture TOML");
    check("bundle_manifest_field_mutations", REGRESSIONS, 4.0, proptest::collection::vec(toml_edit(), 1..4), |edits| {
        let table = apply_toml_edits(&original, &edits);
        // A table the serialiser refuses (e.g. after a NaN in an odd place) is not an input.
        let Ok(text) = toml::to_string(&table) else { return Ok(()) };
        bundle_property(&bundle, text.as_bytes())
    });
}

#[test]
fn deeply_nested_manifest_is_an_error_not_a_stack_overflow() {
    let bundle = ScratchBundle::new();
    for depth in [1_000, 100_000] {
        let arrays = format!("x = {}{}\n", "[".repeat(depth), "]".repeat(depth));
        let tables = format!("x = {}{}\n", "{a = ".repeat(depth), "}".repeat(depth));
        for manifest in [arrays, tables] {
            let error = bundle.open_with_manifest(manifest.as_bytes()).expect_err("nested garbage opened as a bundle");
            assert!(matches!(error, BundleError::ManifestInvalid { .. }), "depth {depth}: {error}");
        }
    }
}

// ============================================================================ cache file

const CACHE_CLASSES: [&str; 6] = ["red circle", "blue square", "green triangle", "black star", "white ring", "brown arrow"];

fn cache_class_list() -> ClassList {
    ClassList {
        names: CACHE_CLASSES.iter().map(|name| name.to_string()).collect(),
        is_base: vec![true, true, true, false, false, true],
    }
}

/// A real cache, written by `write_cache` (no ONNX Runtime needed): deterministic L2-normalised
/// features, DAC factors computed from them.
fn real_cache_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let classes = cache_class_list();
        let (count, dim) = (classes.names.len(), 16);
        let mut features = Array2::from_shape_fn((2 * count, dim), |(row, col)| ((row * 31 + col * 7) % 13) as f32 - 6.0);
        for mut row in features.rows_mut() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.mapv_inplace(|v| v / norm);
        }
        let factors =
            dac_factors(features.slice(ndarray::s![..count, ..]), features.slice(ndarray::s![count.., ..]), &classes.is_base);
        let contents = CacheContents {
            classes: &classes,
            stacked_text: features.view(),
            feature_precision: FeaturePrecision::F32,
            dac_factors: &factors,
            logit_scale_zs: 100.0,
            logit_scale_ft: 100.0,
            source_hash: "0".repeat(64),
            bundle_name: "fuzz",
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("cache.safetensors");
        write_cache(&path, &contents).expect("write the seed cache");
        std::fs::read(&path).expect("read the seed cache")
    })
}

fn header_len(bytes: &[u8]) -> usize {
    bytes.get(..8).map_or(0, |prefix| u64::from_le_bytes(prefix.try_into().expect("8 bytes")) as usize)
}

/// What every user of an opened cache relies on; the accessors must not panic either.
fn check_opened_cache(cache: &TextFeatureCache) -> Result<(), TestCaseError> {
    let classes = cache.num_classes();
    prop_assert!(classes >= 1);
    prop_assert_eq!(cache.class_names().len(), classes);
    let features = cache.stacked_text_features();
    prop_assert_eq!(features.dim(), (2 * classes, cache.embed_dim()));
    prop_assert_eq!(cache.dac_factors().len(), classes);
    prop_assert!(cache.logit_scale_zs().is_finite() && cache.logit_scale_zs() > 0.0);
    prop_assert!(cache.logit_scale_ft().is_finite() && cache.logit_scale_ft() > 0.0);
    let list = cache.class_list();
    prop_assert_eq!(list.names.len(), classes);
    prop_assert_eq!(list.is_base.len(), classes);
    let _ = (cache.source_hash(), cache.stored_temperature(), cache.metadata().len());
    Ok(())
}

struct ScratchFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ScratchFile {
    fn new(name: &str) -> ScratchFile {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(name);
        ScratchFile { _dir: dir, path }
    }
}

fn cache_property(scratch: &ScratchFile, bytes: &[u8]) -> Result<(), TestCaseError> {
    std::fs::write(&scratch.path, bytes).expect("write the mutated cache");
    for verify_checksum in [true, false] {
        match TextFeatureCache::open(&scratch.path, CacheOpenOptions { verify_checksum }) {
            Ok(cache) => check_opened_cache(&cache)?,
            Err(CacheError::Invalid { .. } | CacheError::Version { .. } | CacheError::Corrupt { .. }) => {}
            Err(other) => return Err(failed(format!("unexpected kind of error for a damaged cache: {other}"))),
        }
    }
    Ok(())
}

#[test]
fn seed_cache_opens_and_mutations_are_refused_or_consistent() {
    let bytes = real_cache_bytes();
    let scratch = ScratchFile::new("seed.safetensors");
    std::fs::write(&scratch.path, bytes).expect("write");
    let cache = TextFeatureCache::open(&scratch.path, CacheOpenOptions::default()).expect("the seed cache opens");
    assert_eq!(cache.class_list(), cache_class_list());
    check_opened_cache(&cache).expect("seed cache invariants");
}

#[test]
fn cache_survives_byte_mutations() {
    let bytes = real_cache_bytes();
    let scratch = ScratchFile::new("mutated.safetensors");
    // Hot region: the 8-byte length and the JSON header.
    let hot = 8 + header_len(bytes);
    check("cache_byte_mutations", REGRESSIONS, 4.0, mutations(hot, 6), |edits| cache_property(&scratch, &apply(bytes, &edits)));
}

#[test]
fn cache_survives_header_length_forgeries() {
    let bytes = real_cache_bytes();
    let scratch = ScratchFile::new("length.safetensors");
    let length = prop_oneof![select(fuzzing::INTERESTING.to_vec()), any::<u64>(), (0u64..2 * bytes.len() as u64)];
    check("cache_header_length", REGRESSIONS, 1.0, length, |length| {
        let mut forged = bytes.to_vec();
        forged[..8].copy_from_slice(&length.to_le_bytes());
        cache_property(&scratch, &forged)
    });
}

/// Edits of the parsed JSON header: shapes, dtypes, data offsets and metadata values, written
/// back as a well-formed safetensors file (with the checksum recomputed when `fix_checksum`),
/// so that the checks after the safetensors parser are reached.
#[derive(Debug, Clone)]
enum JsonEdit {
    Set { leaf: Index, value: serde_json::Value },
    Nudge { leaf: Index, delta: i64 },
    Remove { key: Index },
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    prop_oneof![
        select(vec![0u64, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 64, u32::MAX as u64, u64::MAX, 1 << 40]).prop_map(Value::from),
        select(vec![-1i64, i64::MIN]).prop_map(Value::from),
        select(vec![
            "", "F32", "U8", "F64", "F16", "BOOL", "I64", "NaN", "inf", "-inf", "-1", "0", "1e39", "1", "100", "2", "\n",
            "cac-edge-text-cache",
        ])
        .prop_map(|text| Value::String(text.to_string())),
        any::<String>().prop_map(Value::String),
        Just(Value::Null),
        Just(json!([])),
        Just(json!([2, 0, 16])),
        Just(json!([2, 6, 0])),
        Just(json!({})),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        3 => (any::<Index>(), json_value()).prop_map(|(leaf, value)| JsonEdit::Set { leaf, value }),
        3 => (any::<Index>(), prop_oneof![-8i64..=8, Just(-4096), Just(4096)]).prop_map(|(leaf, delta)| JsonEdit::Nudge { leaf, delta }),
        1 => any::<Index>().prop_map(|key| JsonEdit::Remove { key }),
    ]
}

/// JSON pointers of every scalar, array and object below the root, depth first.
fn json_pointers(value: &serde_json::Value, pointer: String, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                let child = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                out.push(child.clone());
                json_pointers(inner, child, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (index, inner) in items.iter().enumerate() {
                let child = format!("{pointer}/{index}");
                out.push(child.clone());
                json_pointers(inner, child, out);
            }
        }
        _ => {}
    }
}

fn apply_json_edits(header: &mut serde_json::Value, edits: &[JsonEdit]) {
    for edit in edits {
        let mut pointers = Vec::new();
        json_pointers(header, String::new(), &mut pointers);
        if pointers.is_empty() {
            return;
        }
        match edit {
            JsonEdit::Set { leaf, value } => {
                if let Some(slot) = header.pointer_mut(&pointers[leaf.index(pointers.len())]) {
                    *slot = value.clone();
                }
            }
            JsonEdit::Nudge { leaf, delta } => {
                if let Some(slot) = header.pointer_mut(&pointers[leaf.index(pointers.len())]) {
                    if let Some(number) = slot.as_u64() {
                        *slot = serde_json::Value::from(number as i64 + delta);
                    }
                }
            }
            JsonEdit::Remove { key } => {
                let pointer = &pointers[key.index(pointers.len())];
                let (parent, last) = pointer.rsplit_once('/').expect("pointers start with /");
                match header.pointer_mut(parent) {
                    Some(serde_json::Value::Object(map)) => {
                        map.remove(&last.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(serde_json::Value::Array(items)) => {
                        if let Ok(index) = last.parse::<usize>() {
                            items.remove(index);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn assemble_safetensors(header: &serde_json::Value, data: &[u8], pad_to_8: bool) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).expect("serialise a JSON value");
    while pad_to_8 && !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    file.extend_from_slice(data);
    file
}

/// The checksum `write_cache` stores: sha256 of the tensors' bytes in name order.
fn recompute_checksum(header: &mut serde_json::Value, data: &[u8]) {
    let Some(map) = header.as_object() else { return };
    let mut tensors: Vec<(&String, &[u8])> = Vec::new();
    for (name, info) in map.iter().filter(|(name, _)| name.as_str() != "__metadata__") {
        let offsets = info.get("data_offsets").and_then(|o| Some((o.get(0)?.as_u64()? as usize, o.get(1)?.as_u64()? as usize)));
        match offsets.and_then(|(start, end)| data.get(start..end)) {
            Some(bytes) => tensors.push((name, bytes)),
            None => return, // the parser refuses this header anyway
        }
    }
    tensors.sort_by_key(|(name, _)| *name);
    let mut hasher = Sha256::new();
    for (_, bytes) in tensors {
        hasher.update(bytes);
    }
    let checksum: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    if let Some(metadata) = header.get_mut("__metadata__").and_then(|m| m.as_object_mut()) {
        metadata.insert("data_sha256".into(), checksum.into());
    }
}

#[test]
fn cache_survives_header_field_mutations() {
    let bytes = real_cache_bytes();
    let json_end = 8 + header_len(bytes);
    let original: serde_json::Value = serde_json::from_slice(&bytes[8..json_end]).expect("seed header is JSON");
    let data = bytes[json_end..].to_vec();
    let scratch = ScratchFile::new("fields.safetensors");
    let input = (
        proptest::collection::vec(json_edit(), 1..4),
        any::<bool>(),
        prop::bool::weighted(0.9),
        proptest::collection::vec(fuzzing::mutation(64), 0..2),
    );
    check("cache_header_fields", REGRESSIONS, 6.0, input, |(edits, fix_checksum, pad_to_8, data_edits)| {
        let mut header = original.clone();
        apply_json_edits(&mut header, &edits);
        let data = apply(&data, &data_edits);
        if fix_checksum {
            recompute_checksum(&mut header, &data);
        }
        cache_property(&scratch, &assemble_safetensors(&header, &data, pad_to_8))
    });
}

#[test]
fn deeply_nested_cache_header_is_an_error() {
    let scratch = ScratchFile::new("nested.safetensors");
    let json = format!("{{\"a\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    std::fs::write(&scratch.path, &bytes).expect("write");
    let error = TextFeatureCache::open(&scratch.path, CacheOpenOptions::default()).expect_err("nested header opened");
    assert!(matches!(error, CacheError::Invalid { .. }), "{error}");
}

// ============================================================================ class lists

struct ScratchClassFiles {
    _dir: tempfile::TempDir,
    classes: PathBuf,
    base: PathBuf,
}

impl ScratchClassFiles {
    fn new() -> ScratchClassFiles {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (classes, base) = (dir.path().join("classes.txt"), dir.path().join("base.txt"));
        ScratchClassFiles { _dir: dir, classes, base }
    }
}

/// The reading rules of `ClassList::from_files`, restated: lines, trimmed, blank and `#` lines
/// skipped.
fn listed_names(text: &str) -> Vec<&str> {
    // A byte-order mark at the start of the file is not part of the first name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines().map(str::trim).filter(|name| !name.is_empty() && !name.starts_with('#')).collect()
}

/// What makes two names one class to the model: NFKC, lower case, white space runs as one space.
fn same_class_key(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    name.nfkc().collect::<String>().to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

fn class_list_property(files: &ScratchClassFiles, classes: &[u8], base: &[u8]) -> Result<(), TestCaseError> {
    std::fs::write(&files.classes, classes).expect("write classes");
    std::fs::write(&files.base, base).expect("write base");
    let result = ClassList::from_files(&files.classes, &files.base);
    let texts = (std::str::from_utf8(classes), std::str::from_utf8(base));
    match (result, texts) {
        (Ok(list), (Ok(classes), Ok(base))) => {
            let expected: Vec<&str> = listed_names(classes);
            prop_assert_eq!(&list.names, &expected.iter().map(|name| name.to_string()).collect::<Vec<_>>());
            prop_assert_eq!(list.names.iter().collect::<HashSet<_>>().len(), list.names.len(), "duplicate names accepted");
            let keys: HashSet<String> = list.names.iter().map(|name| same_class_key(name)).collect();
            prop_assert_eq!(keys.len(), list.names.len(), "names the model cannot tell apart accepted: {:?}", list.names);
            prop_assert!(list.names.len() >= 2, "a list of fewer than two classes accepted");
            let base_names: HashSet<&str> = listed_names(base).into_iter().collect();
            prop_assert!(!base_names.is_empty());
            prop_assert_eq!(list.is_base.len(), list.names.len());
            for (name, is_base) in list.names.iter().zip(&list.is_base) {
                prop_assert!(!name.is_empty() && !name.contains('\n') && name.trim() == name);
                prop_assert_eq!(*is_base, base_names.contains(name.as_str()), "{:?}", name);
            }
            prop_assert!(base_names.iter().all(|name| list.names.iter().any(|listed| listed == name)));
            // Whatever is accepted round-trips through a cache file.
            check_class_list_round_trip(&list)
        }
        (Ok(list), _) => Err(failed(format!("non-UTF-8 class files were accepted: {list:?}"))),
        (Err(CacheError::ClassList { line, .. } | CacheError::NearDuplicate { line, .. }), _) => {
            prop_assert!(line >= 1);
            Ok(())
        }
        (Err(CacheError::TooFewClasses { count, .. }), (Ok(classes), _)) => {
            prop_assert!(count < 2 && listed_names(classes).len() == count, "refused {} classes as too few", count);
            Ok(())
        }
        (Err(CacheError::Read { source, .. }), (classes, base)) => {
            prop_assert!(classes.is_err() || base.is_err(), "read error on UTF-8 files: {}", source);
            Ok(())
        }
        (Err(other), _) => Err(failed(format!("unexpected error kind: {other}"))),
    }
}

fn check_class_list_round_trip(list: &ClassList) -> Result<(), TestCaseError> {
    let count = list.names.len();
    let features = Array2::<f32>::from_elem((2 * count, 2), std::f32::consts::FRAC_1_SQRT_2);
    let factors = vec![1.0f32; count];
    let contents = CacheContents {
        classes: list,
        stacked_text: features.view(),
        feature_precision: FeaturePrecision::F32,
        dac_factors: &factors,
        logit_scale_zs: 100.0,
        logit_scale_ft: 100.0,
        source_hash: String::new(),
        bundle_name: "fuzz",
    };
    let scratch = ScratchFile::new("roundtrip.safetensors");
    write_cache(&scratch.path, &contents)
        .map_err(|error| failed(format!("write_cache refused an accepted class list: {error}")))?;
    let cache = TextFeatureCache::open(&scratch.path, CacheOpenOptions::default()).map_err(|error| failed(error.to_string()))?;
    prop_assert_eq!(&cache.class_list(), list);
    Ok(())
}

fn class_names_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        select(vec![
            "red circle", "blue square", "  red circle ", "# comment", "#", "", "   ", "\t", "red circle\r", "é", "\u{85}",
            "\u{2028}x", "a\rb", "\u{feff}red circle"
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    (proptest::collection::vec(line, 0..12), select(vec!["\n", "\r\n", "\r"]), any::<bool>())
        .prop_map(|(lines, separator, trailing)| lines.join(separator) + if trailing { separator } else { "" })
}

#[test]
fn class_lists_survive_arbitrary_bytes() {
    let files = ScratchClassFiles::new();
    let bytes = proptest::collection::vec(any::<u8>(), 0..256);
    check("class_list_bytes", REGRESSIONS, 2.0, (bytes.clone(), bytes), |(classes, base)| {
        class_list_property(&files, &classes, &base)
    });
}

#[test]
fn class_lists_survive_arbitrary_text() {
    let files = ScratchClassFiles::new();
    let text = prop_oneof![
        class_names_text(),
        proptest::collection::vec(proptest::char::any(), 0..128).prop_map(|chars| chars.into_iter().collect::<String>()),
    ];
    check("class_list_text", REGRESSIONS, 4.0, (text.clone(), text), |(classes, base)| {
        class_list_property(&files, classes.as_bytes(), base.as_bytes())
    });
}

#[test]
fn class_list_subset_base_is_accepted() {
    // The generic properties rarely produce a valid pair; this one always does, so the
    // acceptance path and its round trip are exercised on every run.
    let files = ScratchClassFiles::new();
    let names = proptest::collection::btree_set(
        // A leading U+FEFF would be read as the file's byte-order mark when the name comes first.
        "[^\n\r#]{1,12}".prop_filter("non-blank after trimming", |n| !n.trim().is_empty() && !n.trim().starts_with('\u{feff}')),
        2..10,
    );
    check("class_list_valid", REGRESSIONS, 1.0, (names, any::<Index>()), |(names, pick)| {
        // One name per class the model can tell apart (BTreeMap: the first in order wins).
        let mut by_key: BTreeMap<String, String> = BTreeMap::new();
        for name in &names {
            by_key.entry(same_class_key(name)).or_insert_with(|| name.trim().to_string());
        }
        prop_assume!(by_key.len() >= 2);
        let names: Vec<&String> = by_key.values().collect();
        let base = names[pick.index(names.len())].clone();
        let classes = names.iter().map(|name| name.as_str()).collect::<Vec<_>>().join("\n");
        class_list_property(&files, classes.as_bytes(), base.as_bytes())?;
        let list = ClassList::from_files(&files.classes, &files.base)
            .map_err(|error| failed(format!("valid class list refused: {error}")))?;
        prop_assert_eq!(list.is_base.iter().filter(|&&b| b).count(), 1);
        Ok(())
    });
}

// ============================================================================== tokenizer

fn tokenizer(context_length: usize) -> &'static ClipTokenizer {
    static TOKENIZERS: OnceLock<HashMap<usize, ClipTokenizer>> = OnceLock::new();
    let all = TOKENIZERS.get_or_init(|| {
        [2, 3, 8, 77]
            .into_iter()
            .map(|length| {
                let path = fixture("bundle-tiny/tokenizer.json");
                (length, ClipTokenizer::from_file(&path, length).unwrap_or_else(|error| panic!("{error}")))
            })
            .collect()
    });
    &all[&context_length]
}

fn tokenizer_text() -> impl Strategy<Value = String> {
    let unit = prop_oneof![
        select(vec![
            "a photo of a ", "cat", "'s", "'", "<|endoftext|>", "<|startoftext|>", "  ", "\t", "\n", "!", "ÿ", "é", "e\u{301}",
            "\u{200b}", "日本語", "🙂", "👩‍👩‍👧", "&amp;", "&#39;", "Ã©", "ﬁ", "İ", "ß", "1234567890", "\u{0}", "\u{fffd}",
            "\u{10ffff}", "x{}y",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(proptest::char::any(), 0..256).prop_map(|chars| chars.into_iter().collect()),
        proptest::collection::vec(unit.clone(), 0..40).prop_map(|units| units.concat()),
        // Long repetitions: the place where regex backtracking or quadratic clean-up would hang.
        (unit, 1usize..2000).prop_map(|(unit, times)| unit.repeat(times).chars().take(20_000).collect()),
    ]
}

/// The ids open_clip would give for `full = [start] + bpe + [end]` at `context_length`.
fn fit(full: &[i64], context_length: usize) -> Vec<i64> {
    let mut ids = full.to_vec();
    if ids.len() > context_length {
        ids.truncate(context_length);
        ids[context_length - 1] = END_OF_TEXT;
    } else {
        ids.resize(context_length, 0);
    }
    ids
}

#[test]
fn tokenizer_output_is_well_formed_for_any_text() {
    check("tokenizer_any_text", REGRESSIONS, 4.0, tokenizer_text(), |text| {
        let full_context = tokenizer(77);
        let ids = full_context.encode(&text).map_err(|error| failed(format!("encode failed: {error}")))?;
        prop_assert_eq!(ids.len(), 77);
        prop_assert_eq!(ids[0], START_OF_TEXT);
        prop_assert!(ids.contains(&END_OF_TEXT));
        prop_assert!(ids.iter().all(|&id| (0..=END_OF_TEXT).contains(&id)), "id outside the vocabulary: {:?}", ids);
        let last = ids.iter().rposition(|&id| id != 0).expect("START is non-zero");
        prop_assert_eq!(ids[last], END_OF_TEXT, "ids do not end in END_OF_TEXT then padding: {:?}", ids);
        // Deterministic, and the batch path gives the same row.
        prop_assert_eq!(&full_context.encode(&text).map_err(|error| failed(error.to_string()))?, &ids);
        let batch = full_context.encode_batch(&[text.as_str(), ""]).map_err(|error| failed(error.to_string()))?;
        prop_assert_eq!(batch.row(0).to_vec(), ids.clone());
        // Shorter contexts are open_clip's truncation of the same ids.
        if last < 76 {
            let full = &ids[..=last];
            for length in [2, 3, 8] {
                let short = tokenizer(length).encode(&text).map_err(|error| failed(error.to_string()))?;
                prop_assert_eq!(short, fit(full, length), "context {}", length);
            }
        }
        Ok(())
    });
}

// ================================================================================== images

/// A deterministic, textured RGB image (flat colours compress away every code path).
fn test_pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let noise = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 7;
        Rgb([(x * 4) as u8 ^ noise as u8, (y * 5) as u8, (x + y) as u8 ^ (noise >> 8) as u8])
    })
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap_or_else(|error| panic!("encode {format:?}: {error}"));
    bytes.into_inner()
}

/// Named seed files (name, bytes).
type Seeds = Vec<(String, Vec<u8>)>;

/// Seed files per format: small generated ones (fast to decode, every header field near the
/// start) and real fixtures.
fn image_seeds(format: ImageFormat) -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<HashMap<&'static str, Seeds>> = OnceLock::new();
    let seeds = SEEDS.get_or_init(|| {
        let rgb = DynamicImage::ImageRgb8(test_pattern(40, 28));
        let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(test_pattern(24, 17)).to_rgba8());
        let grey16 = DynamicImage::ImageLuma16(DynamicImage::ImageRgb8(test_pattern(19, 23)).to_luma16());
        let generated = |name: &str, format, image: &DynamicImage| (format!("generated {name}"), encode(image, format));
        let file = |relative: &str| (relative.to_string(), read_fixture(relative));
        HashMap::from([
            ("jpeg", vec![generated("rgb.jpg", ImageFormat::Jpeg, &rgb), file("images/photos/rocket.jpg")]),
            (
                "png",
                vec![
                    generated("rgb.png", ImageFormat::Png, &rgb),
                    generated("rgba.png", ImageFormat::Png, &rgba),
                    generated("grey16.png", ImageFormat::Png, &grey16),
                    file("images/modes/palette-trns.png"),
                    file("images/modes/tiny.png"),
                ],
            ),
            ("gif", vec![generated("rgba.gif", ImageFormat::Gif, &rgba), file("images/modes/palette.gif")]),
            ("webp", vec![generated("rgba.webp", ImageFormat::WebP, &rgba), file("images/modes/lossless.webp")]),
            ("bmp_tiff", vec![generated("rgb.bmp", ImageFormat::Bmp, &rgb), generated("rgb.tiff", ImageFormat::Tiff, &rgb)]),
        ])
    });
    let key = match format {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        _ => "bmp_tiff",
    };
    &seeds[key]
}

/// Decoding either fails or yields an image within the limits that preprocessing turns into a
/// finite tensor; with tight limits, nothing beyond them is ever returned.
fn decode_property(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limits = DecodeLimits::default();
    if let Ok(rgb) = decode_bytes(bytes, &limits) {
        let (width, height) = rgb.dimensions();
        prop_assert!(
            (1..=limits.max_width).contains(&width) && (1..=limits.max_height).contains(&height),
            "{}x{}",
            width,
            height
        );
        prop_assert_eq!(rgb.as_raw().len() as u64, u64::from(width) * u64::from(height) * 3);
        let config = PreprocessConfig::openai_clip(224);
        let tensor = preprocess(&rgb, &config)
            .map_err(|error| failed(format!("decoded {width}x{height} image not preprocessed: {error}")))?;
        prop_assert_eq!(tensor.len(), config.tensor_len());
        prop_assert!(tensor.iter().all(|value| value.is_finite()));
    }
    let tight = DecodeLimits { max_width: 32, max_height: 32, max_alloc_bytes: 16 << 10 };
    if let Ok(rgb) = decode_bytes(bytes, &tight) {
        let (width, height) = rgb.dimensions();
        prop_assert!(width <= 32 && height <= 32, "tight limits returned {}x{}", width, height);
    }
    Ok(())
}

fn check_image_format(name: &'static str, format: ImageFormat, weight: f64) {
    let seeds = image_seeds(format);
    for (seed, bytes) in seeds {
        let decoded =
            decode_bytes(bytes, &DecodeLimits::default()).unwrap_or_else(|error| panic!("seed {seed} must decode: {error}"));
        assert!(decoded.width() > 0, "{seed}");
    }
    // The hot prefix covers the headers: PNG IHDR/PLTE, JPEG DQT/SOF/DHT, GIF screen and
    // colour table, WebP VP8L header, BMP/TIFF headers and IFD.
    let input = (0..seeds.len(), mutations(1024, 8));
    check(name, REGRESSIONS, weight, input, |(seed, edits)| decode_property(&apply(&seeds[seed].1, &edits)));
}

#[test]
fn jpeg_decode_survives_mutations() {
    check_image_format("decode_jpeg_mutations", ImageFormat::Jpeg, 2.0);
}

#[test]
fn png_decode_survives_mutations() {
    check_image_format("decode_png_mutations", ImageFormat::Png, 2.0);
}

#[test]
fn gif_decode_survives_mutations() {
    check_image_format("decode_gif_mutations", ImageFormat::Gif, 2.0);
}

#[test]
fn webp_decode_survives_mutations() {
    check_image_format("decode_webp_mutations", ImageFormat::WebP, 2.0);
}

#[test]
fn bmp_and_tiff_decode_survive_mutations() {
    check_image_format("decode_bmp_tiff_mutations", ImageFormat::Bmp, 1.0);
}

#[test]
fn decode_survives_magic_then_arbitrary_bytes() {
    // Past each format's magic number, straight into its header parser.
    let magic: Vec<&'static [u8]> = vec![
        b"\xFF\xD8\xFF", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBPVP8L", b"RIFF\0\0\0\0WEBPVP8 ",
        b"RIFF\0\0\0\0WEBPVP8X", b"BM", b"II*\0", b"MM\0*",
    ];
    let input = (select(magic), proptest::collection::vec(any::<u8>(), 0..512));
    check("decode_magic_arbitrary", REGRESSIONS, 4.0, input, |(magic, tail)| {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&tail);
        decode_property(&bytes)
    });
}

#[test]
fn mutation_helpers_change_bytes_as_described() {
    // The fuzz targets are only as good as their mutations: pin the semantics down.
    use fuzzing::At;
    let original = [0u8, 1, 2, 3, 4, 5, 6, 7];
    let flipped = apply(&original, &[Mutation::FlipBit { at: At::Hot(2), bit: 7 }]);
    assert_eq!(flipped, [0, 1, 0x82, 3, 4, 5, 6, 7]);
    let word = apply(&original, &[Mutation::SetWord { at: At::Hot(1), value: 0xEA60, width: 4, big_endian: true }]);
    assert_eq!(word, [0, 0, 0, 0xEA, 0x60, 5, 6, 7]);
    let little = apply(&original, &[Mutation::SetWord { at: At::Hot(6), value: 0x0102_0304, width: 4, big_endian: false }]);
    assert_eq!(little, [0, 1, 2, 3, 4, 5, 4, 3], "words are clipped at the end of the file");
    assert_eq!(apply(&original, &[Mutation::Truncate { keep: At::Hot(3) }]), [0, 1, 2]);
    assert_eq!(apply(&original, &[Mutation::Remove { at: At::Hot(6), len: 100 }]), [0, 1, 2, 3, 4, 5]);
    assert_eq!(apply(&original, &[Mutation::Insert { at: At::Hot(100), bytes: vec![9] }]), [0, 1, 2, 3, 4, 5, 6, 9, 7]);
    assert_eq!(apply(&original, &[Mutation::Duplicate { from: At::Hot(0), to: At::Hot(6), len: 4 }]), [0, 1, 2, 3, 4, 5, 0, 1]);
    assert_eq!(apply(&[], &[Mutation::SetByte { at: At::Hot(0), value: 1 }]), Vec::<u8>::new());
}

#[test]
fn manifest_with_a_non_finite_mean_is_refused_at_open() {
    // Found by bundle_manifest_field_mutations: `mean = [0.5, nan, 0.5]` opened, and every
    // image was then refused by preprocessing, one by one, after the encoders were loaded.
    let bundle = ScratchBundle::new();
    let original = String::from_utf8(fixture_manifest()).expect("UTF-8 fixture");
    let line = original.lines().find(|line| line.starts_with("mean = ")).expect("fixture has a mean");
    for mean in ["[0.5, nan, 0.5]", "[inf, 0.5, 0.5]", "[0.5, 0.5, -inf]"] {
        let manifest = original.replace(line, &format!("mean = {mean}"));
        match bundle.open_with_manifest(manifest.as_bytes()) {
            Err(BundleError::ManifestInvalid { message, .. }) => assert!(message.contains("mean"), "{message}"),
            other => panic!("mean {mean}: expected ManifestInvalid, got {:?}", other.map(|b| b.name().to_string())),
        }
    }
}
