//! `ColumnParallelLinear` and `RowParallelLinear` at tensor-parallel size 1, with Megatron's
//! semantics: `output = matmul(input, weight.t())`, then `+ bias` as a separate op unless the
//! layer was built with `skip_bias_add`, in which case the bias is returned instead. Weights are
//! `[out, in]`, initialised `N(0, init_std)`; biases are zero.

use attention_spec::ForwardError;
use attention_spec::SpecError;
use attention_spec::module::Linear;
use attention_spec::registry::{Builder, LinearArgs, ModuleFactory, NoParams};
use tch::{Kind, Tensor, nn};

/// A dense linear layer with Megatron's bias handling; both parallel kinds are this layer at
/// tensor-parallel size 1.
#[derive(Debug)]
pub struct ParallelLinear {
    kind: &'static str,
    weight: Tensor,
    bias: Option<Tensor>,
    skip_bias_add: bool,
}

impl ParallelLinear {
    fn new(kind: &'static str, args: &LinearArgs<'_>) -> Result<Self, SpecError> {
        let _: NoParams = args.params.decode(kind)?;
        if args.config.tensor_model_parallel_size > 1 {
            return Err(SpecError::Unsupported {
                place: args.params.place.clone(),
                what: format!(
                    "{kind} with tensor_model_parallel_size = {} (tensor parallelism needs a \
                     process group, which this build does not have yet)",
                    args.config.tensor_model_parallel_size
                ),
            });
        }
        let kind_t = args.config.params_dtype.kind();
        let weight =
            new_param(args.path, "weight", &[args.output_size, args.input_size], kind_t, |t| {
                t.f_normal_(0.0, args.init_std).map(|_| ())
            })?;
        let bias = if args.bias {
            Some(new_param(args.path, "bias", &[args.output_size], kind_t, |t| {
                t.f_zero_().map(|_| ())
            })?)
        } else {
            None
        };
        Ok(Self { kind, weight, bias, skip_bias_add: args.skip_bias_add })
    }
}

/// Creates a trainable parameter `name` under `path` with the given dtype, initialised in fp32
/// by `init` (as Megatron's CPU init does) and then cast.
pub(crate) fn new_param(
    path: &nn::Path<'_>,
    name: &str,
    shape: &[i64],
    kind: Kind,
    init: impl FnOnce(&mut Tensor) -> Result<(), tch::TchError>,
) -> Result<Tensor, SpecError> {
    let mut t = Tensor::f_empty(shape, (Kind::Float, path.device()))?;
    tch::no_grad(|| init(&mut t))?;
    let t = t.f_to_kind(kind)?;
    Ok(path.f_var_copy(name, &t)?)
}

impl Linear for ParallelLinear {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn forward(&self, input: &Tensor) -> Result<(Tensor, Option<Tensor>), ForwardError> {
        let out = input.f_matmul(&self.weight.f_tr()?)?;
        match (&self.bias, self.skip_bias_add) {
            (Some(b), false) => Ok((out.f_add(b)?, None)),
            (Some(b), true) => Ok((out, Some(b.shallow_clone()))),
            (None, _) => Ok((out, None)),
        }
    }

    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

fn build_column(args: &LinearArgs<'_>) -> Result<Box<dyn Linear>, SpecError> {
    Ok(Box::new(ParallelLinear::new("column-parallel-linear", args)?))
}

fn build_row(args: &LinearArgs<'_>) -> Result<Box<dyn Linear>, SpecError> {
    Ok(Box::new(ParallelLinear::new("row-parallel-linear", args)?))
}

inventory::submit! {
    ModuleFactory {
        kind: "column-parallel-linear",
        aliases: &["ColumnParallelLinear"],
        summary: "dense linear, output features split across tensor-parallel ranks",
        registered_in: module_path!(),
        builder: Builder::ColumnParallelLinear(build_column),
    }
}

inventory::submit! {
    ModuleFactory {
        kind: "row-parallel-linear",
        aliases: &["RowParallelLinear"],
        summary: "dense linear, input features split across tensor-parallel ranks",
        registered_in: module_path!(),
        builder: Builder::RowParallelLinear(build_row),
    }
}
