//! The fetch process of a Kafka reader: librdkafka polls a reader's partitions in a child
//! process (`millrace kafka-fetch`), which streams the messages back over a pipe.
//!
//! Flow: broker -> fetch process (librdkafka consumer) -> pipe -> [`super::reader`]
//! (decode, in the server) -> the source's session (commit). A crash inside the C library
//! (librdkafka 2.12 dereferences a null topic name when a topic it fetches is deleted under
//! it) ends the fetch process, not the server: the reader sees the pipe close, the source
//! turns unhealthy with the cause and starts a new process at its committed offsets.
//!
//! The pipe carries frames, little-endian:
//! - `M` partition i32, offset i64, timestamp i64 (`i64::MIN`: none), key length i32 (-1:
//!   none), payload length u32, then the key and payload bytes: one message;
//! - `I`: nothing was waiting in the consumer (the reader may close its batch);
//! - `E` length u32, then UTF-8 text: the consumer failed; the process ends after it.
//!
//! A full pipe blocks the fetch process, so back-pressure reaches librdkafka's queue
//! (`queued.max.messages.kbytes`) instead of growing memory. The process ends when its
//! standard input closes, that is when the server drops it or dies.

use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ServerError};
use crate::memory::resident::Helper;

/// The hidden subcommand of the `millrace` binary that runs a fetch process.
pub const SUBCOMMAND: &str = "kafka-fetch";

/// Largest key or payload a frame may announce; anything larger is a broken pipe.
const MAX_FRAME_BYTES: usize = 1 << 30;

/// How long the fetch process waits in one poll when nothing is queued.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What a fetch process reads: sent as one JSON line on its standard input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FetchSpec {
    /// librdkafka settings (`bootstrap.servers`, `group.id`, the user's `properties.*`).
    pub config: Vec<(String, String)>,
    /// The topic.
    pub topic: String,
    /// Each partition read and the offset to start at.
    pub assignment: Vec<(i32, i64)>,
}

/// One frame from the fetch process; key and payload borrow the reader's buffer.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame<'a> {
    /// A message.
    Message {
        partition: i32,
        offset: i64,
        /// Milliseconds since the epoch, if the message has a timestamp.
        timestamp: Option<i64>,
        key: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    /// The consumer had nothing queued.
    Idle,
}

/// The server's end of a running fetch process.
pub(crate) struct FetchProcess {
    /// The process; killed and reaped on drop.
    child: Child,
    /// Its standard output, the frames.
    frames: BufReader<ChildStdout>,
    /// Its standard input: held open for the process's life (closing it ends the process).
    _stdin: ChildStdin,
    /// The key and payload of the last message frame.
    buffer: Vec<u8>,
    /// Counts the process's memory against the limit while it runs.
    _resident: Helper,
}

impl FetchProcess {
    /// Starts a fetch process (this same executable) reading `spec`.
    pub fn start(spec: &FetchSpec) -> Result<Self> {
        let spawn_failed =
            |e: std::io::Error| ServerError::Connector(format!("kafka fetch process: {e}"));
        let mut child = Command::new(own_executable())
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_failed)?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ServerError::Internal(
                "kafka fetch process started without pipes".into(),
            ));
        };
        let mut line = serde_json::to_vec(spec)
            .map_err(|e| ServerError::Internal(format!("kafka fetch spec: {e}")))?;
        line.push(b'\n');
        if let Err(e) = stdin.write_all(&line).and_then(|()| stdin.flush()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_failed(e));
        }
        Ok(Self {
            _resident: Helper::register(child.id()),
            child,
            frames: BufReader::with_capacity(256 << 10, stdout),
            _stdin: stdin,
            buffer: Vec::new(),
        })
    }

    /// The next frame: a message or `Idle` (at least one every ~50 ms while the process
    /// runs), or the error the consumer failed with, or how the process ended.
    pub fn next(&mut self) -> Result<Frame<'_>> {
        let Self {
            child,
            frames,
            buffer,
            ..
        } = self;
        match read_frame(frames, buffer) {
            Ok(frame) => frame.map_err(|reason| ServerError::Connector(format!("kafka: {reason}"))),
            Err(e) => Err(ended(child, e)),
        }
    }
}

impl Drop for FetchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a fetch process: reads its spec from standard input, then writes frames to
/// standard output until the server closes standard input or the consumer fails.
pub fn serve() -> ExitCode {
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    if let Err(e) = std::io::BufRead::read_line(&mut stdin, &mut line) {
        tracing::error!(error = %e, "kafka fetch process: no spec on standard input");
        return ExitCode::FAILURE;
    }
    let spec: FetchSpec = match serde_json::from_str(&line) {
        Ok(spec) => spec,
        Err(e) => {
            tracing::error!(error = %e, "kafka fetch process: unreadable spec");
            return ExitCode::FAILURE;
        }
    };
    drop(stdin);
    // NOTE: the server never writes again; end of input means it dropped this process or
    // died (even by SIGKILL, which no signal handler would see).
    let watcher = std::thread::Builder::new()
        .name("kafka-fetch-parent".into())
        .spawn(|| {
            let mut rest = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut rest);
            std::process::exit(0);
        });
    if watcher.is_err() {
        return ExitCode::FAILURE;
    }
    let mut out = BufWriter::with_capacity(256 << 10, std::io::stdout().lock());
    match fetch(&spec, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            // NOTE: the server may be gone already; a failed error frame changes nothing.
            let _ = write_error(&mut out, &reason).and_then(|()| out.flush());
            ExitCode::FAILURE
        }
    }
}

/// Assigns the partitions and streams their messages until writing fails.
fn fetch(spec: &FetchSpec, out: &mut impl Write) -> std::result::Result<(), String> {
    let mut config = ClientConfig::new();
    for (k, v) in &spec.config {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    for (p, next) in &spec.assignment {
        assignment
            .add_partition_offset(&spec.topic, *p, Offset::Offset(*next))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let gone = |e: std::io::Error| format!("writing to the server: {e}");
    loop {
        let polled = match consumer.poll(Duration::ZERO) {
            Some(polled) => polled,
            None => {
                out.write_all(b"I").map_err(gone)?;
                out.flush().map_err(gone)?;
                match consumer.poll(IDLE_POLL) {
                    Some(polled) => polled,
                    None => continue,
                }
            }
        };
        let message = match polled {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(_)) => continue,
            Err(e) => return Err(e.to_string()),
        };
        write_message(
            out,
            message.partition(),
            message.offset(),
            message.timestamp().to_millis(),
            message.key(),
            message.payload().unwrap_or_default(),
        )
        .map_err(gone)?;
    }
}

/// Writes one `M` frame.
fn write_message(
    out: &mut impl Write,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<&[u8]>,
    payload: &[u8],
) -> std::io::Result<()> {
    let key_len = key.map_or(-1, |k| k.len() as i32);
    out.write_all(b"M")?;
    out.write_all(&partition.to_le_bytes())?;
    out.write_all(&offset.to_le_bytes())?;
    out.write_all(&timestamp.unwrap_or(i64::MIN).to_le_bytes())?;
    out.write_all(&key_len.to_le_bytes())?;
    out.write_all(&(payload.len() as u32).to_le_bytes())?;
    if let Some(key) = key {
        out.write_all(key)?;
    }
    out.write_all(payload)
}

/// Writes one `E` frame.
fn write_error(out: &mut impl Write, reason: &str) -> std::io::Result<()> {
    out.write_all(b"E")?;
    out.write_all(&(reason.len() as u32).to_le_bytes())?;
    out.write_all(reason.as_bytes())
}

/// Reads one frame: `Ok(Ok(frame))`, `Ok(Err(reason))` for an `E` frame, or the I/O error
/// (end of file when the process ended).
fn read_frame<'a>(
    input: &mut impl Read,
    buffer: &'a mut Vec<u8>,
) -> std::io::Result<std::result::Result<Frame<'a>, String>> {
    let mut tag = [0u8; 1];
    input.read_exact(&mut tag)?;
    match tag[0] {
        b'I' => Ok(Ok(Frame::Idle)),
        b'E' => {
            let len = read_len(input)?;
            buffer.resize(len, 0);
            input.read_exact(buffer)?;
            Ok(Err(String::from_utf8_lossy(buffer).into_owned()))
        }
        b'M' => {
            let mut head = [0u8; 28];
            input.read_exact(&mut head)?;
            let i32_at =
                |i: usize| i32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            let i64_at = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[i..i + 8]);
                i64::from_le_bytes(b)
            };
            let (partition, offset, timestamp) = (i32_at(0), i64_at(4), i64_at(12));
            let key_len = i32_at(20);
            let payload_len = u32::from_le_bytes([head[24], head[25], head[26], head[27]]) as usize;
            let key_bytes = usize::try_from(key_len).unwrap_or(0);
            if key_bytes > MAX_FRAME_BYTES || payload_len > MAX_FRAME_BYTES {
                return Err(std::io::Error::other("oversized frame"));
            }
            buffer.resize(key_bytes + payload_len, 0);
            input.read_exact(buffer)?;
            let (key, payload) = buffer.split_at(key_bytes);
            Ok(Ok(Frame::Message {
                partition,
                offset,
                timestamp: (timestamp != i64::MIN).then_some(timestamp),
                key: (key_len >= 0).then_some(key),
                payload,
            }))
        }
        other => Err(std::io::Error::other(format!("unknown frame tag {other}"))),
    }
}

/// Reads an `E` frame's length.
fn read_len(input: &mut impl Read) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::other("oversized frame"));
    }
    Ok(len)
}

/// Why the frames stopped: the process's exit status, or the read error.
fn ended(child: &mut Child, read: std::io::Error) -> ServerError {
    let _ = child.kill();
    let reason = match child.wait() {
        Ok(status) => describe_exit(status),
        Err(_) => format!("unreadable ({read})"),
    };
    ServerError::Connector(format!("kafka fetch process ended: {reason}"))
}

/// This executable: `/proc/self/exe` on Linux, so an upgraded binary on disk does not
/// change what a running server starts.
fn own_executable() -> std::path::PathBuf {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return proc_exe.to_path_buf();
    }
    std::env::current_exe().unwrap_or_else(|_| "millrace".into())
}

/// An exit status in words: the code, or the signal (a crash in librdkafka is SIGSEGV).
fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                libc::SIGSEGV => " (SIGSEGV, a crash in librdkafka)",
                libc::SIGABRT => " (SIGABRT, librdkafka aborted)",
                libc::SIGKILL => " (SIGKILL)",
                _ => "",
            };
            return format!("killed by signal {signal}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames written by the fetch process read back the same, in order.
    #[test]
    fn frames_round_trip() {
        let mut pipe = Vec::new();
        write_message(
            &mut pipe,
            1,
            42,
            Some(1_700_000_000_000),
            Some(b"k"),
            b"{\"a\":1}",
        )
        .unwrap();
        pipe.extend_from_slice(b"I");
        write_message(&mut pipe, 0, 7, None, None, b"").unwrap();
        write_error(&mut pipe, "broker gone").unwrap();
        let mut input = &pipe[..];
        let mut buffer = Vec::new();
        assert_eq!(
            read_frame(&mut input, &mut buffer).unwrap(),
            Ok(Frame::Message {
                partition: 1,
                offset: 42,
                timestamp: Some(1_700_000_000_000),
                key: Some(b"k"),
                payload: b"{\"a\":1}",
            })
        );
        assert_eq!(
            read_frame(&mut input, &mut buffer).unwrap(),
            Ok(Frame::Idle)
        );
        assert_eq!(
            read_frame(&mut input, &mut buffer).unwrap(),
            Ok(Frame::Message {
                partition: 0,
                offset: 7,
                timestamp: None,
                key: None,
                payload: b"",
            })
        );
        assert_eq!(
            read_frame(&mut input, &mut buffer).unwrap(),
            Err("broker gone".to_string())
        );
        let end = read_frame(&mut input, &mut buffer).unwrap_err();
        assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// A cut-off or garbled pipe is an error, not a message or an allocation of gigabytes.
    #[test]
    fn broken_frames_are_refused() {
        let mut pipe = Vec::new();
        write_message(&mut pipe, 1, 42, None, None, b"payload").unwrap();
        let mut buffer = Vec::new();
        let mut cut = &pipe[..pipe.len() - 2];
        assert!(read_frame(&mut cut, &mut buffer).is_err());
        let mut huge = pipe.clone();
        huge[25..29].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..], &mut buffer).is_err());
        assert!(read_frame(&mut &b"Z"[..], &mut buffer).is_err());
    }
}
