//! `saga`: every binary of the saga engine in one executable, for the
//! container image (deploy/Dockerfile), where one copy of the shared code
//! (tokio, tonic, async-nats, sled …) instead of five keeps the image small.
//!
//! `saga coordinator|inventory|payment|shipping|ctl …` runs that program with
//! the remaining arguments; invoked under one of the old names (a symlink
//! `coordinator`, `inventory`, `payment`, `shipping` or `sagactl` to this
//! file) it runs that program with all of them, so commands written for the
//! separate binaries keep working. `saga probe <url>` is the image's health
//! check: the image has no shell and no curl.
//!
//! This file only dispatches; each program is its crate's entry function.

mod probe;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// mimalloc: the engine allocates and frees many small buffers across threads
/// (JSON, sled nodes, NATS messages); glibc's malloc showed up as ~20% of the
/// coordinator's CPU in profiles. The separate binaries pick it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: saga <program> [arguments]

programs:
  coordinator   the saga coordinator (gRPC API, state machine)
  inventory     the inventory participant
  payment       the payment participant
  shipping      the shipping participant
  ctl           sagactl, the operator's command line (also: sagactl)
  probe <url>   GET an http:// URL; exit 0 on status 200 (health checks)

`saga <program> --help` describes each. Invoked as `coordinator`, `inventory`,
`payment`, `shipping` or `sagactl` (a link to this binary) it runs that program.
";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let invoked = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("saga")
        .to_owned();
    if let Some(code) = run_program(&invoked, args.clone()) {
        return code;
    }
    if args.len() < 2 {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let program = args.remove(1);
    let name = program.to_str().unwrap_or("");
    match name {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        "-V" | "--version" => {
            println!("saga {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "probe" => probe::main(&args[1..]),
        _ => {
            // argv[0] becomes "saga <program>", so that clap's usage lines read as typed.
            let canonical = if name == "ctl" { "sagactl" } else { name };
            args[0] = OsString::from(format!("saga {name}"));
            run_program(canonical, args).unwrap_or_else(|| {
                eprint!("saga: unknown program {program:?}\n\n{USAGE}");
                ExitCode::from(2)
            })
        }
    }
}

/// Runs the program called `name` with `args` (`args[0]` is its name), or
/// `None` when no program has that name.
fn run_program(name: &str, args: Vec<OsString>) -> Option<ExitCode> {
    Some(match name {
        "coordinator" => coordinator::cli::main(args),
        "inventory" => participants::cli::inventory(args),
        "payment" => participants::cli::payment(args),
        "shipping" => participants::cli::shipping(args),
        "sagactl" => sagactl::main(args),
        _ => return None,
    })
}
