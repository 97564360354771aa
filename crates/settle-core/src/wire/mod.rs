//! The wire formats: the queue messages' bodies, the items file (JSON
//! Lines) read at load time, and the hand-written JSON encoders behind
//! both.

pub(crate) mod json;
pub mod jsonl;
pub mod message;
