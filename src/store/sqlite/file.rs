//! The database file the store's connections have open, told apart from
//! whatever is at its path now. SQLite connections keep using a file that was
//! deleted or replaced (they hold descriptors to it): without this check a
//! restored backup would be served by connections writing into the deleted
//! file, acknowledged adds lost at the next restart.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use opentelemetry::metrics::ObservableGauge;

use crate::store::StoreError;

/// The WAL's size in bytes, 0 while there is none: it grows between
/// checkpoints, so a size that keeps rising means checkpoints can't keep up.
fn wal_size_gauge(wal: PathBuf) -> ObservableGauge<u64> {
    crate::instruments::meter()
        .u64_observable_gauge("user_manager.db.sqlite.wal.size")
        .with_unit("By")
        .with_description("Size of the SQLite write-ahead log")
        .with_callback(move |observer| {
            let size = std::fs::metadata(&wal).map_or(0, |meta| meta.len());
            observer.observe(size, &[]);
        })
        .build()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

fn id_of(path: &Path) -> io::Result<FileId> {
    let meta = std::fs::metadata(path)?;
    Ok(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// What is at the path, compared with the file the connections have open.
pub(super) enum AtPath {
    Same,
    Gone(io::Error),
    /// Another file; `now` is its identity.
    Replaced {
        now: FileId,
    },
}

pub(super) struct DbFile {
    path: PathBuf,
    wal: PathBuf,
    opened: Mutex<Opened>,
    /// `user_manager.db.sqlite.wal.size`, read from the file at each collection.
    _wal_size: ObservableGauge<u64>,
}

struct Opened {
    db: FileId,
    /// The WAL that goes with `db`, once one has been seen.
    wal: Option<FileId>,
}

impl DbFile {
    /// Records the file now at `path`: call once the connections are open.
    pub(super) fn new(path: PathBuf) -> Result<Self, StoreError> {
        let db = id_of(&path).map_err(|e| gone(&path, &e))?;
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        Ok(Self {
            opened: Mutex::new(Opened {
                db,
                wal: id_of(&wal).ok(),
            }),
            path,
            _wal_size: wal_size_gauge(wal.clone()),
            wal,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn opened(&self) -> std::sync::MutexGuard<'_, Opened> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn at_path(&self) -> AtPath {
        match id_of(&self.path) {
            Err(e) => AtPath::Gone(e),
            Ok(now) if now == self.opened().db => AtPath::Same,
            Ok(now) => AtPath::Replaced { now },
        }
    }

    /// For a write about to commit: refuses unless the path still holds the
    /// open file, so nothing is acknowledged into a deleted one.
    pub(super) fn ensure_same(&self) -> Result<(), StoreError> {
        match self.at_path() {
            AtPath::Same => Ok(()),
            AtPath::Gone(e) => Err(gone(&self.path, &e)),
            AtPath::Replaced { .. } => Err(replaced(&self.path)),
        }
    }

    /// Whether this process may read and write the file, by access(2):
    /// opening it would release SQLite's POSIX locks on it when closed.
    pub(super) fn check_access(&self) -> Result<(), StoreError> {
        use rustix::fs::Access;
        rustix::fs::access(&self.path, Access::READ_OK | Access::WRITE_OK)
            .map_err(|e| gone(&self.path, &e.into()))
    }

    /// Notes the WAL now at the path as the open file's: call while `Same`.
    pub(super) fn note_wal(&self) {
        if let Ok(wal) = id_of(&self.wal) {
            self.opened().wal = Some(wal);
        }
    }

    /// Whether the WAL at the path belongs to the file that was replaced.
    /// SQLite would pair it with the new file (and so would a restart),
    /// applying the old file's pages to it.
    pub(super) fn stale_wal(&self) -> bool {
        let opened = self.opened().wal;
        opened.is_some() && id_of(&self.wal).ok() == opened
    }

    /// Records `now` as the open file, once every connection has moved to it.
    pub(super) fn reopened(&self, now: FileId) {
        *self.opened() = Opened {
            db: now,
            wal: id_of(&self.wal).ok(),
        };
    }
}

fn gone(path: &Path, err: &io::Error) -> StoreError {
    StoreError::Unavailable(format!("{}: {err}", path.display()))
}

fn replaced(path: &Path) -> StoreError {
    StoreError::Unavailable(format!(
        "{} is not the file the connections have open (deleted, moved or replaced)",
        path.display()
    ))
}
