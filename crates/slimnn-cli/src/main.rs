//! `slimnn`: inspect, run, convert and embed with compressed neural networks.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use slimnn_cli::bench::{self, BenchConfig};
use slimnn_cli::model::{self, safe_file_name};
use slimnn_cli::tasks::SentenceEmbedder;
use slimnn_formats::{npy, onnx};
use slimnn_runtime::{Runnable, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// Activations start on cache lines (see `slimnn_runtime::alloc`).
#[global_allocator]
static ALLOC: slimnn_runtime::alloc::CacheLineAligned = slimnn_runtime::alloc::CacheLineAligned;

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
        /// Also show what the runtime does with it: canonicalisation, fusions, kernels.
        #[arg(long)]
        optimized: bool,
        /// Bind a symbolic dim for --optimized, as NAME=VALUE (default batch=1, others 128).
        #[arg(long = "dim", value_name = "NAME=VALUE")]
        dims: Vec<String>,
        /// The arithmetic --optimized plans for (bf16 shows `gemm_bf16` steps where the CPU
        /// has AVX-512 BF16).
        #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
        precision: PrecisionArg,
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
        /// Run on the reference evaluator instead of the optimised runtime.
        #[arg(long)]
        reference: bool,
        /// Worker threads for the optimised runtime (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Arithmetic of the linear layers: bf16 products (f32 accumulation) where the CPU has
        /// AVX-512 BF16, else f32.
        #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
        precision: PrecisionArg,
    },
    /// Convert an .onnx file or a Hugging Face checkpoint folder to ONNX.
    Convert {
        src: PathBuf,
        #[arg(short, long, value_name = "DST.onnx")]
        output: PathBuf,
    },
    /// Time the optimised runtime on real inputs (optionally side by side with ONNX Runtime).
    Bench {
        model: PathBuf,
        /// Batch sizes to time, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Sequence length for text models.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Thread counts to time, comma-separated (default: physical cores).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Also time ONNX Runtime (from SLIMNN_VENV or ./.venv) on the same ONNX file and inputs.
        #[arg(long)]
        vs_onnxruntime: bool,
        /// With ONNX Runtime, time this ONNX file instead of MODEL on the same inputs (e.g.
        /// ONNX Runtime's own quantized version of the model).
        #[arg(long, value_name = "FILE")]
        ort_model: Option<PathBuf>,
        /// tokenizer.json for text models (default: next to the model).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Arithmetic of the linear layers: bf16 products (f32 accumulation) where the CPU has
        /// AVX-512 BF16, else f32.
        #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
        precision: PrecisionArg,
        /// Attention's two products in int8 where AMX tiles are granted (else as --precision).
        #[arg(long)]
        int8_attention: bool,
        /// Write one JSON record per configuration here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Generate text with a GGUF language model, streamed to stdout.
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample among the K most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample among the most likely tokens up to this total probability.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (ChatML) as one user message.
        #[arg(long)]
        chat: bool,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Perplexity of a GGUF language model on a text (sliding window).
    Perplexity {
        model: PathBuf,
        /// Plain text, or a Moby-Dick chapter .json.
        #[arg(long)]
        text: PathBuf,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        context: usize,
        /// Tokens between window starts (default: the context, no overlap).
        #[arg(long)]
        stride: Option<usize>,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Train a model by a recipe (TOML): Fashion-MNIST LeNets from scratch, a MiniLM classifier
    /// fine-tuned on SpamAssassin, quantization-aware training; writes the model, log, loss curve
    /// and checkpoints into the output folder.
    Train {
        recipe: PathBuf,
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        /// Continue from DIR/checkpoint.safetensors.
        #[arg(long)]
        resume: bool,
        /// Stop after this many updates, writing a checkpoint (as a killed run would).
        #[arg(long)]
        stop_after: Option<u64>,
        /// Override the recipe's seed.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        threads: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Distill a teacher into a smaller student (logits with temperature, hard labels, and
    /// optionally hidden-state and attention-map matching), by a recipe.
    Distill {
        /// The trained teacher (.onnx with a `logits` output).
        #[arg(long)]
        teacher: PathBuf,
        /// The student's Hugging Face folder (architecture and vocabulary); the recipe's task
        /// picks its layers and initial weights.
        #[arg(long)]
        student: PathBuf,
        #[arg(long)]
        recipe: PathBuf,
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        #[arg(long)]
        resume: bool,
        /// Override the recipe's seed.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        quiet: bool,
    },
    /// Quantize a model (int8 dynamic / static QDQ, weight-only int8 / int4, bf16 / fp16) and
    /// print a per-layer table.
    Quantize {
        /// An .onnx file or a Hugging Face checkpoint folder.
        model: PathBuf,
        #[arg(short, long, value_name = "OUT.onnx")]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "dynamic")]
        mode: QuantMode,
        /// Weight bits: 8, or 4 (weight-only, group-wise).
        #[arg(long, default_value_t = 8)]
        bits: u8,
        /// Values per scale along the input channels for 4-bit weights (32, 64, 128).
        #[arg(long, default_value_t = 32)]
        group_size: usize,
        #[arg(long, value_enum, default_value = "per-channel")]
        granularity: QuantGranularity,
        /// Run-time activation scales of --mode dynamic: per token (default; a slimnn op that
        /// ONNX Runtime runs through its function body) or per tensor (ONNX Runtime's pattern).
        #[arg(long, value_enum)]
        activation_granularity: Option<ActGranularity>,
        /// Calibration data: a text file of sentences (BERT-family models), a .npy file
        /// (one-input models) or a folder of <input>.npy files; samples along the first axis.
        #[arg(long, value_name = "FILE")]
        calibration: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "minmax")]
        calibration_method: CalibMethod,
        /// Percentile kept on each side by --calibration-method percentile.
        #[arg(long, default_value_t = 99.99)]
        percentile: f64,
        /// Static activation type: u8 asymmetric or i8 symmetric.
        #[arg(long, value_enum, default_value = "u8")]
        activation_type: ActType,
        /// SmoothQuant with this migration strength alpha (0..1), before dynamic/static quantization.
        #[arg(long, value_name = "ALPHA")]
        smoothquant: Option<f32>,
        /// GPTQ instead of round-to-nearest (weight-only).
        #[arg(long)]
        gptq: bool,
        /// Correct each layer's bias for the mean output shift its quantized weight causes.
        #[arg(long)]
        bias_correction: bool,
        /// Keep layers whose node name matches in float (`*` wildcards; else a substring). Repeatable.
        #[arg(long, value_name = "PATTERN")]
        exclude: Vec<String>,
        /// Keep the most sensitive layers in higher precision until the mean relative output
        /// error on the calibration data is at most this.
        #[arg(long)]
        error_budget: Option<f64>,
        /// What the layers --error-budget keeps become: float, or (--mode static) int8 with
        /// per-token activation scales taken at run time, so every matmul stays on int8 kernels.
        #[arg(long, value_enum, default_value_t = KeepAs::Float)]
        fallback: KeepAs,
        /// Also quantize activation-by-activation matmuls (attention), static mode.
        #[arg(long)]
        quantize_attention: bool,
        /// Static mode: keep this many channels of each matmul activation in float (those of
        /// largest calibrated magnitude, LLM.int8()-style); the rest get a finer static scale.
        #[arg(long, value_name = "K", default_value_t = 0)]
        outlier_channels: usize,
        /// Also store embedding tables (Gather of a constant table) block-quantized: 8-bit in
        /// blocks of 128, or 4-bit in --group-size blocks with --bits 4 (GatherBlockQuantized).
        #[arg(long)]
        quantize_embeddings: bool,
        /// Samples of the calibration data used.
        #[arg(long, default_value_t = 128)]
        samples: usize,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Token limit per sentence for text data.
        #[arg(long, default_value_t = 128)]
        max_length: usize,
        /// tokenizer.json for text data (default: next to the model).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Also write the per-layer report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Compare two models' outputs on the same data: cosine, max abs, relative error, top-1.
    Compare {
        reference: PathBuf,
        candidate: PathBuf,
        /// Text file of sentences, .npy file or folder of <input>.npy (default: synthetic
        /// inputs for float-input models).
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        samples: usize,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        max_length: usize,
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long)]
        threads: Option<usize>,
        /// Arithmetic of the candidate's linear layers (the reference runs in f32).
        #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
        precision: PrecisionArg,
        /// The candidate's attention products in int8 where AMX tiles are granted.
        #[arg(long)]
        int8_attention: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// Serve models over the KServe v2 / Open Inference Protocol (REST and gRPC), with dynamic batching.
    Serve(slimnn_serve::ServeArgs),
    /// Classify JPEG / PNG images with an ImageNet model (EfficientNet-Lite0 .pth or .onnx).
    Classify {
        model: PathBuf,
        /// Image files (JPEG or PNG).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// How many classes to show per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Worker threads (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for slimnn_runtime::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => slimnn_runtime::Precision::F32,
            PrecisionArg::Bf16 => slimnn_runtime::Precision::Bf16,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QuantMode {
    Dynamic,
    Static,
    WeightOnly,
    Bf16,
    Fp16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QuantGranularity {
    PerChannel,
    PerTensor,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ActGranularity {
    PerToken,
    PerTensor,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CalibMethod {
    Minmax,
    Percentile,
    Entropy,
    Mse,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ActType {
    U8,
    I8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeepAs {
    Float,
    Dynamic,
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`slimnn inspect ... | head`) instead of panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
        Command::Serve(args) => slimnn_serve::serve(&args),
        Command::Inspect { model: path, json, optimized, dims, precision } => {
            inspect(&path, json, optimized, &dims, precision.into())
        }
        Command::Bench {
            model,
            batch,
            seq,
            threads,
            warmup,
            iterations,
            vs_onnxruntime,
            ort_model,
            tokenizer,
            precision,
            int8_attention,
            json,
        } => {
            let threads = if threads.is_empty() { vec![slimnn_runtime::physical_cores()] } else { threads };
            if model.extension().is_some_and(|e| e == "gguf") {
                return slimnn_cli::llm::bench_llm(&model, seq, 64, &threads, iterations.min(3), json.as_deref())
                    .map(drop);
            }
            let cfg = BenchConfig {
                batches: batch,
                seq,
                threads,
                warmup,
                iterations,
                vs_onnxruntime,
                ort_model,
                tokenizer,
                precision: precision.into(),
                int8_attention,
            };
            println!("slimnn bench {} (kernels: {})", model.display(), slimnn_kernels::cpu::describe());
            println!(
                "{:>5} {:>5} {:>7} {:>10} {:>9} {:>9} {:>10} {:>8} {:>10} {:>10} {:>8}",
                "batch",
                "seq",
                "threads",
                "median ms",
                "min ms",
                "max ms",
                "items/s",
                "GFLOP/s",
                "peak act",
                "ORT ms",
                "speedup"
            );
            let records = bench::bench(&model, &cfg, |r| {
                println!(
                    "{:>5} {:>5} {:>7} {:>10.3} {:>9.3} {:>9.3} {:>10.1} {:>8.1} {:>8.1}MB {:>10} {:>8}",
                    r.batch,
                    r.seq.map_or("-".into(), |s| s.to_string()),
                    r.threads,
                    r.median_ms,
                    r.min_ms,
                    r.max_ms,
                    r.throughput,
                    r.gflops,
                    r.peak_memory_bytes as f64 / 1e6,
                    r.ort_median_ms.map_or("-".into(), |v| format!("{v:.3}")),
                    r.speedup.map_or("-".into(), |v| format!("{v:.2}x")),
                )
            })?;
            if let Some(path) = json {
                slimnn_formats::write_atomic(&path, serde_json::to_string_pretty(&records)?.as_bytes())?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Generate { model, prompt, max_tokens, temperature, top_k, top_p, seed, chat, threads } => {
            let opts = slimnn_cli::llm::SampleOptions { temperature, top_k, top_p, seed };
            let threads = threads.unwrap_or_else(slimnn_runtime::physical_cores);
            slimnn_cli::llm::generate_cli(&model, &prompt, chat, max_tokens, &opts, threads)
        }
        Command::Perplexity { model, text, context, stride, threads } => {
            let threads = threads.unwrap_or_else(slimnn_runtime::physical_cores);
            slimnn_cli::llm::perplexity_cli(&model, &text, context, stride, threads).map(drop)
        }
        Command::Train { recipe, output, resume, stop_after, seed, threads, quiet } => {
            let opts = slimnn_cli::train::RunOptions { output, resume, threads, progress: !quiet, stop_after, seed };
            slimnn_cli::train::train(&recipe, &opts).map(drop)
        }
        Command::Distill { teacher, student, recipe, output, resume, seed, threads, quiet } => {
            let opts =
                slimnn_cli::train::RunOptions { output, resume, threads, progress: !quiet, stop_after: None, seed };
            slimnn_cli::train::distill(&teacher, &student, &recipe, &opts).map(drop)
        }
        Command::Run { model, inputs, output_dir, reference, threads, precision } => {
            run_model(&model, &inputs, &output_dir, reference, threads, precision.into())
        }
        Command::Convert { src, output } => {
            let g = model::load(&src)?;
            onnx::save(&g, &output).with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({} nodes, {} parameters)", output.display(), g.nodes().len(), g.parameter_count());
            Ok(())
        }
        Command::Quantize {
            model,
            output,
            mode,
            bits,
            group_size,
            granularity,
            activation_granularity,
            calibration,
            calibration_method,
            percentile,
            activation_type,
            smoothquant,
            gptq,
            bias_correction,
            exclude,
            error_budget,
            fallback,
            quantize_attention,
            outlier_channels,
            quantize_embeddings,
            samples,
            batch_size,
            max_length,
            tokenizer,
            report,
        } => {
            use slimnn_compress::{
                ActivationGranularity, ActivationType, CalibrationMethod, Fallback, Granularity, Mode, QuantRecipe,
            };
            let recipe = QuantRecipe {
                mode: match mode {
                    QuantMode::Dynamic => Mode::Dynamic,
                    QuantMode::Static => Mode::Static,
                    QuantMode::WeightOnly => Mode::WeightOnly,
                    QuantMode::Bf16 => Mode::Bf16,
                    QuantMode::Fp16 => Mode::Fp16,
                },
                bits,
                group_size,
                granularity: match granularity {
                    QuantGranularity::PerChannel => Granularity::PerChannel,
                    QuantGranularity::PerTensor => Granularity::PerTensor,
                },
                activation_granularity: activation_granularity.map(|a| match a {
                    ActGranularity::PerToken => ActivationGranularity::PerToken,
                    ActGranularity::PerTensor => ActivationGranularity::PerTensor,
                }),
                activation_type: match activation_type {
                    ActType::U8 => ActivationType::U8,
                    ActType::I8 => ActivationType::I8,
                },
                calibration_method: match calibration_method {
                    CalibMethod::Minmax => CalibrationMethod::Minmax,
                    CalibMethod::Percentile => CalibrationMethod::Percentile,
                    CalibMethod::Entropy => CalibrationMethod::Entropy,
                    CalibMethod::Mse => CalibrationMethod::Mse,
                },
                percentile,
                smoothquant_alpha: smoothquant,
                gptq,
                bias_correction,
                exclude,
                error_budget,
                fallback: match fallback {
                    KeepAs::Float => Fallback::Float,
                    KeepAs::Dynamic => Fallback::Dynamic,
                },
                quantize_activation_matmuls: quantize_attention,
                outlier_channels,
                quantize_embeddings,
                ..QuantRecipe::default()
            };
            let opts = slimnn_cli::quantize::DataOptions { batch_size, samples, max_length, tokenizer };
            let r = slimnn_cli::quantize::run_quantize(&model, &output, &recipe, calibration.as_deref(), &opts)?;
            if let Some(path) = report {
                slimnn_formats::write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes())?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Compare {
            reference,
            candidate,
            data,
            samples,
            batch_size,
            max_length,
            tokenizer,
            threads,
            precision,
            int8_attention,
            json,
        } => {
            let opts = slimnn_cli::quantize::DataOptions { batch_size, samples, max_length, tokenizer };
            let threads = threads.unwrap_or_else(slimnn_runtime::physical_cores);
            let a = slimnn_cli::quantize::run_compare(
                &reference,
                &candidate,
                data.as_deref(),
                &opts,
                RuntimeConfig { precision: precision.into(), int8_attention, ..RuntimeConfig::with_threads(threads) },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                println!("{} vs {} ({} batches)", candidate.display(), reference.display(), a.batches);
                print!("{}", slimnn_cli::quantize::agreement_table(&a));
            }
            Ok(())
        }
        Command::Classify { model, images, top, threads, json } => {
            let threads = threads.unwrap_or_else(slimnn_runtime::physical_cores);
            slimnn_cli::classify::classify_cli(&model, &images, top, threads, json)
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
                    let rows: Vec<&[f32]> = v.chunks(dim).collect();
                    for i in 0..rows.len().min(8) {
                        for j in i + 1..rows.len().min(8) {
                            println!(
                                "cosine({}, {}) = {:.4}",
                                i + 1,
                                j + 1,
                                slimnn_cli::tasks::cosine(rows[i], rows[j])
                            );
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

fn inspect(
    path: &Path,
    json: bool,
    optimized: bool,
    dims: &[String],
    precision: slimnn_runtime::Precision,
) -> Result<()> {
    let g = model::load(path)?;
    let s = model::summarize(&g, path);
    let opt = if optimized { Some(model::optimized_summary(&g, dims, precision)?) } else { None };
    if json {
        let mut v = serde_json::to_value(&s)?;
        if let Some(o) = &opt {
            v["optimized"] = serde_json::to_value(o)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
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
    if let Some(o) = opt {
        println!("optimized for shapes {:?}:", o.shapes);
        println!("  canonicalisation: {} -> {} nodes", o.report.nodes_before, o.report.nodes_after);
        for (pass, n) in &o.report.passes {
            println!("    {pass:<24} {n} rewrite(s)");
        }
        println!("  for these shapes:");
        for (pass, n) in &o.plan.rewrites {
            println!("    {pass:<24} {n} rewrite(s)");
        }
        println!("  plan: {} steps", o.plan.steps);
        for (k, n) in &o.plan.kernels {
            println!("    {k:<32} {n}");
        }
        println!("  fusions:");
        for f in &o.plan.fusions {
            let note = if f.note.is_empty() { String::new() } else { format!(" ({})", f.note) };
            println!(
                "    {:<28} {} nodes ending at {}{note}",
                f.kind,
                f.nodes.len(),
                f.nodes.last().map_or("", |s| s.as_str())
            );
        }
        println!("  not fused (run on the reference evaluator):");
        for (k, n) in o.plan.kernels.iter().filter(|(k, _)| k.starts_with("ref:")) {
            println!("    {:<28} {n}", &k[4..]);
        }
    }
    Ok(())
}

fn run_model(
    path: &Path,
    inputs: &[String],
    out_dir: &Path,
    reference: bool,
    threads: Option<usize>,
    precision: slimnn_runtime::Precision,
) -> Result<()> {
    let g = model::load(path)?;
    let mut named = Vec::new();
    for spec in inputs {
        let (name, file) = spec.split_once('=').with_context(|| format!("--input '{spec}' must be NAME=FILE.npy"))?;
        let t = npy::read(Path::new(file)).with_context(|| format!("input '{name}'"))?;
        named.push((name.to_string(), t));
    }
    let outputs = if reference {
        g.eval(named)?
    } else {
        let config = RuntimeConfig {
            precision,
            ..RuntimeConfig::with_threads(threads.unwrap_or_else(slimnn_runtime::physical_cores))
        };
        let rt = Runnable::new(g.clone(), config)?;
        rt.run(&mut rt.new_state(), named)?
    };
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
