//! The `millrace` binary: parses the command line and runs the server until shut down.

use clap::{Parser, Subcommand};
use millrace::config::ServeConfig;
use tracing_subscriber::EnvFilter;

/// Millrace: a streaming SQL database that speaks PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "millrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the server.
    Serve(ServeConfig),
    /// Fetch a Kafka source's partitions for a running server (started by the server).
    #[command(name = millrace::connector::kafka::fetch::SUBCOMMAND, hide = true)]
    KafkaFetch,
}

// NOTE: glibc's malloc kept 345 MB of RSS for 96 MB in use after loading 400k rows under a
// 64 MiB limit (fragmented per-thread arenas); jemalloc returns freed pages within a second.
// RocksDB (C++) still allocates through glibc: see `tune_glibc_malloc`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc settings: purge freed pages after a second, on its own background thread.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Makes glibc's malloc, which RocksDB's C++ allocations go through, hand memory back: large
/// blocks (a statement's write batch) are always mapped and unmapped rather than carved from
/// arenas after the dynamic threshold has grown, and two arenas instead of eight per core.
/// Measured: 1M rows loaded under `--memory-limit 128MiB` left 310 MB of anonymous memory with
/// the defaults and 107 MB with these.
fn tune_glibc_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Under a memory limit, freed pages go back to the system at once instead of after a
/// second: at the write rates of a bulk load a second of freed pages is tens of MB (measured:
/// peak RSS of a join loaded under `--memory-limit 64MiB` 368 MB with the one-second decay,
/// 290 MB without; the load took 40% longer in a debug build).
fn purge_freed_pages_at_once() {
    // Arenas created from now on, then each arena already created (`arena.<i>` does not
    // take "all arenas" for this setting; an arena not yet created answers EFAULT).
    let set = |name: &str| -> i32 {
        let Ok(name) = std::ffi::CString::new(name) else {
            return libc::EINVAL;
        };
        let mut value: isize = 0;
        // SAFETY: the setting takes an ssize_t; the pointer and length describe `value`.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&mut value as *mut isize).cast(),
                std::mem::size_of::<isize>(),
            )
        }
    };
    let mut failed = Vec::new();
    let rc = set("arenas.dirty_decay_ms");
    if rc != 0 {
        failed.push(("arenas.dirty_decay_ms".to_string(), rc));
    }
    let mut arenas: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: `arenas.narenas` is an unsigned; the pointer and length describe `arenas`.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arenas.narenas".as_ptr(),
            (&mut arenas as *mut u32).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        failed.push(("arenas.narenas".to_string(), rc));
    }
    for arena in 0..arenas {
        let name = format!("arena.{arena}.dirty_decay_ms");
        match set(&name) {
            0 => {}
            libc::EFAULT if arena > 0 => {}
            rc => failed.push((name, rc)),
        }
    }
    for (name, rc) in failed {
        tracing::warn!(setting = %name, rc, "setting jemalloc's decay failed");
    }
}

fn main() -> std::process::ExitCode {
    tune_glibc_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MILLRACE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::KafkaFetch => millrace::connector::kafka::fetch::serve(),
        Command::Serve(config) => {
            if config.memory_limit.is_some() {
                purge_freed_pages_at_once();
            }
            // NOTE: planning deeply nested SQL recurses; DataFusion grows the stack in its own
            // recursion, but the frames between its checkpoints need headroom beyond tokio's
            // 2 MiB default.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.workers())
                .thread_stack_size(16 << 20)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match runtime.block_on(millrace::server::run(config)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "millrace stopped with an error");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
