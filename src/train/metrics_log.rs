//! The `metrics.jsonl` log of a training run: one JSON object per line, each with the `step` it describes,
//! appended as the run goes.

use std::fs::File;
use std::path::Path;

/// Opens the log at `path` for appending. A run resuming from its checkpoint at step `resumed_at` first drops the
/// lines of later steps: a run stopped between checkpoints (`kill -9`, a crash) had logged steps that the resumed
/// run takes again, and each step should appear once. A last line cut short by the crash (no newline, not JSON)
/// goes too, so the next line is not glued to it. The file is rewritten atomically, and only when that changes it.
pub fn open(path: &Path, resumed_at: Option<usize>) -> std::io::Result<File> {
    if let (Some(at), true) = (resumed_at, path.exists()) {
        let text = std::fs::read_to_string(path)?;
        let torn_tail = !text.is_empty() && !text.ends_with('\n');
        let json = |line: &str| serde_json::from_str::<serde_json::Value>(line).ok();
        let mut lines: Vec<&str> = text.lines().collect();
        let total = lines.len();
        if torn_tail && lines.last().is_some_and(|line| json(line).is_none()) {
            lines.pop();
        }
        let later = |line: &&str| {
            json(line)
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|step| step > at as u64)
        };
        lines.retain(|line| !later(line));
        if lines.len() < total || torn_tail {
            let text: String = lines.iter().flat_map(|line| [*line, "\n"]).collect();
            crate::io::write_atomic(path, text.as_bytes())?;
        }
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    fn log_after_resume(text: &str, resumed_at: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, text).unwrap();
        let mut file = super::open(&path, Some(resumed_at)).unwrap();
        writeln!(file, "{{\"step\":{}}}", resumed_at + 1).unwrap();
        drop(file);
        std::fs::read_to_string(&path).unwrap()
    }

    #[test]
    fn a_resumed_log_keeps_each_step_once() {
        let text = "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n";
        assert_eq!(log_after_resume(text, 2), "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
        assert_eq!(log_after_resume(text, 3), "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4}\n");
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped_not_glued_to() {
        let text = "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"lo";
        assert_eq!(log_after_resume(text, 2), "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
        // A complete line that is not JSON (written by hand) stays.
        assert_eq!(log_after_resume("# note\n{\"step\":1}\n", 1), "# note\n{\"step\":1}\n{\"step\":2}\n");
    }
}
