//! `sbdnet`: train, evaluate and benchmark binarized, sparse and diagonal-sparse networks.
//!
//! Run `sbdnet --help` (or `sbdnet <command> --help`) for usage.

mod bench;
mod bench_linear;
mod cli;
mod export;
mod infer;
mod onnx;
mod plot;
mod train;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix command-line tools, end quietly when the reader of our output goes away
    // (`sbdnet summary | head`) instead of failing on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    if let Err(e) = setup_threads(args.threads()) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match args.command {
        cli::Command::Train(a) => train::train(a),
        cli::Command::Eval(a) => train::eval(a),
        cli::Command::Bench(b) => bench::run(b),
        cli::Command::Data(d) => train::data(d),
        cli::Command::Summary(s) => bench::summary(s),
        cli::Command::Demo(d) => train::demo(d),
        cli::Command::Plot(p) => plot::run(p),
        cli::Command::Export(a) => infer::export(a),
        cli::Command::Infer(a) => infer::infer(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Size rayon's global pool (every kernel's threads) once, before any work.
fn setup_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    Ok(())
}
