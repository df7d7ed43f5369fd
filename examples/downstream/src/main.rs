//! A downstream crate that uses only `attention-spec` and `attention-core`: it reads a model
//! file, builds the first layer's attention and runs it on a random batch. Its `build.rs`
//! calls `attention_build::link_libtorch()`, as every binary linking libtorch must.
//!
//! ```sh
//! cargo run -p downstream -- examples/configs/gqa-rmsnorm-qkv-bias.toml
//! ```

use anyhow::{Context, Result};
use attention_core::{Attention, AttentionInput, RotaryEmbedding};
use attention_spec::Model;
use attention_spec::config::PositionEmbeddingType;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Builds layer 1 of the model in `toml` and returns the output shape of one forward.
fn run(toml: &str) -> Result<Vec<i64>> {
    let model = Model::from_toml_str(toml, attention_core::registry()?)?;
    let layer = model.layers.first().context("the model has no layers")?;
    let vs = VarStore::new(Device::Cpu);
    let attention =
        Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)?;
    let (s, b, h) = (16, 2, model.config.hidden_size);
    let x = Tensor::randn([s, b, h], (Kind::Float, Device::Cpu));
    let kv = Tensor::randn([s, b, h], (Kind::Float, Device::Cpu));
    let rope = RotaryEmbedding::from_config(&model.config).forward(s, 0, Device::Cpu);
    let mut input = AttentionInput::new(&x);
    if attention.is_cross() {
        input = input.with_key_value_states(&kv);
    }
    if model.config.position_embedding_type == PositionEmbeddingType::Rope {
        input = input.with_rotary(&rope);
    }
    let out = tch::no_grad(|| attention.forward(&input))?;
    Ok(out.output.size())
}

fn main() -> Result<()> {
    let path = std::env::args().nth(1).context("usage: downstream MODEL.toml")?;
    let toml = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    println!("{path}: output {:?}", run(&toml)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_every_example_config() -> anyhow::Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir)? {
            let toml = std::fs::read_to_string(entry?.path())?;
            assert_eq!(super::run(&toml)?[0], 16);
            n += 1;
        }
        assert!(n >= 3);
        Ok(())
    }
}
