//! Files re-read while the service runs (rule files, the token file): whether they changed,
//! by their modification times, looked at every [`EVERY`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How often watched files are looked at.
pub(crate) const EVERY: Duration = Duration::from_secs(2);

/// A set of files and the modification times last seen (none for a file that is missing).
#[derive(Debug)]
pub(crate) struct Watched {
    files: Vec<PathBuf>,
    seen: Vec<Option<SystemTime>>,
}

impl Watched {
    pub(crate) fn new(files: Vec<PathBuf>) -> Watched {
        let seen = stamps(&files);
        Watched { files, seen }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether any file was written, created or removed since the last look.
    pub(crate) fn changed(&mut self) -> bool {
        let now = stamps(&self.files);
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_a_removal_and_a_creation_are_changes() {
        let dir = std::env::temp_dir().join(format!("toolsight-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut w = Watched::new(vec![file.clone()]);
        assert!(!w.changed());
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(w.changed());
        assert!(!w.changed(), "seen once");
        std::fs::remove_file(&file).unwrap();
        assert!(w.changed());
        std::fs::write(&file, "b").unwrap();
        assert!(w.changed());
    }
}
