//! CUDA-graph capture of libtorch work, our kernels included: a decode step is captured once
//! and replayed with new inputs written into the captured tensors, as `torch.cuda.graph` does.
//!
//! ```no_run
//! # fn demo(step: impl FnMut() -> Result<tch::Tensor, attention_cuda::Error>) -> Result<(), attention_cuda::Error> {
//! use attention_cuda::graph::CudaGraph;
//! let (graph, output) = CudaGraph::capture(0, step)?;
//! // ... write the next inputs into the tensors the step read, then:
//! graph.replay()?; // `output` now holds the new step's result
//! # Ok(()) }
//! ```
//!
//! The capture runs on a side stream made libtorch's current stream (after synchronising the
//! device) and allocates from the graph's private memory pool, so tensors created while
//! capturing keep their memory for every replay. Host-side decisions inside the captured code
//! (shapes, offsets read on the host, kernel choices) are frozen into the graph: for the static
//! context's `flash_decode`, call `StaticInferenceContext::refresh_decode_offsets` between
//! replays, which writes the new offsets where the captured kernels read them.

use crate::Error;
use crate::shim::RawGraph;

/// A captured CUDA graph.
#[derive(Debug)]
pub struct CudaGraph {
    raw: RawGraph,
}

impl CudaGraph {
    /// Captures the CUDA work `f` queues on libtorch's current stream of device `ordinal`.
    /// Returns the graph and `f`'s result (whose tensors the replays overwrite in place). When
    /// `f` fails, the capture is ended and discarded and `f`'s error returned; the previous
    /// stream is restored either way. The work is captured, not run: replay to run it.
    pub fn capture<T, E>(ordinal: usize, f: impl FnOnce() -> Result<T, E>) -> Result<(Self, T), E>
    where
        E: From<Error>,
    {
        let mut raw = RawGraph::begin(ordinal)?;
        let out = f();
        let ended = raw.end();
        let out = out?;
        ended?;
        Ok((Self { raw }, out))
    }

    /// Runs the captured work again on libtorch's current stream.
    pub fn replay(&self) -> Result<(), Error> {
        self.raw.replay()
    }
}
