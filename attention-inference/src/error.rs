//! The error type of the inference contexts.

/// A request identifier, chosen by the caller.
pub type RequestId = u64;

/// Why an inference context refused a call. Every refusal leaves the context as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InferenceError {
    /// The step would write past `max_sequence_length`.
    #[error("sequence_len_offset {offset} + {tokens} new tokens exceeds max_sequence_length {max}")]
    SequenceLimit {
        /// Tokens already cached.
        offset: i64,
        /// Tokens in the step.
        tokens: i64,
        /// The limit.
        max: i64,
    },
    /// The step's batch rows would run past `max_batch_size`.
    #[error("batch_size_offset {offset} + batch {batch} exceeds max_batch_size {max}")]
    BatchLimit {
        /// First batch row.
        offset: i64,
        /// Batch size of the step.
        batch: i64,
        /// The limit.
        max: i64,
    },
    /// The rotary table does not cover every position the step touches.
    #[error("the rotary table has {rows} rows, the step needs positions up to {needed}")]
    RotaryTooShort {
        /// Rows of the table.
        rows: i64,
        /// Positions needed.
        needed: i64,
    },
    /// A layer the context holds no memory for.
    #[error("layer {layer_number} is outside this context's layers {first}..={last}")]
    UnknownLayer {
        /// The global layer number asked for.
        layer_number: i64,
        /// First global layer held.
        first: i64,
        /// Last global layer held.
        last: i64,
    },
    /// The cached memory of a layer does not fit the tensors of this call (heads, head
    /// dimension, dtype or device changed).
    #[error("layer {layer_number}: {reason}")]
    LayoutMismatch {
        /// The layer.
        layer_number: i64,
        /// What differs.
        reason: String,
    },
    /// Not enough free KV blocks for the step.
    #[error("out of KV blocks: the step needs {needed}, {free} are free (of {total})")]
    OutOfBlocks {
        /// Blocks the step needs.
        needed: i64,
        /// Free blocks.
        free: i64,
        /// All blocks.
        total: i64,
    },
    /// A prompt longer than the whole KV memory.
    #[error("request {id}: {tokens} prompt tokens exceed the whole KV memory ({capacity} tokens)")]
    RequestTooLong {
        /// The request.
        id: RequestId,
        /// Its prompt length.
        tokens: i64,
        /// `num_blocks * block_size`.
        capacity: i64,
    },
    /// A request id not known to the context.
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// A request id already in use.
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
    /// A call that needs a scheduled step, made without one.
    #[error("no step is scheduled: call schedule() first")]
    NoStep,
    /// A call that must not happen while a step is scheduled.
    #[error("a step is in progress: commit_step() or abort_step() first")]
    StepInProgress,
    /// The hidden states of a step do not match the scheduled tokens.
    #[error("the step has {scheduled} scheduled tokens, the layer got {got} (shape {shape:?})")]
    StepShape {
        /// Tokens scheduled.
        scheduled: i64,
        /// Tokens received.
        got: i64,
        /// Shape received.
        shape: Vec<i64>,
    },
    /// A bad argument (sizes, swap indices).
    #[error("{0}")]
    Invalid(String),
}

impl From<InferenceError> for attention_spec::ForwardError {
    fn from(e: InferenceError) -> Self {
        Self::Context(Box::new(e))
    }
}
