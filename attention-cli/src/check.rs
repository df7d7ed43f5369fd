//! `attn check`: the resolved module tree with every parameter.

use std::path::PathBuf;

use anyhow::Result;
use attention_core::BuiltLayers;
use attention_spec::Model;
use tch::nn::VarStore;

use crate::{load_model, parse_device};

/// Prints every layer's attention, its slots with their kinds, and every parameter with its
/// shape and dtype; returns the number of parameters.
pub(crate) fn print_tree(
    source: &str,
    model: &Model,
    vs: &VarStore,
    built: &BuiltLayers,
    with_params: bool,
) -> i64 {
    let c = &model.config;
    println!(
        "{source}: hidden_size {} heads {} query_groups {} kv_channels {} layers {} params_dtype {:?}",
        c.hidden_size,
        c.num_attention_heads,
        c.num_query_groups,
        c.kv_channels,
        c.num_layers,
        c.params_dtype
    );
    let vars = vs.variables();
    let mut total = 0i64;
    for ((number, prefix, _), layer) in built.layers.iter().zip(&model.layers) {
        println!(
            "layer {number}: {} (attn_mask_type = {})  [{prefix}]",
            layer.attention.module(),
            layer.attention.attn_mask_type
        );
        for (slot, m) in layer.attention.slots() {
            let params = if m.params.table.is_empty() {
                String::new()
            } else {
                format!(" {}", m.params.table)
            };
            println!("  {slot:<15} {}{params}", m.kind());
            let slot_prefix = format!("{prefix}.{slot}.");
            let mut names: Vec<&String> =
                vars.keys().filter(|n| n.starts_with(&slot_prefix)).collect();
            names.sort();
            for n in names {
                let t = &vars[n];
                total += t.numel() as i64;
                if with_params {
                    println!("    {:<50} {:?} {:?}", n, t.size(), t.kind());
                }
            }
        }
    }
    println!("parameters: {total}");
    total
}

/// `attn check FILE`.
pub(crate) fn check(file: &PathBuf, device: &str) -> Result<()> {
    let device = parse_device(device)?;
    let (source, model) = load_model(Some(file))?;
    let vs = VarStore::new(device);
    let built =
        BuiltLayers::build(&vs.root(), &model).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    print_tree(&source, &model, &vs, &built, true);
    Ok(())
}
