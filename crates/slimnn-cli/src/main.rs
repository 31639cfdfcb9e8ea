//! `slimnn`: inspect, run, convert and embed with compressed neural networks.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use slimnn_cli::model::{self, safe_file_name};
use slimnn_cli::tasks::SentenceEmbedder;
use slimnn_formats::{npy, onnx};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "slimnn", version, about = "Make neural networks smaller and faster, and run them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's inputs, outputs, op histogram, parameter count and size on disk.
    Inspect {
        /// An .onnx file or a Hugging Face checkpoint folder.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a model on .npy inputs and write one .npy per output.
    Run {
        model: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Folder for `<output name>.npy` files (created if missing).
        #[arg(long)]
        output_dir: PathBuf,
    },
    /// Convert an .onnx file or a Hugging Face checkpoint folder to ONNX.
    Convert {
        src: PathBuf,
        #[arg(short, long, value_name = "DST.onnx")]
        output: PathBuf,
    },
    /// Sentence embeddings from a BERT-family checkpoint folder.
    Embed {
        model_dir: PathBuf,
        /// A text to embed (repeatable).
        #[arg(long, required_unless_present = "file")]
        text: Vec<String>,
        /// A file with one text per line.
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
        /// Write the `[texts, dim]` embeddings here instead of printing them.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Texts per batch.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Truncate texts to this many tokens (default: the model's max_seq_length).
        #[arg(long)]
        max_length: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined with ": ".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model: path, json } => inspect(&path, json),
        Command::Run { model, inputs, output_dir } => run_model(&model, &inputs, &output_dir),
        Command::Convert { src, output } => {
            let g = model::load(&src)?;
            onnx::save(&g, &output).with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({} nodes, {} parameters)", output.display(), g.nodes().len(), g.parameter_count());
            Ok(())
        }
        Command::Embed { model_dir, text, file, output, batch_size, max_length } => {
            let texts: Vec<String> = match file {
                Some(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect(),
                None => text,
            };
            if texts.is_empty() {
                bail!("no text to embed");
            }
            let embedder = SentenceEmbedder::load(&model_dir, max_length)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let emb = embedder.embed(&refs, batch_size)?;
            match output {
                Some(path) => {
                    npy::write(&path, &emb)?;
                    println!("wrote {} ({} x {})", path.display(), emb.shape()[0], emb.shape()[1]);
                }
                None => {
                    let v = emb.as_slice::<f32>()?;
                    let dim = emb.shape()[1];
                    for (t, row) in texts.iter().zip(v.chunks(dim)) {
                        let head: Vec<String> = row.iter().take(6).map(|x| format!("{x:+.4}")).collect();
                        println!("{t}\n  [{} ...] ({dim} dims)", head.join(", "));
                    }
                }
            }
            Ok(())
        }
    }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let g = model::load(path)?;
    let s = model::summarize(&g, path);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("model: {}", path.display());
    println!("size on disk: {:.2} MB", s.size_on_disk_bytes as f64 / 1e6);
    println!("parameters: {} ({:.2} M)", s.parameters, s.parameters as f64 / 1e6);
    for (title, vals) in [("inputs", &s.inputs), ("outputs", &s.outputs)] {
        println!("{title}:");
        for v in vals {
            println!("  {:<24} {:<5} [{}]", v.name, v.dtype, v.shape.join(", "));
        }
    }
    println!("ops ({} nodes):", s.nodes);
    let mut ops: Vec<_> = s.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("  {op:<24} {n}");
    }
    Ok(())
}

fn run_model(path: &Path, inputs: &[String], out_dir: &Path) -> Result<()> {
    let g = model::load(path)?;
    let mut named = Vec::new();
    for spec in inputs {
        let (name, file) = spec.split_once('=').with_context(|| format!("--input '{spec}' must be NAME=FILE.npy"))?;
        let t = npy::read(Path::new(file)).with_context(|| format!("input '{name}'"))?;
        named.push((name.to_string(), t));
    }
    let outputs = g.eval(named)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut seen = std::collections::HashSet::new();
    for ((name, _), t) in g.outputs().iter().zip(&outputs) {
        let file = format!("{}.npy", safe_file_name(name));
        if !seen.insert(file.clone()) {
            bail!("outputs map to the same file name {file}");
        }
        let path = out_dir.join(&file);
        npy::write(&path, t).with_context(|| format!("output '{name}'"))?;
        println!("{name}: {} {:?} -> {}", t.dtype(), t.shape(), path.display());
    }
    Ok(())
}
