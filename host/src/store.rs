//! What must survive a runtime restart, in an embedded database (redb)
//! under the runtime's data directory: the runtime's own address, the
//! addresses of hyperties that asked to keep theirs, and the syncher's data
//! objects with their subscribers.
//!
//! redb commits are atomic and durable, so a crash mid-write leaves either
//! the old value or the new one.

use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

const ADDRESSES: TableDefinition<&str, &str> = TableDefinition::new("addresses");
/// Data object URL → its record (JSON).
const OBJECTS: TableDefinition<&str, &str> = TableDefinition::new("objects");
/// `<url>\u{1f}<observer>` → 1 (subscribed) or 2 (invited).
const MEMBERS: TableDefinition<&str, u8> = TableDefinition::new("object-members");

/// Separates a URL from an observer in member keys (never in an address).
const SEP: char = '\u{1f}';

/// A data object as kept: its URL, its record and its members.
pub(crate) type KeptObject = (String, String, Vec<(String, Membership)>);

/// What an address is to a data object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    Subscribed = 1,
    Invited = 2,
}

pub(crate) struct Store {
    db: Database,
}

impl Store {
    /// Opens (creating) `<dir>/runtime.redb`. Fails at once, naming the
    /// directory, if it is not private to this runtime's user
    /// ([`crate::private`]), and naming the file if another runtime (this
    /// process or another) has it open: redb locks the file for its one
    /// writer.
    pub fn open(dir: &Path) -> Result<Store> {
        crate::private::dir(dir).context("refusing the data directory")?;
        let path = dir.join("runtime.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "{} is in use by another runtime (the file is locked); stop that one, or give this one its own data directory (--data-dir)",
                path.display()
            ),
            e => anyhow::Error::new(e).context(format!("cannot open {}", path.display())),
        })?;
        Ok(Store { db })
    }

    /// The database, for modules keeping tables of their own in it
    /// (`protostub::outbox`).
    pub(crate) fn database(&self) -> &Database {
        &self.db
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

impl Store {
    /// Writes the record of object `url` (durably: a change acknowledged to
    /// the reporter survives a crash).
    pub fn save_object(&self, url: &str, record: &str) -> Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(OBJECTS)?.insert(url, record)?;
        write.commit()?;
        Ok(())
    }

    /// Forgets object `url` and its members.
    pub fn delete_object(&self, url: &str) -> Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(OBJECTS)?.remove(url)?;
        let (from, to) = (format!("{url}{SEP}"), format!("{url}\u{20}"));
        write.open_table(MEMBERS)?.retain_in(from.as_str()..to.as_str(), |_, _| false)?;
        write.commit()?;
        Ok(())
    }

    /// Records (or, with `None`, removes) what `observer` is to `url`.
    /// Not synced to disk on its own (a crash may lose the last changes, and
    /// those observers subscribe again); the next object write syncs it.
    pub fn set_member(&self, url: &str, observer: &str, membership: Option<Membership>) -> Result<()> {
        let mut write = self.db.begin_write()?;
        write.set_durability(Durability::None).map_err(|e| anyhow::anyhow!("{e}"))?;
        {
            let mut table = write.open_table(MEMBERS)?;
            let key = format!("{url}{SEP}{observer}");
            match membership {
                Some(m) => table.insert(key.as_str(), m as u8)?,
                None => table.remove(key.as_str())?,
            };
        }
        write.commit()?;
        Ok(())
    }

    /// Every object kept.
    pub fn objects(&self) -> Result<Vec<KeptObject>> {
        let read = self.db.begin_read()?;
        let Ok(objects) = read.open_table(OBJECTS) else { return Ok(Vec::new()) };
        let members = read.open_table(MEMBERS).ok();
        let mut all = Vec::new();
        for entry in objects.iter()? {
            let (url, record) = entry?;
            let url = url.value().to_owned();
            let mut list = Vec::new();
            if let Some(members) = &members {
                let (from, to) = (format!("{url}{SEP}"), format!("{url}\u{20}"));
                for m in members.range(from.as_str()..to.as_str())? {
                    let (key, kind) = m?;
                    let observer = key.value().split_once(SEP).map(|(_, o)| o.to_owned()).unwrap_or_default();
                    let kind = if kind.value() == Membership::Invited as u8 { Membership::Invited } else { Membership::Subscribed };
                    list.push((observer, kind));
                }
            }
            all.push((url, record.value().to_owned(), list));
        }
        Ok(all)
    }
}
