//! Language models from GGUF files: loading (weights stay block-quantized), a KV cache,
//! prefill and decode, sampling, streaming generation, sliding-window perplexity and the LLM
//! benchmark. See `doc/llm.md`.

use anyhow::{bail, Context, Result};
use slimnn_data::bpe::{BpeSpec, BpeTokenizer, ChatTemplate, StreamDecoder};
use slimnn_formats::gguf::{GgufFile, GgufValue};
use slimnn_formats::llama::{build_llama, LlamaConfig, LlamaWeights, Logits};
use slimnn_runtime::{Runnable, RuntimeConfig, State};
use slimnn_tensor::Tensor;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// A loaded decoder: tokenizer, config and two runnables over the same weights (logits for
/// every position, or for the last one only).
pub struct Llm {
    pub config: LlamaConfig,
    pub tokenizer: BpeTokenizer,
    /// Tokens that end generation: `tokenizer.ggml.eos_token_id` and `<|endoftext|>`.
    pub stop_ids: Vec<u32>,
    /// Prepended to prompts when `tokenizer.ggml.add_bos_token` is true.
    pub bos: Option<u32>,
    pub chat: Option<ChatTemplate>,
    pub weight_bytes: usize,
    all: Runnable,
    last: Runnable,
}

/// Keys and values of the positions seen so far, one `[1, len, kv_width]` pair per layer.
pub struct KvCache {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub len: usize,
}

fn token_id(g: &GgufFile, key: &str) -> Option<u32> {
    g.get(key).and_then(GgufValue::as_u64).and_then(|v| u32::try_from(v).ok())
}

impl Llm {
    /// Loads a GGUF llama-family model for `threads` worker threads.
    pub fn load(path: &Path, threads: usize) -> Result<Llm> {
        let g = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let weights = LlamaWeights::load(&g, &config)?;
        let tokenizer = load_tokenizer(&g)?;
        if tokenizer.vocab_size() != config.vocab {
            bail!(
                "{}: {} tokens in the vocabulary, {} rows of token_embd",
                path.display(),
                tokenizer.vocab_size(),
                config.vocab
            );
        }
        let mut stop_ids: Vec<u32> = token_id(&g, "tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = tokenizer.encode("<|endoftext|>").ok().filter(|v| v.len() == 1) {
            if !stop_ids.contains(&eot[0]) {
                stop_ids.push(eot[0]);
            }
        }
        let add_bos = matches!(g.get("tokenizer.ggml.add_bos_token"), Some(GgufValue::Bool(true)));
        let bos = if add_bos { token_id(&g, "tokenizer.ggml.bos_token_id") } else { None };
        let chat = g
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(ChatTemplate::from_metadata)
            .transpose()?;
        let rt = RuntimeConfig::with_threads(threads.max(1));
        let all = Runnable::new(build_llama(&config, &weights, Logits::All)?, rt.clone())?;
        let last = Runnable::new(build_llama(&config, &weights, Logits::Last)?, rt)?;
        let weight_bytes = weights.bytes();
        // `g` (the map) is dropped here: the weights were copied out in their block formats.
        Ok(Llm { config, tokenizer, stop_ids, bos, chat, weight_bytes, all, last })
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        let empty = || Tensor::from_vec(vec![1, 0, self.config.kv_width()], Vec::<f32>::new());
        Ok(KvCache {
            keys: (0..self.config.layers).map(|_| empty()).collect::<Result<_, _>>()?,
            values: (0..self.config.layers).map(|_| empty()).collect::<Result<_, _>>()?,
            len: 0,
        })
    }

    /// Prompt text to token ids (chat template applied when `chat`).
    pub fn encode_prompt(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        let text = if chat {
            let t = self.chat.as_ref().context("the model has no chat template (tokenizer.chat_template)")?;
            t.render_user(prompt)
        } else {
            prompt.to_string()
        };
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(&text)?);
        Ok(ids)
    }

    /// Runs `ids` after the cached positions and appends them to the cache. Returns the logits,
    /// `[ids.len(), vocab]` when `all_logits`, else `[1, vocab]` for the last position.
    pub fn forward(&self, state: &mut State, cache: &mut KvCache, ids: &[u32], all_logits: bool) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("no tokens to run");
        }
        let ctx = self.config.context_length;
        if cache.len + ids.len() > ctx {
            bail!(
                "{} tokens (cached {} + new {}) exceed the model's context of {ctx} tokens",
                cache.len + ids.len(),
                cache.len,
                ids.len()
            );
        }
        let vocab = self.config.vocab as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let n = ids.len();
        let mut inputs = vec![
            ("input_ids".to_string(), Tensor::from_vec(vec![1, n], ids.iter().map(|&t| t as i64).collect())?),
            (
                "positions".to_string(),
                Tensor::from_vec(vec![n], (cache.len..cache.len + n).map(|p| p as i64).collect())?,
            ),
        ];
        let keys = std::mem::take(&mut cache.keys);
        let values = std::mem::take(&mut cache.values);
        for (i, (k, v)) in keys.into_iter().zip(values).enumerate() {
            inputs.push((format!("past_key.{i}"), k));
            inputs.push((format!("past_value.{i}"), v));
        }
        let rt = if all_logits { &self.all } else { &self.last };
        let mut outs = rt.run(state, inputs)?.into_iter();
        let logits = outs.next().context("the graph returned no logits")?;
        for _ in 0..self.config.layers {
            cache.keys.push(outs.next().context("missing present_key")?);
            cache.values.push(outs.next().context("missing present_value")?);
        }
        cache.len += n;
        let rows = logits.len() / self.config.vocab.max(1);
        Ok(logits.into_shape(vec![rows, self.config.vocab])?)
    }

    /// Logits of every position of `ids` in one pass without a cache (`[ids.len(), vocab]`).
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        let mut cache = self.new_cache()?;
        self.forward(&mut State::default(), &mut cache, ids, true)
    }

    /// Generates after `prompt_ids`, calling `on_text` with each newly completed piece of text.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        opts: &SampleOptions,
        max_tokens: usize,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let ctx = self.config.context_length;
        if prompt_ids.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt_ids.len() >= ctx {
            bail!("the prompt is {} tokens; the model's context is {ctx} tokens", prompt_ids.len());
        }
        let mut sampler = Sampler::new(opts)?;
        let mut state = State::default();
        let mut cache = self.new_cache()?;
        let t0 = Instant::now();
        let mut logits = self.forward(&mut state, &mut cache, prompt_ids, false)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut tokens = Vec::new();
        let mut stream = StreamDecoder::new();
        let mut stopped_by_eos = false;
        let t1 = Instant::now();
        while tokens.len() < max_tokens {
            let next = sampler.sample(logits.as_slice::<f32>()?);
            if self.stop_ids.contains(&next) {
                stopped_by_eos = true;
                break;
            }
            tokens.push(next);
            on_text(&stream.push(&self.tokenizer, next)?)?;
            if tokens.len() == max_tokens || cache.len + 1 > ctx {
                break;
            }
            logits = self.forward(&mut state, &mut cache, &[next], false)?;
        }
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(Generation { tokens, prompt_tokens: prompt_ids.len(), prefill_s, decode_s, stopped_by_eos })
    }

    /// Perplexity of `ids` with the standard sliding window (as in Hugging Face's "Perplexity
    /// of fixed-length models"): windows of `context` tokens starting every `stride` tokens;
    /// each window scores only the tokens the previous window did not, each conditioned on
    /// everything before it inside the window.
    pub fn perplexity(&self, ids: &[u32], context: usize, stride: usize) -> Result<Perplexity> {
        if context < 2 || stride == 0 || stride > context {
            bail!("need context >= 2 and 0 < stride <= context (got context {context}, stride {stride})");
        }
        if context > self.config.context_length {
            bail!("--context {context} exceeds the model's context of {} tokens", self.config.context_length);
        }
        if ids.len() < 2 {
            bail!("the text has {} token(s); perplexity needs at least 2", ids.len());
        }
        let vocab = self.config.vocab;
        let (mut nll, mut scored, mut windows) = (0f64, 0usize, 0usize);
        let mut state = State::default();
        let mut prev_end = 0;
        let mut begin = 0;
        loop {
            let end = (begin + context).min(ids.len());
            let logits = self.logits_with(&mut state, &ids[begin..end])?;
            let l = logits.as_slice::<f32>()?;
            for t in prev_end.max(begin + 1)..end {
                let row = &l[(t - begin - 1) * vocab..(t - begin) * vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
                nll += lse - row[ids[t] as usize] as f64;
                scored += 1;
            }
            windows += 1;
            prev_end = end;
            if end == ids.len() {
                break;
            }
            begin += stride;
        }
        Ok(Perplexity {
            tokens: ids.len(),
            scored,
            windows,
            nll_per_token: nll / scored as f64,
            ppl: (nll / scored as f64).exp(),
        })
    }

    fn logits_with(&self, state: &mut State, ids: &[u32]) -> Result<Tensor> {
        let mut cache = self.new_cache()?;
        self.forward(state, &mut cache, ids, true)
    }
}

fn load_tokenizer(g: &GgufFile) -> Result<BpeTokenizer> {
    let tokens = g.get_strings("tokenizer.ggml.tokens")?;
    let merges = g.get_strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_default();
    let spec = BpeSpec {
        model: g.get_str("tokenizer.ggml.model")?,
        pre: g.get("tokenizer.ggml.pre").and_then(GgufValue::as_str),
        tokens: &tokens,
        token_types: &types,
        merges: &merges,
    };
    BpeTokenizer::new(&spec).with_context(|| g.path().to_string())
}

/// Result of [`Llm::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub stopped_by_eos: bool,
}

/// Result of [`Llm::perplexity`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub tokens: usize,
    pub scored: usize,
    pub windows: usize,
    pub nll_per_token: f64,
    pub ppl: f64,
}

/// How the next token is chosen. `temperature == 0` is greedy (arg-max, ties to the lowest id).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Greedy or temperature / top-k / top-p sampling with a seeded generator (SplitMix64), so a
/// seed reproduces a generation.
pub struct Sampler {
    opts: SampleOptions,
    rng: u64,
}

impl Sampler {
    pub fn new(opts: &SampleOptions) -> Result<Sampler> {
        if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", opts.temperature);
        }
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", opts.top_p);
        }
        Ok(Sampler { opts: opts.clone(), rng: opts.seed })
    }

    fn next_f64(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
                as u32
        };
        if self.opts.temperature == 0.0 || logits.is_empty() {
            return argmax();
        }
        let t = self.opts.temperature as f64;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &v)| (i as u32, ((v as f64 - max) / t).exp())).collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.opts.top_k > 0 {
            probs.truncate(self.opts.top_k);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if self.opts.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p.1 / total;
                    acc >= self.opts.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.next_f64() * total;
        for &(id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        probs.last().map_or_else(argmax, |p| p.0)
    }
}

/// Reads perplexity text: a plain text file, or a Moby-Dick chapter JSON (`{"text": ...}`).
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        #[derive(serde::Deserialize)]
        struct Chapter {
            text: String,
        }
        let ch: Chapter =
            serde_json::from_str(&raw).with_context(|| format!("{}: expected {{\"text\": ...}}", path.display()))?;
        return Ok(ch.text);
    }
    Ok(raw)
}

/// `slimnn generate`: streams the completion to stdout, then one line of statistics to stderr.
pub fn generate_cli(
    path: &Path,
    prompt: &str,
    chat: bool,
    max_tokens: usize,
    opts: &SampleOptions,
    threads: usize,
) -> Result<()> {
    let llm = Llm::load(path, threads)?;
    let ids = llm.encode_prompt(prompt, chat)?;
    let mut out = std::io::stdout().lock();
    if !chat {
        write!(out, "{prompt}")?;
    }
    let g = llm.generate(&ids, opts, max_tokens, |piece| {
        write!(out, "{piece}")?;
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    eprintln!(
        "[{} prompt tokens, prefill {:.1} tokens/s; {} generated, {:.1} tokens/s{}]",
        g.prompt_tokens,
        g.prompt_tokens as f64 / g.prefill_s.max(1e-9),
        g.tokens.len(),
        g.tokens.len() as f64 / g.decode_s.max(1e-9),
        if g.stopped_by_eos { ", stopped at end-of-sequence" } else { "" }
    );
    Ok(())
}

/// `slimnn perplexity`.
pub fn perplexity_cli(
    path: &Path,
    text: &Path,
    context: usize,
    stride: Option<usize>,
    threads: usize,
) -> Result<Perplexity> {
    let llm = Llm::load(path, threads)?;
    let ids = llm.tokenizer.encode(&read_text(text)?)?;
    let stride = stride.unwrap_or(context);
    let t0 = Instant::now();
    let p = llm.perplexity(&ids, context, stride)?;
    println!(
        "perplexity {:.4} (mean NLL {:.4} nats) over {} scored tokens of {} ({} windows, context {context}, stride {stride}) in {:.1} s",
        p.ppl,
        p.nll_per_token,
        p.scored,
        p.tokens,
        p.windows,
        t0.elapsed().as_secs_f64()
    );
    Ok(p)
}

/// One row of the LLM benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlmBenchRecord {
    pub threads: usize,
    pub prompt_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub weight_bytes: usize,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// `slimnn bench MODEL.gguf`: prefill tokens/s on a `prompt_tokens` prompt (Moby-Dick text when
/// the asset is there) and greedy decode tokens/s over `decode_tokens` tokens, per thread count;
/// medians over `iterations` runs after one warm-up.
pub fn bench_llm(
    path: &Path,
    prompt_tokens: usize,
    decode_tokens: usize,
    threads: &[usize],
    iterations: usize,
    json: Option<&Path>,
) -> Result<Vec<LlmBenchRecord>> {
    println!("slimnn bench {} (kernels: {})", path.display(), slimnn_kernels::cpu::describe());
    println!(
        "{:>7} {:>7} {:>12} {:>7} {:>12} {:>10} {:>9} {:>9}",
        "threads", "prompt", "prefill t/s", "decode", "decode t/s", "weights", "RSS", "peak RSS"
    );
    let mut records = vec![];
    for &t in threads {
        let llm = Llm::load(path, t)?;
        let text = std::fs::read_to_string(Path::new("assets/moby-dick/chapter_1.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["text"].as_str().map(str::to_string))
            .unwrap_or_else(|| "The quick brown fox jumps over the lazy dog. ".repeat(200));
        let mut ids = llm.tokenizer.encode(&text)?;
        if ids.len() < prompt_tokens {
            bail!("bench text has only {} tokens", ids.len());
        }
        ids.truncate(prompt_tokens);
        let mut prefill = vec![];
        let mut decode = vec![];
        let greedy = SampleOptions::default();
        for it in 0..iterations.max(1) + 1 {
            // Stop ids are ignored here so every run decodes the same number of tokens.
            let mut state = State::default();
            let mut cache = llm.new_cache()?;
            let t0 = Instant::now();
            let mut logits = llm.forward(&mut state, &mut cache, &ids, false)?;
            let p = t0.elapsed().as_secs_f64();
            let mut sampler = Sampler::new(&greedy)?;
            let t1 = Instant::now();
            for _ in 0..decode_tokens {
                let next = sampler.sample(logits.as_slice::<f32>()?);
                logits = llm.forward(&mut state, &mut cache, &[next], false)?;
            }
            let d = t1.elapsed().as_secs_f64();
            if it > 0 {
                prefill.push(prompt_tokens as f64 / p);
                decode.push(decode_tokens as f64 / d.max(1e-9));
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let r = LlmBenchRecord {
            threads: t,
            prompt_tokens,
            prefill_tokens_per_s: median(prefill),
            decode_tokens,
            decode_tokens_per_s: median(decode),
            weight_bytes: llm.weight_bytes,
            rss_bytes: status_kb("VmRSS:") * 1024,
            peak_rss_bytes: status_kb("VmHWM:") * 1024,
        };
        println!(
            "{:>7} {:>7} {:>12.1} {:>7} {:>12.1} {:>8.1}MB {:>7.1}MB {:>7.1}MB",
            r.threads,
            r.prompt_tokens,
            r.prefill_tokens_per_s,
            r.decode_tokens,
            r.decode_tokens_per_s,
            r.weight_bytes as f64 / 1e6,
            r.rss_bytes as f64 / 1e6,
            r.peak_rss_bytes as f64 / 1e6
        );
        records.push(r);
    }
    if let Some(p) = json {
        slimnn_formats::write_atomic(p, serde_json::to_string_pretty(&records)?.as_bytes())?;
        println!("wrote {}", p.display());
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut g = Sampler::new(&SampleOptions::default()).unwrap();
        assert_eq!(g.sample(&logits), 1);
        let opts = SampleOptions { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 7 };
        let draw = |o: &SampleOptions| {
            let mut s = Sampler::new(o).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&opts);
        assert_eq!(a, draw(&opts));
        assert!(a.iter().all(|&t| t == 1 || t == 2), "top-k 2 keeps ids 1 and 2: {a:?}");
        assert!(a.contains(&1) && a.contains(&2));
        // top-p small enough keeps only the most likely token.
        let p = SampleOptions { temperature: 1.0, top_k: 0, top_p: 0.1, seed: 3 };
        assert!(draw(&p).iter().all(|&t| t == 1));
        assert!(Sampler::new(&SampleOptions { temperature: -1.0, ..Default::default() }).is_err());
    }
}
