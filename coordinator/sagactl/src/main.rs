//! `sagactl` binary: the command line is [`sagactl::main`] (shared with the
//! multi-call `saga` binary).

fn main() -> std::process::ExitCode {
    sagactl::main(std::env::args_os())
}
