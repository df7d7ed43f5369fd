//! Custom autograd functions in Rust, and the few other libtorch calls tch does not bind.
//!
//! tch cannot define autograd functions. This module reaches libtorch's
//! `torch::autograd::Function` through a small C++ shim (`shim/shim.cpp`) whose forward and
//! backward call back into Rust, so a [`Function`] written here takes part in libtorch's
//! autograd like any built-in op. Selective recompute
//! ([`checkpoint`](crate::recompute::checkpoint)) and delayed weight gradients are built on it.
//!
//! Also here: [`accumulate_grad`] (`param.grad += g`), the default generators' states
//! ([`rng_state`], [`set_rng_state`]) and the device caching allocator's statistics
//! ([`device_memory`]).

use std::any::Any;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use attention_spec::ForwardError;
use tch::{Device, Tensor};

/// A differentiable operation with a Rust forward and backward.
///
/// `forward` runs with gradient recording off (as in `torch.autograd.Function`); whatever
/// `backward` needs it keeps in `self`. `backward` gets one gradient per output (zeros for
/// outputs that got none) and returns one gradient per input, `None` for inputs that need none.
/// The function is dropped with the autograd graph that holds it.
pub trait Function: Send + 'static {
    /// Outputs from inputs.
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError>;
    /// Input gradients from output gradients.
    fn backward(&mut self, grad_outputs: &[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError>;
}
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;

    pub(super) type Callback = unsafe extern "C" fn(
        state: *mut c_void,
        inputs: *mut *mut C_tensor,
        n_in: i64,
        outputs: *mut *mut C_tensor,
        n_out: i64,
        err: *mut c_char,
        errlen: i64,
    ) -> c_int;
    pub(super) type Drop = unsafe extern "C" fn(state: *mut c_void);

    unsafe extern "C" {
        pub(super) fn attn_custom_apply(
            inputs: *mut *mut C_tensor,
            n_in: i64,
            n_out: i64,
            state: *mut c_void,
            fwd: Callback,
            bwd: Callback,
            drop: Drop,
            outputs: *mut *mut C_tensor,
            err: *mut c_char,
            errlen: i64,
        ) -> c_int;
        pub(super) fn attn_is_grad_enabled() -> c_int;
        pub(super) fn attn_accumulate_grad(
            param: *mut C_tensor,
            grad: *mut C_tensor,
            err: *mut c_char,
            errlen: i64,
        ) -> c_int;
        pub(super) fn attn_rng_get_state(
            device_type: c_int,
            index: i64,
            err: *mut c_char,
            errlen: i64,
        ) -> *mut C_tensor;
        pub(super) fn attn_rng_set_state(
            device_type: c_int,
            index: i64,
            state: *mut C_tensor,
            err: *mut c_char,
            errlen: i64,
        ) -> c_int;
        pub(super) fn attn_device_memory(
            index: i64,
            reset_peak: c_int,
            current: *mut i64,
            peak: *mut i64,
            err: *mut c_char,
            errlen: i64,
        ) -> c_int;
    }
}

const ERR_LEN: usize = 2048;

fn shim_error(buf: &[u8]) -> ForwardError {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    ForwardError::Invalid {
        name: "libtorch",
        reason: String::from_utf8_lossy(&buf[..end]).into_owned(),
    }
}

fn write_err(err: *mut c_char, errlen: i64, msg: &str) {
    if err.is_null() || errlen <= 0 {
        return;
    }
    let n = msg.len().min(errlen as usize - 1);
    // SAFETY: the shim passes a buffer of `errlen` bytes; we write at most errlen - 1 bytes and
    // a terminating zero.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic in a custom autograd function".into())
}

type Boxed = Box<dyn Function>;

/// Runs `f` on the tensors the shim passed (adopting them) and hands back the results.
///
/// # Safety
/// `inputs` holds `n_in` owned `at::Tensor*` made by the shim; `outputs` has room for `n_out`.
unsafe fn trampoline(
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: i64,
    outputs: *mut *mut torch_sys::C_tensor,
    n_out: i64,
    err: *mut c_char,
    errlen: i64,
    f: impl FnOnce(&[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError>,
) -> c_int {
    // SAFETY: the shim passes n_in owned tensors; from_ptr takes ownership of each exactly once.
    let ins: Vec<Tensor> =
        (0..n_in as usize).map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) }).collect();
    let result = catch_unwind(AssertUnwindSafe(|| f(&ins)));
    let outs = match result {
        Ok(Ok(outs)) => outs,
        Ok(Err(e)) => {
            write_err(err, errlen, &e.to_string());
            return 1;
        }
        Err(p) => {
            write_err(err, errlen, &panic_message(p));
            return 1;
        }
    };
    if outs.len() != n_out as usize {
        write_err(
            err,
            errlen,
            &format!("a custom function returned {} tensors, expected {n_out}", outs.len()),
        );
        return 1;
    }
    for (i, t) in outs.into_iter().enumerate() {
        let ptr = match t {
            Some(mut t) => {
                let p = t.as_mut_ptr();
                // The shim takes ownership of the at::Tensor and deletes it.
                std::mem::forget(t);
                p
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: `outputs` has room for n_out pointers and i < n_out.
        unsafe { *outputs.add(i) = ptr };
    }
    0
}
unsafe extern "C" fn forward_cb(
    state: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: i64,
    outputs: *mut *mut torch_sys::C_tensor,
    n_out: i64,
    err: *mut c_char,
    errlen: i64,
) -> c_int {
    // SAFETY: `state` is the Box<Boxed> given to attn_custom_apply, alive until drop_cb, and
    // the shim never calls forward and backward of one function concurrently.
    let f = unsafe { &mut *state.cast::<Boxed>() };
    // SAFETY: pointers as documented by the shim.
    unsafe {
        trampoline(inputs, n_in, outputs, n_out, err, errlen, |ins| {
            Ok(f.forward(ins)?.into_iter().map(Some).collect())
        })
    }
}
unsafe extern "C" fn backward_cb(
    state: *mut c_void,
    inputs: *mut *mut torch_sys::C_tensor,
    n_in: i64,
    outputs: *mut *mut torch_sys::C_tensor,
    n_out: i64,
    err: *mut c_char,
    errlen: i64,
) -> c_int {
    // SAFETY: as in forward_cb.
    let f = unsafe { &mut *state.cast::<Boxed>() };
    // SAFETY: pointers as documented by the shim.
    unsafe { trampoline(inputs, n_in, outputs, n_out, err, errlen, |grads| f.backward(grads)) }
}
unsafe extern "C" fn drop_cb(state: *mut c_void) {
    // SAFETY: `state` came from Box::into_raw in apply and the shim drops it exactly once.
    drop(unsafe { Box::from_raw(state.cast::<Boxed>()) });
}

/// Applies a custom function to `inputs`, returning its `n_out` outputs; the outputs carry a
/// gradient function when any input requires a gradient.
pub fn apply(
    function: Box<dyn Function>,
    inputs: &[&Tensor],
    n_out: usize,
) -> Result<Vec<Tensor>, ForwardError> {
    let mut ins: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    let mut in_ptrs: Vec<*mut torch_sys::C_tensor> =
        ins.iter_mut().map(|t| t.as_mut_ptr()).collect();
    let mut out_ptrs: Vec<*mut torch_sys::C_tensor> = vec![std::ptr::null_mut(); n_out];
    let state = Box::into_raw(Box::new(function)).cast::<c_void>();
    let mut err = [0u8; ERR_LEN];
    // SAFETY: in_ptrs point to live tensors (kept by `ins`), out_ptrs has n_out slots, the shim
    // takes ownership of `state` and frees it through drop_cb.
    let rc = unsafe {
        ffi::attn_custom_apply(
            in_ptrs.as_mut_ptr(),
            in_ptrs.len() as i64,
            n_out as i64,
            state,
            forward_cb,
            backward_cb,
            drop_cb,
            out_ptrs.as_mut_ptr(),
            err.as_mut_ptr().cast(),
            ERR_LEN as i64,
        )
    };
    drop(ins);
    if rc != 0 {
        return Err(shim_error(&err));
    }
    // SAFETY: on success the shim filled every slot with a new at::Tensor* we now own.
    let outs = out_ptrs.into_iter().map(|p| unsafe { Tensor::from_ptr(p) }).collect();
    Ok(outs)
}

/// Whether autograd records operations on this thread (`torch.is_grad_enabled()`).
pub fn is_grad_enabled() -> bool {
    // SAFETY: a pure query of a thread-local flag.
    unsafe { ffi::attn_is_grad_enabled() != 0 }
}

/// `param.grad += grad` (or `= grad` when `param` has no gradient yet), outside autograd.
pub fn accumulate_grad(param: &Tensor, grad: &Tensor) -> Result<(), ForwardError> {
    let (mut p, mut g) = (param.shallow_clone(), grad.shallow_clone());
    let mut err = [0u8; ERR_LEN];
    // SAFETY: both pointers are live tensors for the duration of the call.
    let rc = unsafe {
        ffi::attn_accumulate_grad(
            p.as_mut_ptr(),
            g.as_mut_ptr(),
            err.as_mut_ptr().cast(),
            ERR_LEN as i64,
        )
    };
    if rc == 0 { Ok(()) } else { Err(shim_error(&err)) }
}

fn device_code(device: Device) -> (c_int, i64) {
    match device {
        Device::Cuda(i) => (1, i as i64),
        _ => (0, 0),
    }
}

/// The state of the default random generator of `device` (CPU or CUDA).
pub fn rng_state(device: Device) -> Result<Tensor, ForwardError> {
    let (ty, idx) = device_code(device);
    let mut err = [0u8; ERR_LEN];
    // SAFETY: the shim returns a new at::Tensor* or null.
    let p = unsafe { ffi::attn_rng_get_state(ty, idx, err.as_mut_ptr().cast(), ERR_LEN as i64) };
    if p.is_null() {
        return Err(shim_error(&err));
    }
    // SAFETY: p is a new at::Tensor* we own.
    Ok(unsafe { Tensor::from_ptr(p) })
}

/// Restores a state from [`rng_state`].
pub fn set_rng_state(device: Device, state: &Tensor) -> Result<(), ForwardError> {
    let (ty, idx) = device_code(device);
    let mut s = state.shallow_clone();
    let mut err = [0u8; ERR_LEN];
    // SAFETY: s is a live tensor for the duration of the call.
    let rc = unsafe {
        ffi::attn_rng_set_state(ty, idx, s.as_mut_ptr(), err.as_mut_ptr().cast(), ERR_LEN as i64)
    };
    if rc == 0 { Ok(()) } else { Err(shim_error(&err)) }
}

/// `(current, peak)` bytes allocated by the caching allocator of CUDA device `index`;
/// `reset_peak` first restarts the peak at the current value.
pub fn device_memory(index: usize, reset_peak: bool) -> Result<(i64, i64), ForwardError> {
    let (mut current, mut peak) = (0i64, 0i64);
    let mut err = [0u8; ERR_LEN];
    // SAFETY: the out pointers are valid for the call.
    let rc = unsafe {
        ffi::attn_device_memory(
            index as i64,
            c_int::from(reset_peak),
            &mut current,
            &mut peak,
            err.as_mut_ptr().cast(),
            ERR_LEN as i64,
        )
    };
    if rc == 0 { Ok((current, peak)) } else { Err(shim_error(&err)) }
}
