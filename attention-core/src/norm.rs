//! Norms for the `q_layernorm`/`k_layernorm` slots, applied over the last dimension (one weight
//! of size `kv_channels` shared by every head, as Megatron): `torch.nn.LayerNorm`,
//! `torch.nn.RMSNorm`, Megatron's `WrappedTorchNorm` (one of the two, by `normalization`),
//! the weightless `L2Norm`, and `IdentityOp`.

use attention_spec::config::Normalization;
use attention_spec::module::Norm;
use attention_spec::registry::{Builder, ModuleFactory, NoParams, NormArgs};
use attention_spec::{ForwardError, SpecError};
use tch::{Kind, Tensor};

use crate::linear::new_param;

/// `torch.nn.LayerNorm(hidden_size, eps)`: weight ones, bias zeros.
#[derive(Debug)]
pub struct LayerNorm {
    kind: &'static str,
    weight: Tensor,
    bias: Tensor,
    size: i64,
    eps: f64,
}

/// `torch.nn.RMSNorm(hidden_size, eps)`: weight ones; `torch.rms_norm(x, (hn,), w, eps)`.
#[derive(Debug)]
pub struct RmsNorm {
    kind: &'static str,
    weight: Tensor,
    size: i64,
    eps: f64,
}

/// Megatron's `L2Norm`: no parameters, `x * rsqrt(mean(x², -1) + eps)` in fp32, cast back.
#[derive(Debug)]
pub struct L2Norm {
    eps: f64,
}

/// `IdentityOp`.
#[derive(Debug)]
pub struct Identity;

fn layer_norm(kind: &'static str, args: &NormArgs<'_>) -> Result<LayerNorm, SpecError> {
    let dtype = args.config.params_dtype.kind();
    let weight =
        new_param(args.path, "weight", &[args.hidden_size], dtype, |t| t.f_fill_(1.0).map(|_| ()))?;
    let bias =
        new_param(args.path, "bias", &[args.hidden_size], dtype, |t| t.f_zero_().map(|_| ()))?;
    Ok(LayerNorm { kind, weight, bias, size: args.hidden_size, eps: args.eps })
}

fn rms_norm(kind: &'static str, args: &NormArgs<'_>) -> Result<RmsNorm, SpecError> {
    let dtype = args.config.params_dtype.kind();
    let weight =
        new_param(args.path, "weight", &[args.hidden_size], dtype, |t| t.f_fill_(1.0).map(|_| ()))?;
    Ok(RmsNorm { kind, weight, size: args.hidden_size, eps: args.eps })
}

impl Norm for LayerNorm {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn parameters(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("weight", &self.weight), ("bias", &self.bias)]
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor, ForwardError> {
        Ok(input.f_layer_norm([self.size], Some(&self.weight), Some(&self.bias), self.eps, true)?)
    }
}

impl Norm for RmsNorm {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn parameters(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("weight", &self.weight)]
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor, ForwardError> {
        Ok(input.f_rms_norm([self.size], Some(&self.weight), self.eps)?)
    }
}

impl Norm for L2Norm {
    fn kind(&self) -> &'static str {
        "l2-norm"
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor, ForwardError> {
        let x = input.f_to_kind(Kind::Float)?;
        let ms = x.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, Kind::Float)?;
        let y = x.f_mul(&ms.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(y.f_to_kind(input.kind())?)
    }
}

impl Norm for Identity {
    fn kind(&self) -> &'static str {
        "identity"
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor, ForwardError> {
        Ok(input.shallow_clone())
    }
    fn is_identity(&self) -> bool {
        true
    }
}

fn build_torch_norm(args: &NormArgs<'_>) -> Result<Box<dyn Norm>, SpecError> {
    let _: NoParams = args.params.decode("torch-norm")?;
    if args.config.sequence_parallel {
        return Err(SpecError::Incompatible {
            place: args.params.place.clone(),
            reason: "torch-norm (Megatron WrappedTorchNorm) does not support sequence_parallel"
                .into(),
        });
    }
    Ok(match args.config.normalization {
        Normalization::LayerNorm => Box::new(layer_norm("torch-norm", args)?),
        Normalization::RMSNorm => Box::new(rms_norm("torch-norm", args)?),
    })
}

fn build_layer_norm(args: &NormArgs<'_>) -> Result<Box<dyn Norm>, SpecError> {
    let _: NoParams = args.params.decode("layer-norm")?;
    Ok(Box::new(layer_norm("layer-norm", args)?))
}

fn build_rms_norm(args: &NormArgs<'_>) -> Result<Box<dyn Norm>, SpecError> {
    let _: NoParams = args.params.decode("rms-norm")?;
    Ok(Box::new(rms_norm("rms-norm", args)?))
}

fn build_l2_norm(args: &NormArgs<'_>) -> Result<Box<dyn Norm>, SpecError> {
    let _: NoParams = args.params.decode("l2-norm")?;
    Ok(Box::new(L2Norm { eps: args.eps }))
}

fn build_identity(args: &NormArgs<'_>) -> Result<Box<dyn Norm>, SpecError> {
    let _: NoParams = args.params.decode("identity")?;
    Ok(Box::new(Identity))
}

inventory::submit! {
    ModuleFactory {
        kind: "torch-norm",
        aliases: &["WrappedTorchNorm"],
        summary: "torch LayerNorm or RMSNorm, chosen by `normalization`",
        registered_in: module_path!(),
        builder: Builder::Norm(build_torch_norm),
    }
}
inventory::submit! {
    ModuleFactory {
        kind: "layer-norm",
        aliases: &["LayerNorm"],
        summary: "torch.nn.LayerNorm over the last dimension",
        registered_in: module_path!(),
        builder: Builder::Norm(build_layer_norm),
    }
}
inventory::submit! {
    ModuleFactory {
        kind: "rms-norm",
        aliases: &["RMSNorm"],
        summary: "torch.nn.RMSNorm over the last dimension",
        registered_in: module_path!(),
        builder: Builder::Norm(build_rms_norm),
    }
}
inventory::submit! {
    ModuleFactory {
        kind: "l2-norm",
        aliases: &["L2Norm"],
        summary: "weightless L2 (RMS) norm in fp32",
        registered_in: module_path!(),
        builder: Builder::Norm(build_l2_norm),
    }
}
inventory::submit! {
    ModuleFactory {
        kind: "identity",
        aliases: &["IdentityOp"],
        summary: "no norm",
        registered_in: module_path!(),
        builder: Builder::Norm(build_identity),
    }
}
