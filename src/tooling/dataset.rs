//! Labeled image sets for `eval`: a folder per class, or a CSV of `path,label`.
//!
//! Labels are class names of the cache. A folder name matches a class name exactly or with
//! underscores read as spaces (`red_heart/` holds "red heart"), since class names often contain
//! characters that are awkward in folder names. CSV paths are relative to the CSV's folder.

use std::path::{Path, PathBuf};

use crate::preprocess::has_image_extension;

/// Why a labeled image set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A folder or the CSV could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The folder or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CSV record is malformed.
    #[error("{path}:{line}: {message}")]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The row (1-based).
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A folder name or CSV label is not a class of the cache.
    #[error("{path}: the label '{label}' is not a class of the cache; {fix}")]
    UnknownLabel {
        /// The class folder, or the CSV file.
        path: PathBuf,
        /// The label.
        label: String,
        /// What to do about it.
        fix: String,
    },
    /// The set holds no images.
    #[error("{path}: no labeled images found; give a folder with one sub-folder of images per class, or a CSV of path,label")]
    Empty {
        /// The folder or CSV given.
        path: PathBuf,
    },
}

/// One image and its true class.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledImage {
    /// The image file.
    pub path: PathBuf,
    /// Index into the cache's class list.
    pub class: usize,
}

/// Images with labels, in a stable order (CSV order, or sorted folders and files).
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledSet {
    /// The folder or CSV it was read from.
    pub source: PathBuf,
    /// The images, in order; never empty.
    pub images: Vec<LabeledImage>,
}

impl LabeledSet {
    /// Reads a folder-per-class tree or a CSV, checking every label against `class_names`.
    pub fn load(source: &Path, class_names: &[String]) -> Result<LabeledSet, DatasetError> {
        let images = if source.is_dir() { from_folders(source, class_names)? } else { from_csv(source, class_names)? };
        if images.is_empty() {
            return Err(DatasetError::Empty { path: source.to_path_buf() });
        }
        Ok(LabeledSet { source: source.to_path_buf(), images })
    }

    /// The image files, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.images.iter().map(|image| image.path.clone()).collect()
    }
}

fn class_index(label: &str, class_names: &[String]) -> Option<usize> {
    class_names.iter().position(|name| name == label)
}

fn from_folders(root: &Path, class_names: &[String]) -> Result<Vec<LabeledImage>, DatasetError> {
    let mut images = Vec::new();
    for folder in sorted_entries(root)?.into_iter().filter(|path| path.is_dir()) {
        let name = folder.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let class = class_index(&name, class_names).or_else(|| class_index(&name.replace('_', " "), class_names));
        let Some(class) = class else {
            return Err(DatasetError::UnknownLabel {
                path: folder,
                label: name,
                fix: "rename the folder to a class name (underscores stand for spaces) or remove it".into(),
            });
        };
        let files = sorted_entries(&folder)?.into_iter().filter(|path| path.is_file() && has_image_extension(path));
        images.extend(files.map(|path| LabeledImage { path, class }));
    }
    Ok(images)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let read = |source| DatasetError::Read { path: dir.to_path_buf(), source };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        paths.push(entry.map_err(read)?.path());
    }
    paths.sort();
    Ok(paths)
}

/// `path,label[,anything else]` per row; a first row of exactly `path,label,...` is a header;
/// rows with an empty label (not yet labelled) are skipped.
fn from_csv(csv_path: &Path, class_names: &[String]) -> Result<Vec<LabeledImage>, DatasetError> {
    let file = std::fs::File::open(csv_path).map_err(|source| DatasetError::Read { path: csv_path.to_path_buf(), source })?;
    let base_dir = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(file);
    let mut images = Vec::new();
    let mut unlabelled = 0usize;
    for (row, record) in reader.records().enumerate() {
        let line = row as u64 + 1;
        let csv_error = |message: String| DatasetError::Csv { path: csv_path.to_path_buf(), line, message };
        let record = record.map_err(|error| csv_error(error.to_string()))?;
        let (Some(path), Some(label)) = (record.get(0), record.get(1)) else {
            if record.iter().all(str::is_empty) {
                continue;
            }
            return Err(csv_error("expected two columns, path,label".into()));
        };
        if row == 0 && path == "path" && label == "label" {
            continue;
        }
        // A row of the review ring's template (labels.csv) that nobody labelled yet.
        if label.is_empty() {
            unlabelled += 1;
            continue;
        }
        let Some(class) = class_index(label, class_names) else {
            return Err(DatasetError::UnknownLabel {
                path: csv_path.to_path_buf(),
                label: label.to_string(),
                fix: format!("line {line}: use a class name from the cache (`cac-edge cache info` lists them)"),
            });
        };
        images.push(LabeledImage { path: base_dir.join(path), class });
    }
    if unlabelled > 0 {
        tracing::info!("{}: {unlabelled} row(s) without a label skipped", csv_path.display());
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        vec!["red heart".into(), "cat".into()]
    }

    #[test]
    fn csv_with_header_and_extra_columns() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("labels.csv");
        std::fs::write(&csv, "path,label,split\na/1.jpg,cat,base\n\"b/2, x.jpg\",red heart,new\n").unwrap();
        let set = LabeledSet::load(&csv, &classes()).unwrap();
        assert_eq!(
            set.images,
            vec![
                LabeledImage { path: dir.path().join("a/1.jpg"), class: 1 },
                LabeledImage { path: dir.path().join("b/2, x.jpg"), class: 0 },
            ]
        );
    }

    #[test]
    fn rows_without_a_label_are_skipped_as_in_the_review_template() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("labels.csv");
        let template = "path,label,predicted,confidence,camera\n1-door.jpg,,cat,0.41,door\n2-door.jpg,cat,dog,0.52,door\n";
        std::fs::write(&csv, template).unwrap();
        let set = LabeledSet::load(&csv, &classes()).unwrap();
        assert_eq!(set.images, vec![LabeledImage { path: dir.path().join("2-door.jpg"), class: 1 }]);
        std::fs::write(&csv, "path,label\n1-door.jpg,\n").unwrap();
        assert!(matches!(LabeledSet::load(&csv, &classes()), Err(DatasetError::Empty { .. })), "nothing labelled yet");
    }

    #[test]
    fn csv_unknown_label_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("labels.csv");
        std::fs::write(&csv, "a.jpg,cat\nb.jpg,dog\n").unwrap();
        let message = LabeledSet::load(&csv, &classes()).unwrap_err().to_string();
        assert!(message.contains("labels.csv") && message.contains("'dog'") && message.contains("line 2"), "{message}");
    }

    #[test]
    fn folders_match_names_with_underscores() {
        let dir = tempfile::tempdir().unwrap();
        for (folder, file) in [("red_heart", "1.jpg"), ("cat", "2.png"), ("cat", "notes.txt")] {
            std::fs::create_dir_all(dir.path().join(folder)).unwrap();
            std::fs::write(dir.path().join(folder).join(file), b"").unwrap();
        }
        let set = LabeledSet::load(dir.path(), &classes()).unwrap();
        let found: Vec<(String, usize)> = set
            .images
            .iter()
            .map(|image| (image.path.file_name().unwrap().to_string_lossy().into_owned(), image.class))
            .collect();
        assert_eq!(found, vec![("2.png".to_string(), 1), ("1.jpg".to_string(), 0)]);
    }

    #[test]
    fn unknown_folder_and_empty_set_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(LabeledSet::load(dir.path(), &classes()), Err(DatasetError::Empty { .. })));
        std::fs::create_dir(dir.path().join("dog")).unwrap();
        let message = LabeledSet::load(dir.path(), &classes()).unwrap_err().to_string();
        assert!(message.contains("'dog'") && message.contains("rename the folder"), "{message}");
    }
}
