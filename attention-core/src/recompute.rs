//! Activation checkpointing (Megatron's `tensor_parallel.checkpoint`): a function whose forward
//! keeps only its inputs, and whose backward runs it again with gradients and backpropagates
//! through that recomputation.
//!
//! The random generators of the inputs' devices are saved before the forward and restored
//! around the recomputation, so dropout draws the same mask twice and the gradients equal
//! those of the plain path.

use attention_spec::ForwardError;
use tch::{Device, Kind, Tensor};

use crate::autograd::{Function, apply, rng_state, set_rng_state};

/// A function of tensors that [`checkpoint`] can run twice.
pub type Recomputable = Box<dyn Fn(&[Tensor]) -> Result<Tensor, ForwardError> + Send>;

struct Checkpoint {
    f: Recomputable,
    saved: Vec<Tensor>,
    requires_grad: Vec<bool>,
    rng: Vec<(Device, Tensor)>,
}

impl Function for Checkpoint {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError> {
        let mut devices = vec![Device::Cpu];
        for t in inputs {
            if t.device() != Device::Cpu && !devices.contains(&t.device()) {
                devices.push(t.device());
            }
        }
        self.rng = devices
            .into_iter()
            .map(|d| Ok((d, rng_state(d)?)))
            .collect::<Result<_, ForwardError>>()?;
        self.saved = inputs.iter().map(Tensor::detach).collect();
        // With gradients recorded, as the recomputation will be: libtorch may dispatch an op
        // (SDPA) to another kernel without them, and then forward and backward would not see
        // the same values. The graph is dropped right here; only the inputs are kept.
        let out = if self.requires_grad.iter().any(|&r| r) {
            tch::with_grad(|| (self.f)(inputs))?
        } else {
            (self.f)(inputs)?
        };
        Ok(vec![out.f_detach()?])
    }

    fn backward(&mut self, grad_outputs: &[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError> {
        // 1. Recompute with the forward's generator states, then put the current ones back.
        let current = self
            .rng
            .iter()
            .map(|(d, _)| Ok((*d, rng_state(*d)?)))
            .collect::<Result<Vec<_>, ForwardError>>()?;
        for (d, s) in &self.rng {
            set_rng_state(*d, s)?;
        }
        let inputs: Vec<Tensor> = self
            .saved
            .iter()
            .zip(&self.requires_grad)
            .map(|(t, &r)| if r { t.detach().set_requires_grad(true) } else { t.shallow_clone() })
            .collect();
        let out = tch::with_grad(|| (self.f)(&inputs));
        for (d, s) in &current {
            set_rng_state(*d, s)?;
        }
        let out = out?;
        // 2. Backpropagate the output gradient through the recomputed graph:
        //    d/dx sum(out * g) = (d out / dx)ᵀ g, exactly.
        let targets: Vec<&Tensor> =
            inputs.iter().zip(&self.requires_grad).filter(|(_, r)| **r).map(|(t, _)| t).collect();
        if targets.is_empty() {
            return Ok(inputs.iter().map(|_| None).collect());
        }
        let g = grad_outputs.first().ok_or(ForwardError::Invalid {
            name: "checkpoint",
            reason: "no output gradient".into(),
        })?;
        let loss = tch::with_grad(|| out.f_mul(g).and_then(|t| t.f_sum(Kind::Float)))?;
        let mut grads = Tensor::f_run_backward(&[loss], &targets, false, false)?.into_iter();
        Ok(self.requires_grad.iter().map(|&r| if r { grads.next() } else { None }).collect())
    }
}

/// Runs `f(inputs)` keeping none of its intermediate tensors for backward; backward recomputes
/// them. `f` must be deterministic given the random generators' states.
pub fn checkpoint(f: Recomputable, inputs: &[&Tensor]) -> Result<Tensor, ForwardError> {
    let requires_grad = inputs.iter().map(|t| t.requires_grad()).collect();
    let function = Checkpoint { f, saved: Vec::new(), requires_grad, rng: Vec::new() };
    let mut out = apply(Box::new(function), inputs, 1)?;
    out.pop().ok_or(ForwardError::Invalid { name: "checkpoint", reason: "no output".into() })
}
