//! Helpers shared by the benchmark binaries: sizes from the environment, and the CPU time a
//! process used (servers and brokers share the cores, so CPU time is the fair figure).

/// The number in environment variable `name`, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) the process `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = |what: &str| std::io::Error::other(format!("/proc/{pid}/stat: {what}"));
    // NOTE: fields after the parenthesised command name; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 per second on Linux).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| bad("no command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> std::io::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("no utime or stime"))
    };
    Ok((field(11)? + field(12)?) / 100.0)
}
