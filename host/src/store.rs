//! What must survive a runtime restart, in an embedded database (redb)
//! under the runtime's data directory: the runtime's own address and the
//! addresses of hyperties that asked to keep theirs.
//!
//! redb commits are atomic and durable, so a crash mid-write leaves either
//! the old value or the new one.

use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const ADDRESSES: TableDefinition<&str, &str> = TableDefinition::new("addresses");

pub(crate) struct Store {
    db: Database,
}

impl Store {
    /// Opens (creating) `<dir>/runtime.redb`.
    pub fn open(dir: &Path) -> Result<Store> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        let path = dir.join("runtime.redb");
        let db = Database::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Store { db })
    }

    /// The address stored under `key`, or the one `make` gives, stored
    /// first (one transaction, so concurrent callers agree).
    pub fn address(&self, key: &str, make: impl FnOnce() -> String) -> Result<String> {
        {
            let read = self.db.begin_read()?;
            if let Ok(table) = read.open_table(ADDRESSES)
                && let Some(value) = table.get(key)?
            {
                return Ok(value.value().to_owned());
            }
        }
        let write = self.db.begin_write()?;
        let address = {
            let mut table = write.open_table(ADDRESSES)?;
            let existing = table.get(key)?.map(|v| v.value().to_owned());
            match existing {
                Some(address) => address,
                None => {
                    let address = make();
                    table.insert(key, address.as_str())?;
                    address
                }
            }
        };
        write.commit()?;
        Ok(address)
    }
}
