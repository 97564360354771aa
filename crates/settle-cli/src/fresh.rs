//! A database that a command created and then put nothing in (its load
//! was refused, or stopped) is removed again when the command fails, with
//! its `-wal` and `-shm` files and the directories made for it: a refused
//! command leaves nothing behind, and the next one in the wrong directory
//! is told "no database" rather than shown an empty one.
//!
//! The items cannot all be checked before the database exists without
//! reading them twice (stdin cannot be), and a second parse would slow
//! every first load; the load itself checks them, in one transaction.

use crate::deployment::Deployment;
use std::path::{Path, PathBuf};

/// What did not exist before a command opened its database.
#[derive(Debug)]
pub(crate) struct Fresh {
    db: PathBuf,
    /// Directories the open creates, innermost first.
    dirs: Vec<PathBuf>,
}

impl Fresh {
    /// `None` when anything is at `db` already (a database, or a file
    /// that is not one, or a link): that is not this command's to remove.
    pub(crate) fn before(db: &Path) -> Option<Self> {
        if std::fs::symlink_metadata(db).is_ok() {
            return None;
        }
        let mut dirs = Vec::new();
        let mut dir = db.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if std::fs::symlink_metadata(d).is_ok() {
                break;
            }
            dirs.push(d.to_owned());
            dir = d.parent();
        }
        Some(Self {
            db: db.to_owned(),
            dirs,
        })
    }

    /// Removes the database if it holds nothing: no run and no item. The
    /// check and the removal hold the database's write lock, so that what
    /// another command loaded into the new file meanwhile keeps it. (One
    /// that opened the file and is still waiting for that lock writes,
    /// after it, into the removed file: two commands creating the same
    /// database at the same moment are told apart no further.)
    pub(crate) async fn remove_if_empty(self, d: &Deployment) {
        let Some(e) = d.embedded() else { return };
        let db = self.db.clone();
        if let Err(err) = e.remove_if_empty(move || self.remove()).await {
            eprintln!(
                "warning: {} stays: this command created it, but cannot tell whether it is empty: {err}",
                db.display()
            );
        }
    }

    /// Removes whatever of the database's files and directories exists.
    fn remove(self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = self.db.clone().into_os_string();
            name.push(suffix);
            let path = PathBuf::from(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!(
                    "warning: cannot remove {}, which this command created and left empty: {e}",
                    path.display()
                ),
            }
        }
        self.remove_dirs();
    }

    /// Removes the directories made for the database, innermost first and
    /// only while empty, so that anything another process put there stays:
    /// for an open that failed, which may have failed on a file another
    /// process created there meanwhile, and then that file stays too.
    pub(crate) fn remove_dirs(&self) {
        for dir in &self.dirs {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_only_what_is_missing_and_removes_only_that() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("a/b/x.db");
        let fresh = Fresh::before(&db).expect("nothing there yet");
        assert_eq!(fresh.dirs, [tmp.path().join("a/b"), tmp.path().join("a")]);
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(&db, b"").unwrap();
        std::fs::write(tmp.path().join("a/b/x.db-wal"), b"").unwrap();
        assert!(Fresh::before(&db).is_none(), "a file there is not fresh");
        fresh.remove();
        assert!(!tmp.path().join("a").exists());
        assert!(tmp.path().exists());
    }

    #[test]
    fn a_directory_with_other_files_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("a/x.db");
        let fresh = Fresh::before(&db).unwrap();
        std::fs::create_dir_all(tmp.path().join("a")).unwrap();
        std::fs::write(&db, b"").unwrap();
        std::fs::write(tmp.path().join("a/other"), b"keep").unwrap();
        fresh.remove();
        assert!(!db.exists());
        assert!(tmp.path().join("a/other").exists());
    }
}
