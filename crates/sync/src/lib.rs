//! Moves image versions between server and laptop: 4 KiB block deltas, batched chunk fetch, resume

#![forbid(unsafe_code)]
