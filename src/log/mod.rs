//! The event log, read in its one total order: the Postgres tail and reader
//! (gap-free while writers commit out of order), the reads that the readers
//! of one process share, and the embedded mode's in-memory log with its
//! optional file. May use `ops`.

pub mod memory;
pub mod postgres;
pub mod shared;
