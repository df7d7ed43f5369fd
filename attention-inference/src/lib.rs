//! Inference.
