//! The JSON configuration files of the model directory, checked against what this crate
//! implements.
//!
//! * `config.json` (Hugging Face `BertConfig`): sizes and epsilon must equal the model file's
//!   `[transformer]`, `hidden_act` must be `gelu`, positions `absolute`.
//! * `1_Pooling/config.json`: mean pooling only.
//! * `sentence_bert_config.json`: `max_seq_length`, the truncation length.

use std::path::Path;

use attention_spec::TransformerConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// The fields of `config.json` this crate relies on.
#[derive(Debug, Deserialize)]
struct BertConfig {
    hidden_size: i64,
    num_attention_heads: i64,
    num_hidden_layers: i64,
    layer_norm_eps: f64,
    hidden_act: String,
    #[serde(default = "absolute")]
    position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".into()
}

/// `1_Pooling/config.json`.
#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

/// `sentence_bert_config.json`.
#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// Checks the model directory's configs against `config`; returns `max_seq_length`.
pub(crate) fn check_model_dir(dir: &Path, config: &TransformerConfig) -> Result<usize, Error> {
    let path = dir.join("config.json");
    let bert: BertConfig = read_json(&path)?;
    let mismatch = |reason: String| Error::Config { path: path.clone(), reason };
    let sizes = [
        ("hidden_size", bert.hidden_size, "hidden_size", config.hidden_size),
        (
            "num_attention_heads",
            bert.num_attention_heads,
            "num_attention_heads",
            config.num_attention_heads,
        ),
        ("num_hidden_layers", bert.num_hidden_layers, "num_layers", config.num_layers),
    ];
    for (hf, got, ours, expected) in sizes {
        if got != expected {
            return Err(mismatch(format!(
                "{hf} = {got}, but the model file has {ours} = {expected}"
            )));
        }
    }
    if bert.layer_norm_eps != config.layernorm_epsilon {
        return Err(mismatch(format!(
            "layer_norm_eps = {:e}, but the model file has layernorm_epsilon = {:e}",
            bert.layer_norm_eps, config.layernorm_epsilon
        )));
    }
    if bert.hidden_act != "gelu" {
        return Err(mismatch(format!(
            "hidden_act = \"{}\", only \"gelu\" (erf) is implemented",
            bert.hidden_act
        )));
    }
    if bert.position_embedding_type != "absolute" {
        return Err(mismatch(format!(
            "position_embedding_type = \"{}\", only \"absolute\" is implemented",
            bert.position_embedding_type
        )));
    }

    let path = dir.join("1_Pooling").join("config.json");
    let pooling: PoolingConfig = read_json(&path)?;
    let mean_only = pooling.pooling_mode_mean_tokens
        && !pooling.pooling_mode_cls_token
        && !pooling.pooling_mode_max_tokens
        && !pooling.pooling_mode_mean_sqrt_len_tokens;
    if !mean_only {
        return Err(Error::Config {
            path,
            reason: format!("only mean pooling is implemented, got {pooling:?}"),
        });
    }

    let path = dir.join("sentence_bert_config.json");
    let sbert: SentenceBertConfig = read_json(&path)?;
    if sbert.max_seq_length < 2 {
        return Err(Error::Config {
            path,
            reason: format!("max_seq_length = {}: [CLS] and [SEP] need 2", sbert.max_seq_length),
        });
    }
    Ok(sbert.max_seq_length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_contradicts_the_model_file_is_refused() -> anyhow::Result<()> {
        let model = crate::model_spec(crate::DEFAULT_CORE_ATTENTION)?;
        let source = crate::model_dir()?;
        assert_eq!(check_model_dir(&source, &model.config)?, 256);

        let dir = std::env::temp_dir().join(format!("minilm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling"))?;
        for file in ["sentence_bert_config.json", "1_Pooling/config.json"] {
            std::fs::copy(source.join(file), dir.join(file))?;
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("config.json"))?)?;
        config["hidden_size"] = 768.into();
        std::fs::write(dir.join("config.json"), config.to_string())?;
        let result = check_model_dir(&dir, &model.config);
        std::fs::remove_dir_all(&dir)?;
        match result {
            Err(Error::Config { reason, .. }) => {
                assert!(reason.contains("hidden_size = 768"), "{reason}")
            }
            other => anyhow::bail!("expected a config error, got {other:?}"),
        }
        Ok(())
    }
}
