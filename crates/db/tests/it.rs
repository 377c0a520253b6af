//! Integration tests of the metadata store: one story, run on SQLite and on PostgreSQL.

mod it {
    pub mod console;
    pub mod story;
}
