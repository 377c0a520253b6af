//! Tandem laptop agent: identity, check-in, lease and kill gate, image sync, VM orchestration, local UI

#![forbid(unsafe_code)]
