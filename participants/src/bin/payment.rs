//! `payment` binary: the process is [`participants::cli::payment`] (shared with the
//! multi-call `saga` binary); this file only picks the allocator.

/// mimalloc: the engine allocates and frees many small buffers across threads
/// (JSON, sled nodes, NATS messages); glibc's malloc showed up as ~20% of the
/// coordinator's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    participants::cli::payment(std::env::args_os())
}
