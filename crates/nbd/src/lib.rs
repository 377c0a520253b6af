//! Read-only NBD export of a stored image version over a unix socket

#![forbid(unsafe_code)]
