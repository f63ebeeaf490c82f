//! Rebuilding a read model at the speed of the log: the whole log folded in
//! memory by the projection's own rules, then written with one `COPY` per
//! table into the fresh `__next` copies (their secondary indexes are built
//! after). A replay uses a projection's [`Fold`] when it has one, and its
//! set-wise [`crate::ProjectionLogic`] otherwise; the events written during
//! the rebuild are applied the ordinary way before the swap.
//!
//! A fold holds the read model in memory (one row per entry or attempt), so
//! its memory grows with the read model, not with the log.

use std::fmt::Display;

use futures::future::BoxFuture;
use podium_domain::log::RecordedEvent;
use sqlx::postgres::PgCopyIn;
use sqlx::PgConnection;

use crate::checkpointed::BoxError;

/// A read model computed in memory from consecutive events.
pub trait Fold: Send + Sync {
    /// Folds the next events of the log in.
    fn add(&mut self, events: &[RecordedEvent]) -> Result<(), BoxError>;

    /// Writes the result into the read model's `__next` tables.
    fn write<'c>(
        self: Box<Self>,
        conn: &'c mut PgConnection,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;
}

/// Bytes buffered before they are sent to the server.
const CHUNK: usize = 1 << 20;

/// Rows sent to a `COPY … FROM STDIN` in its text format, in chunks.
pub struct CopyWriter<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    buf: Vec<u8>,
    /// Whether the row being written has no field yet.
    row_start: bool,
}

impl<'c> CopyWriter<'c> {
    /// Starts `statement` (`COPY table (columns) FROM STDIN`).
    pub async fn start(conn: &'c mut PgConnection, statement: &str) -> Result<Self, sqlx::Error> {
        Ok(Self {
            copy: conn.copy_in_raw(statement).await?,
            buf: Vec::with_capacity(CHUNK + 4096),
            row_start: true,
        })
    }

    /// Fills `table`, emptied first in the caller's transaction, with rows
    /// of `columns` (a `__next` copy a fold writes): emptied in the same
    /// transaction, the rows can go in frozen (`COPY … FREEZE`), visible to
    /// every later snapshot with their hint bits and visibility map already
    /// set, so neither the index builds nor the vacuum after the swap write
    /// every page once more.
    pub async fn fresh(
        conn: &'c mut PgConnection,
        table: &str,
        columns: &str,
    ) -> Result<Self, sqlx::Error> {
        sqlx::query(&format!("TRUNCATE {table}"))
            .execute(&mut *conn)
            .await?;
        Self::start(
            conn,
            &format!("COPY {table} ({columns}) FROM STDIN WITH (FREEZE)"),
        )
        .await
    }

    /// The next field of the row, escaped as COPY's text format wants.
    pub fn field(&mut self, value: impl Display) -> &mut Self {
        use std::io::Write as _;
        if !self.row_start {
            self.buf.push(b'\t');
        }
        self.row_start = false;
        let start = self.buf.len();
        write!(self.buf, "{value}").expect("writing to a vector cannot fail");
        if self.buf[start..]
            .iter()
            .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
        {
            let raw = self.buf.split_off(start);
            for byte in raw {
                match byte {
                    b'\\' => self.buf.extend_from_slice(b"\\\\"),
                    b'\t' => self.buf.extend_from_slice(b"\\t"),
                    b'\n' => self.buf.extend_from_slice(b"\\n"),
                    b'\r' => self.buf.extend_from_slice(b"\\r"),
                    other => self.buf.push(other),
                }
            }
        }
        self
    }

    /// A SQL NULL, or `value`.
    pub fn optional(&mut self, value: Option<impl Display>) -> &mut Self {
        match value {
            Some(value) => self.field(value),
            None => {
                if !self.row_start {
                    self.buf.push(b'\t');
                }
                self.row_start = false;
                self.buf.extend_from_slice(b"\\N");
                self
            }
        }
    }

    /// Ends the row; sends what is buffered once it is large.
    pub async fn end_row(&mut self) -> Result<(), sqlx::Error> {
        self.buf.push(b'\n');
        self.row_start = true;
        if self.buf.len() >= CHUNK {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 4096));
            self.copy.send(full).await?;
        }
        Ok(())
    }

    /// Sends the rest and ends the COPY; returns the rows written.
    pub async fn finish(mut self) -> Result<u64, sqlx::Error> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.copy.send(rest).await?;
        }
        self.copy.finish().await
    }
}

/// A time as COPY reads it back exactly as a bound parameter is stored:
/// microseconds, truncated.
pub fn copy_time(at: chrono::DateTime<chrono::Utc>) -> impl Display {
    let micros = chrono::DateTime::from_timestamp_micros(at.timestamp_micros())
        .expect("a time from an event is in range");
    podium_domain::time::Rfc3339::new(&micros, podium_domain::time::Fraction::Micros)
}
