//! `curve`: the command-line tool of Curve-rs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use nebd_server::control::{ControlClient, ExportSpec, ExportStatus, Frontend, Request};
use nebd_server::daemon::DEFAULT_RUN_DIR;
use nebd_server::exports::error_chain;

/// Curve-rs: a distributed block store with NBD, vhost-user-blk and ublk frontends.
#[derive(Debug, Parser)]
#[command(name = "curve", version)]
struct Cli {
    /// Run directory of the local nebd-server (where its control socket is).
    #[arg(long, global = true, env = "CURVE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exports of the local nebd-server: volumes served to consumers.
    #[command(subcommand)]
    Export(ExportCommand),
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Open a volume and serve it.
    Add {
        /// Volume: mem:SIZE (RAM, e.g. mem:1G) or file:PATH[?direct].
        #[arg(long)]
        volume: String,
        /// Serve over NBD at unix:PATH or tcp:HOST:PORT.
        #[arg(long, required = true)]
        nbd: String,
        /// Export name (the NBD export name).
        #[arg(long)]
        name: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
    },
    /// List exports.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Stop serving an export and close its volume.
    Remove {
        /// Export name.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn call(run_dir: &std::path::Path, req: &Request) -> Result<Vec<ExportStatus>, String> {
    let mut client = ControlClient::connect(run_dir).map_err(|e| error_chain(&e))?;
    let resp = client.call(req).map_err(|e| error_chain(&e))?;
    if resp.ok {
        Ok(resp.exports)
    } else {
        Err(resp.error.unwrap_or_else(|| "request failed".into()))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Export(ExportCommand::Add {
            volume,
            nbd,
            name,
            read_only,
        }) => {
            let req = Request::AddExport(ExportSpec {
                name,
                volume,
                frontend: Frontend::Nbd { address: nbd },
                read_only,
            });
            for e in call(&cli.run_dir, &req)? {
                println!("{}", e.uri);
            }
        }
        Command::Export(ExportCommand::Remove { name }) => {
            call(&cli.run_dir, &Request::RemoveExport { name })?;
        }
        Command::Export(ExportCommand::List { format }) => {
            let exports = call(&cli.run_dir, &Request::ListExports)?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&exports).expect("statuses serialise")
                ),
                Format::Text => print_table(&exports),
            }
        }
    }
    Ok(())
}

fn print_table(exports: &[ExportStatus]) {
    let rows: Vec<[String; 6]> = exports
        .iter()
        .map(|e| {
            [
                e.spec.name.clone(),
                e.spec.volume.clone(),
                human_size(e.size),
                if e.spec.read_only { "ro" } else { "rw" }.into(),
                e.connections.to_string(),
                e.uri.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "VOLUME", "SIZE", "MODE", "CONNS", "URI"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}
