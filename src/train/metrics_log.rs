//! The `metrics.jsonl` log of a training run: one JSON object per line, each with the `step` it describes,
//! appended as the run goes.

use std::fs::File;
use std::path::Path;

/// Opens the log at `path` for appending. A run resuming from its checkpoint at step `resumed_at` first drops the
/// lines of later steps: a run stopped between checkpoints (`kill -9`, a crash) had logged steps that the resumed
/// run takes again, and each step should appear once. The file is rewritten atomically, and only when a line goes.
pub fn open(path: &Path, resumed_at: Option<usize>) -> std::io::Result<File> {
    if let (Some(at), true) = (resumed_at, path.exists()) {
        let text = std::fs::read_to_string(path)?;
        let later = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|step| step > at as u64)
        };
        if text.lines().any(later) {
            let kept: String = text.lines().filter(|line| !later(line)).flat_map(|line| [line, "\n"]).collect();
            crate::io::write_atomic(path, kept.as_bytes())?;
        }
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}
