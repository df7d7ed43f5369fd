//! `ColumnParallelLinear` and `RowParallelLinear` at tensor-parallel size 1, with Megatron's
//! semantics: `output = matmul(input, weight.t())`, then `+ bias` as a separate op unless the
//! layer was built with `skip_bias_add`, in which case the bias is returned instead. Weights are
//! `[out, in]`, initialised `N(0, init_std)`; biases are zero.
//!
//! With `delay_wgrad_compute` the layer's backward computes only the input gradient and keeps
//! `(input, output gradient)`; [`Linear::backward_dw`] computes the weight (and bias) gradients
//! later and accumulates them, with the same ops autograd would have run (so the gradients are
//! bitwise those of the ordinary backward). That split is what zero-bubble pipeline schedules
//! need; Megatron's local linears only have a no-op `backward_dw`.

use std::sync::{Arc, Mutex};

use attention_spec::ForwardError;
use attention_spec::SpecError;
use attention_spec::module::Linear;
use attention_spec::registry::{Builder, LinearArgs, ModuleFactory, NoParams};
use tch::{Kind, Tensor, nn};

use crate::autograd::{Function, accumulate_grad, apply, is_grad_enabled};

/// `(input, output gradient)` pairs waiting for `backward_dw`, shared by a layer and the
/// autograd nodes of its forwards.
type PendingWgrads = Arc<Mutex<Vec<(Tensor, Tensor)>>>;

/// A dense linear layer with Megatron's bias handling; both parallel kinds are this layer at
/// tensor-parallel size 1.
#[derive(Debug)]
pub struct ParallelLinear {
    kind: &'static str,
    weight: Tensor,
    bias: Option<Tensor>,
    skip_bias_add: bool,
    /// `Some` with `delay_wgrad_compute`: `(input, output gradient)` of backward passes whose
    /// weight gradients are not computed yet.
    pending: Option<PendingWgrads>,
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
        let pending = args.config.delay_wgrad_compute.then(|| Arc::new(Mutex::new(Vec::new())));
        Ok(Self { kind, weight, bias, skip_bias_add: args.skip_bias_add, pending })
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
        let inner_bias = if self.skip_bias_add { None } else { self.bias.as_ref() };
        let returned_bias =
            if self.skip_bias_add { self.bias.as_ref().map(Tensor::shallow_clone) } else { None };
        let tracks_grad = input.requires_grad() || self.weight.requires_grad();
        let out = match &self.pending {
            Some(pending) if tracks_grad && is_grad_enabled() => {
                let f = DelayedWgrad {
                    weight: self.weight.shallow_clone(),
                    has_bias: inner_bias.is_some(),
                    input: None,
                    pending: pending.clone(),
                };
                let mut inputs = vec![input, &self.weight];
                inputs.extend(inner_bias);
                apply(Box::new(f), &inputs, 1)?.remove(0)
            }
            _ => linear(input, &self.weight, inner_bias)?,
        };
        Ok((out, returned_bias))
    }

    fn backward_dw(&self) -> Result<usize, ForwardError> {
        let Some(pending) = &self.pending else { return Ok(0) };
        let work: Vec<(Tensor, Tensor)> =
            std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
        let n = work.len();
        for (x, dy) in work {
            let (out, inp) =
                (dy.size().last().copied().unwrap_or(0), x.size().last().copied().unwrap_or(0));
            let (x2, dy2) = (x.f_reshape([-1, inp])?, dy.f_reshape([-1, out])?);
            // As autograd's mm backward: grad(Wᵀ) = x2ᵀ · dy2, then transposed.
            let dw = tch::no_grad(|| x2.f_tr()?.f_mm(&dy2)?.f_tr())?;
            accumulate_grad(&self.weight, &dw)?;
            if let (Some(b), false) = (&self.bias, self.skip_bias_add) {
                accumulate_grad(b, &dy.f_sum_to_size([out])?)?;
            }
        }
        Ok(n)
    }

    fn pending_wgrads(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.lock().unwrap_or_else(|p| p.into_inner()).len())
    }

    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `matmul(input, weight.t())` then `+ bias`, Megatron's op sequence.
fn linear(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ForwardError> {
    let out = input.f_matmul(&weight.f_tr()?)?;
    Ok(match bias {
        Some(b) => out.f_add(b)?,
        None => out,
    })
}

/// The linear op of a delayed-wgrad layer: the backward returns the input gradient only and
/// queues `(input, output gradient)` for `backward_dw`.
struct DelayedWgrad {
    weight: Tensor,
    has_bias: bool,
    input: Option<Tensor>,
    pending: PendingWgrads,
}

impl Function for DelayedWgrad {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError> {
        let x = &inputs[0];
        self.input = Some(x.f_detach()?);
        Ok(vec![linear(x, &inputs[1], inputs.get(2))?])
    }

    fn backward(&mut self, grad_outputs: &[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError> {
        let dy = grad_outputs[0].f_detach()?;
        let x = self.input.as_ref().ok_or(ForwardError::Invalid {
            name: "linear",
            reason: "backward before forward".into(),
        })?;
        // As autograd's mm backward: grad(x2) = dy2 · W.
        let (out, inp) = (self.weight.size()[0], self.weight.size()[1]);
        let dx = dy.f_reshape([-1, out])?.f_mm(&self.weight)?.f_reshape(
            x.size().iter().take(x.dim() - 1).copied().chain([inp]).collect::<Vec<_>>(),
        )?;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push((x.shallow_clone(), dy));
        let mut grads = vec![Some(dx), None];
        if self.has_bias {
            grads.push(None);
        }
        Ok(grads)
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
