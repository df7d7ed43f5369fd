//! FFI to `shim/cuda_shim.cpp` (libtorch's stream, SDPA switches, the `[s, b, h, d]` SDPA call
//! and its inputs' signature, varlen flash attention) and
//! `shim/graph_shim.cpp` (CUDA-graph capture through libtorch).

use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::Error;

unsafe extern "C" {
    fn attn_cuda_current_stream(device: i64, err: *mut c_char, errlen: i64) -> *mut c_void;
    fn attn_sdp_set(flash: c_int, mem_efficient: c_int, math: c_int, cudnn: c_int);
    fn attn_sdp_get(
        flash: *mut c_int,
        mem_efficient: *mut c_int,
        math: *mut c_int,
        cudnn: *mut c_int,
    );
    fn attn_flash_varlen_fwd(
        q: *mut C_tensor,
        k: *mut C_tensor,
        v: *mut C_tensor,
        cu_q: *mut C_tensor,
        cu_k: *mut C_tensor,
        max_q: i64,
        max_k: i64,
        dropout: f64,
        causal: c_int,
        scale: f64,
        outs: *mut *mut C_tensor,
        err: *mut c_char,
        errlen: i64,
    ) -> c_int;
    fn attn_flash_varlen_bwd(
        grad_out: *mut C_tensor,
        q: *mut C_tensor,
        k: *mut C_tensor,
        v: *mut C_tensor,
        out: *mut C_tensor,
        lse: *mut C_tensor,
        cu_q: *mut C_tensor,
        cu_k: *mut C_tensor,
        max_q: i64,
        max_k: i64,
        dropout: f64,
        causal: c_int,
        rng_state: *mut C_tensor,
        unused: *mut C_tensor,
        scale: f64,
        grads: *mut *mut C_tensor,
        err: *mut c_char,
        errlen: i64,
    ) -> c_int;
    fn attn_sdpa_sbhd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        backend: i64,
        dropout: f64,
        causal: c_int,
        scale: f64,
        gqa: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        errlen: i64,
    ) -> c_int;
    fn attn_cudnn_lse_sbhd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        causal: c_int,
        scale: f64,
        outs: *mut *mut C_tensor,
        err: *mut c_char,
        errlen: i64,
    ) -> c_int;
    fn attn_sdpa_signature(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        sig: *mut i64,
        cap: i64,
    ) -> c_int;
}

unsafe extern "C" {
    fn attn_graph_begin(device: i64, err: *mut c_char, errlen: i64) -> *mut c_void;
    fn attn_graph_end(graph: *mut c_void, err: *mut c_char, errlen: i64) -> c_int;
    fn attn_graph_replay(graph: *mut c_void, err: *mut c_char, errlen: i64) -> c_int;
    fn attn_graph_free(graph: *mut c_void);
}

const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs a shim call that returns 0 on success and otherwise writes its message (libtorch's
/// exception) into the buffer it is given: `call(buffer, its length)`.
fn checked(call: impl FnOnce(*mut c_char, i64) -> c_int) -> Result<(), Error> {
    let mut err = [0u8; ERR_LEN];
    if call(err.as_mut_ptr().cast(), ERR_LEN as i64) != 0 {
        Err(Error::Torch(message(&err)))
    } else {
        Ok(())
    }
}

/// libtorch's current CUDA stream on `device`.
pub(crate) fn current_stream(device: usize) -> Result<*mut c_void, Error> {
    let mut err = [0u8; ERR_LEN];
    // SAFETY: the shim only reads libtorch's stream registry and writes at most ERR_LEN bytes.
    let p =
        unsafe { attn_cuda_current_stream(device as i64, err.as_mut_ptr().cast(), ERR_LEN as i64) };
    if p as isize == -1 { Err(Error::Driver(message(&err))) } else { Ok(p) }
}

/// Which SDPA backends libtorch may choose: `[flash, mem_efficient, math, cudnn]`.
pub fn sdp_backends() -> [bool; 4] {
    let (mut f, mut m, mut a, mut c) = (0, 0, 0, 0);
    // SAFETY: plain reads of libtorch's global context into valid out pointers.
    unsafe { attn_sdp_get(&mut f, &mut m, &mut a, &mut c) };
    [f != 0, m != 0, a != 0, c != 0]
}

/// Sets the SDPA backends libtorch may choose (process-wide).
pub fn set_sdp_backends([flash, mem_efficient, math, cudnn]: [bool; 4]) {
    // SAFETY: plain writes of libtorch's global flags.
    unsafe {
        attn_sdp_set(
            c_int::from(flash),
            c_int::from(mem_efficient),
            c_int::from(math),
            c_int::from(cudnn),
        )
    };
}

fn adopt(p: *mut C_tensor) -> Tensor {
    // SAFETY: the shim returned a new at::Tensor* that we now own.
    unsafe { Tensor::from_ptr(p) }
}

/// `[sq, b, hq * hn]` attention of `[sq, b, hq, hn]` queries and `[sk, b, hkv, hn]` keys and
/// values as one SDPA call without a mask (`call`), in one trip through the shim: backend 3
/// (cuDNN, libtorch's `_fused_sdp_choice` code) runs `_scaled_dot_product_cudnn_attention` as
/// `scaled_dot_product_attention` does once it has chosen cuDNN, without choosing again; other
/// codes run `scaled_dot_product_attention` (under the caller's backend switches).
pub(crate) fn sdpa_sbhd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    backend: i64,
    call: &attention_core::sdpa::PlainSdpa,
) -> Result<Tensor, Error> {
    let mut out = std::ptr::null_mut();
    checked(|err, len| {
        // SAFETY: the tensor pointers are live for the call and only read; the shim writes one
        // new tensor.
        unsafe {
            attn_sdpa_sbhd(
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                backend,
                call.dropout,
                c_int::from(call.causal),
                call.scale,
                c_int::from(call.gqa),
                &mut out,
                err,
                len,
            )
        }
    })?;
    Ok(adopt(out))
}

/// cuDNN's attention (`aten::_scaled_dot_product_cudnn_attention`) with its log-sum-exp, no
/// dropout or bias: `q` `[sq, b, hq, d]`, `k`, `v` `[sk, b, hkv, d]` (GQA: `hq` a multiple of
/// `hkv`), causal top-left. Returns the output `[sq, b, hq, d]` (a view, in the layout cuDNN
/// chose) and the natural-log log-sum-exp `[b, hq, sq]` in fp32.
pub(crate) fn cudnn_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor), Error> {
    let mut outs = [std::ptr::null_mut(); 2];
    checked(|err, len| {
        // SAFETY: the tensor pointers are live for the call and only read; `outs` has room for
        // the 2 results.
        unsafe {
            attn_cudnn_lse_sbhd(
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                c_int::from(causal),
                scale,
                outs.as_mut_ptr(),
                err,
                len,
            )
        }
    })?;
    let [out, lse] = outs.map(adopt);
    Ok((out, lse))
}

/// Values of [`sdpa_signature`]: 14 per tensor, then two flags.
pub(crate) const SDPA_SIGNATURE: usize = 3 * 14 + 2;

/// What libtorch's SDPA backend choice depends on in `q`, `k` and `v`, read in one call: per
/// tensor its dimensions, first 4 sizes and strides, dtype, device type and index, data
/// pointer modulo 16 and gradient flag; then whether grad mode is on and libtorch's
/// deterministic-algorithms flag. `None` for a tensor without data to point at (undefined,
/// sparse, ...).
pub(crate) fn sdpa_signature(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<[i64; SDPA_SIGNATURE]> {
    let mut sig = [0i64; SDPA_SIGNATURE];
    (signature_into(q, k, v, &mut sig) == 0).then_some(sig)
}

/// The shim's signature call into `sig`: 0 written, 1 unreadable tensor, 2 `sig` too short
/// (nothing written).
fn signature_into(q: &Tensor, k: &Tensor, v: &Tensor, sig: &mut [i64]) -> c_int {
    // SAFETY: the tensor pointers are live for the call and only read; the shim writes only
    // where `sig`'s length holds every value, and throws nothing.
    unsafe {
        attn_sdpa_signature(q.as_ptr(), k.as_ptr(), v.as_ptr(), sig.as_mut_ptr(), sig.len() as i64)
    }
}

/// `(out, logsumexp, rng_state, unused)` of `aten::_flash_attention_forward` on packed
/// sequences.
#[expect(clippy::too_many_arguments, reason = "mirrors the ATen schema")]
pub(crate) fn flash_varlen_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &Tensor,
    cu_k: &Tensor,
    max_q: i64,
    max_k: i64,
    dropout: f64,
    causal: bool,
    scale: f64,
) -> Result<[Tensor; 4], Error> {
    let (mut q, mut k, mut v, mut cq, mut ck) = (
        q.shallow_clone(),
        k.shallow_clone(),
        v.shallow_clone(),
        cu_q.shallow_clone(),
        cu_k.shallow_clone(),
    );
    let mut outs = [std::ptr::null_mut(); 4];
    checked(|err, len| {
        // SAFETY: every tensor pointer is live for the call; `outs` has room for 4 results.
        unsafe {
            attn_flash_varlen_fwd(
                q.as_mut_ptr(),
                k.as_mut_ptr(),
                v.as_mut_ptr(),
                cq.as_mut_ptr(),
                ck.as_mut_ptr(),
                max_q,
                max_k,
                dropout,
                c_int::from(causal),
                scale,
                outs.as_mut_ptr(),
                err,
                len,
            )
        }
    })?;
    Ok(outs.map(adopt))
}

/// `(dq, dk, dv)` of `aten::_flash_attention_backward` for [`flash_varlen_forward`].
#[expect(clippy::too_many_arguments, reason = "mirrors the ATen schema")]
pub(crate) fn flash_varlen_backward(
    grad_out: &Tensor,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    saved: &[Tensor; 4],
    cu_q: &Tensor,
    cu_k: &Tensor,
    max_q: i64,
    max_k: i64,
    dropout: f64,
    causal: bool,
    scale: f64,
) -> Result<[Tensor; 3], Error> {
    let mut t: Vec<Tensor> = [grad_out, q, k, v, out, &saved[1], cu_q, cu_k, &saved[2], &saved[3]]
        .iter()
        .map(|t| t.shallow_clone())
        .collect();
    let mut grads = [std::ptr::null_mut(); 3];
    let p: Vec<*mut C_tensor> = t.iter_mut().map(Tensor::as_mut_ptr).collect();
    let done = checked(|err, len| {
        // SAFETY: every tensor pointer is live for the call (kept by `t`); `grads` has room for 3.
        unsafe {
            attn_flash_varlen_bwd(
                p[0],
                p[1],
                p[2],
                p[3],
                p[4],
                p[5],
                p[6],
                p[7],
                max_q,
                max_k,
                dropout,
                c_int::from(causal),
                p[8],
                p[9],
                scale,
                grads.as_mut_ptr(),
                err,
                len,
            )
        }
    });
    drop(t);
    done?;
    Ok(grads.map(adopt))
}

/// A libtorch `at::cuda::CUDAGraph`, owned.
#[derive(Debug)]
pub(crate) struct RawGraph(*mut c_void);

// SAFETY: the graph is only touched through &mut self or by value (begin/end/replay/free), and
// libtorch's CUDAGraph may be used from any thread.
unsafe impl Send for RawGraph {}

impl RawGraph {
    /// Synchronises `device`, makes a side stream libtorch's current stream and starts capturing.
    pub(crate) fn begin(device: usize) -> Result<Self, Error> {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the shim writes at most ERR_LEN bytes; a null return carries the message.
        let g = unsafe { attn_graph_begin(device as i64, err.as_mut_ptr().cast(), ERR_LEN as i64) };
        if g.is_null() { Err(Error::Torch(message(&err))) } else { Ok(Self(g)) }
    }

    /// Ends the capture and restores the previous stream (also when ending fails).
    pub(crate) fn end(&mut self) -> Result<(), Error> {
        // SAFETY: self.0 is a live graph from `begin`.
        checked(|err, len| unsafe { attn_graph_end(self.0, err, len) })
    }

    /// Replays the captured work.
    pub(crate) fn replay(&self) -> Result<(), Error> {
        // SAFETY: self.0 is a live graph; replaying an unfinished capture is an error libtorch
        // reports as an exception, which the shim returns.
        checked(|err, len| unsafe { attn_graph_replay(self.0, err, len) })
    }
}

impl Drop for RawGraph {
    fn drop(&mut self) {
        // SAFETY: self.0 is a live graph, freed once.
        unsafe { attn_graph_free(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// The signature fills exactly its SDPA_SIGNATURE values (a buffer one short is refused
    /// and left as it was), and they read back as documented, on CPU tensors (no GPU needed).
    #[test]
    fn sdpa_signature_fills_its_buffer_exactly() {
        let q = Tensor::zeros([6, 2, 4, 8], (Kind::BFloat16, Device::Cpu)).permute([1, 2, 0, 3]);
        let k = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
        let v = Tensor::zeros([7], (Kind::Half, Device::Cpu));
        let mut short = [-7i64; SDPA_SIGNATURE - 1];
        assert_eq!(signature_into(&q, &k, &v, &mut short), 2);
        assert!(short.iter().all(|&x| x == -7), "a refused call wrote {short:?}");
        let sig = sdpa_signature(&q, &k, &v).expect("readable tensors");
        // q: 4 dims, sizes and strides of the permuted view.
        assert_eq!(&sig[..9], &[4, 2, 4, 6, 8, 32, 8, 64, 1]);
        // k: 2 dims, the rest -1; v: 1 dim.
        assert_eq!(&sig[14..23], &[2, 3, 5, -1, -1, 5, 1, -1, -1]);
        assert_eq!(&sig[28..37], &[1, 7, -1, -1, -1, 1, -1, -1, -1]);
        // Gradient flags off, grad mode on (the test thread's default).
        assert_eq!([sig[13], sig[27], sig[41], sig[42]], [0, 0, 0, 1]);
        let undefined = Tensor::new();
        assert!(sdpa_signature(&q, &undefined, &v).is_none());
    }
}
