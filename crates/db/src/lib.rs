//! Server metadata behind one trait, on SQLite or PostgreSQL

#![forbid(unsafe_code)]
