//! Resident memory of the server's process tree, read from `/proc`: what the cache manager
//! measures against `--memory-limit` (see `cache.rs`). The tree is the server and its helper
//! processes, the Kafka fetch processes (`connector/kafka/fetch.rs`), whose librdkafka
//! queues are memory the limit covers too. A helper is counted while its [`Helper`] guard
//! lives.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Bytes of a page in `/proc/<pid>/statm`.
const PAGE_BYTES: u64 = 4096;

/// Process ids of the running helpers.
static HELPERS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// A helper process counted in the server's memory until dropped.
#[derive(Debug)]
pub struct Helper {
    pid: u32,
}

impl Helper {
    /// Counts process `pid` (a child of the server) from now on.
    pub fn register(pid: u32) -> Helper {
        HELPERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid);
        Helper { pid }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        HELPERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

/// Resident memory of a process that is not backed by a file (heap, stacks, anonymous
/// mappings; the binary's pages are not), from `/proc/<process>/statm`; None elsewhere or
/// once the process is gone.
fn anonymous(process: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{process}/statm")).ok()?;
    let mut pages = statm.split_whitespace().skip(1);
    let resident: u64 = pages.next()?.parse().ok()?;
    let shared: u64 = pages.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared) * PAGE_BYTES)
}

/// The running helpers and their anonymous resident memory together.
pub fn helpers() -> (usize, u64) {
    let pids: Vec<u32> = HELPERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    let bytes = pids.iter().filter_map(|p| anonymous(&p.to_string())).sum();
    (pids.len(), bytes)
}

/// Anonymous resident memory of the server and its helpers; None where `/proc` cannot be
/// read.
pub fn anonymous_resident() -> Option<u64> {
    Some(anonymous("self")? + helpers().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_counts_while_registered() {
        let Some(own) = anonymous("self") else {
            return;
        };
        assert!(own > 0);
        let before = helpers().0;
        let pid = std::process::id();
        {
            // This process stands in for a child: its memory is counted twice while it is.
            let _helper = Helper::register(pid);
            let (n, bytes) = helpers();
            assert_eq!(n, before + 1);
            assert!(bytes >= own / 2, "{bytes} bytes counted for {own}");
        }
        assert_eq!(helpers().0, before);
    }
}
