//! Which copy of a read model's tables a projection writes: the live one that
//! queries read, or the `__next` copy that a replay fills before swapping it in.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    Live,
    Next,
}

impl Generation {
    /// The name of `table` in this generation.
    pub fn table(self, table: &str) -> String {
        match self {
            Self::Live => table.to_string(),
            Self::Next => format!("{table}__next"),
        }
    }

    /// The checkpoint name of projection `name` in this generation.
    pub fn checkpoint(self, name: &str) -> String {
        self.table(name)
    }
}
