//! Labelled data sets for training: Fashion-MNIST (IDX files, gzip), the SpamAssassin public
//! corpus (one JSON per email), a fixed stratified train/test split, and a deterministic
//! mini-batch order that can resume at any (epoch, batch). See `doc/training.md`, "Data sets".

use crate::{DataError, Result};
use std::io::Read;
use std::path::Path;

fn file_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::File { path: path.display().to_string(), msg: msg.into() }
}

// ---------------------------------------------------------------------------------------------
// Seeded random numbers.

/// SplitMix64: a small, fast, seedable generator whose whole state is one `u64`, so it is
/// trivially saved in a checkpoint. Not cryptographic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator for a sub-stream (an epoch, a class) that does not overlap the parent's
    /// sequence in practice: the seed and the stream id are mixed through one SplitMix round.
    pub fn derive(seed: u64, stream: u64) -> Rng {
        let mut r = Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (rejection sampling).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: log is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST.

/// Class names of Fashion-MNIST, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Images of one split: `images` holds `len() * rows * cols` normalised f32 pixels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// Examples per label, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0)];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// Fashion-MNIST's official 60,000 / 10,000 split. Pixels are scaled to `[0, 1]` and then
/// normalised with the training set's mean and standard deviation (both splits use the
/// training statistics), so `x = (p / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq)]
pub struct FashionMnist {
    pub train: ImageSet,
    pub test: ImageSet,
    pub mean: f32,
    pub std: f32,
}

/// Largest decompressed IDX file accepted (the real training images are 47 MB).
const IDX_LIMIT: u64 = 256 << 20;

/// Reads a gzip IDX file and checks its magic number: `0x0000_08_<rank>` for u8 data of
/// `rank` dims. Returns the dims and the data, whose length is checked against the dims.
fn read_idx_gz(path: &Path, rank: u8) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| file_err(path, format!("{e} (run scripts/fetch-assets.sh)")))?;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(IDX_LIMIT + 1)
        .read_to_end(&mut raw)
        .map_err(|e| file_err(path, format!("not a readable gzip file: {e}")))?;
    if raw.len() as u64 > IDX_LIMIT {
        return Err(file_err(path, format!("decompresses to more than {IDX_LIMIT} bytes")));
    }
    let header_len = 4 + 4 * rank as usize;
    if raw.len() < header_len {
        return Err(file_err(path, format!("{} bytes is too short for an IDX header of rank {rank}", raw.len())));
    }
    let magic = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let expected = 0x0000_0800 | rank as u32;
    if magic != expected {
        return Err(file_err(
            path,
            format!("IDX magic number is {magic:#010x}, expected {expected:#010x} (u8 data of rank {rank})"),
        ));
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]) as usize
        })
        .collect();
    let expected_len = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let data_len = raw.len() - header_len;
    if expected_len != Some(data_len) {
        let expected_len = expected_len.map_or("more than usize::MAX".to_string(), |n| n.to_string());
        return Err(file_err(
            path,
            format!("dims {dims:?} need {expected_len} data bytes, the file has {data_len} (truncated or corrupt)"),
        ));
    }
    raw.drain(..header_len);
    Ok((dims, raw))
}

fn read_split(dir: &Path, prefix: &str) -> Result<(Vec<usize>, Vec<u8>, Vec<u8>)> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (dims, pixels) = read_idx_gz(&images_path, 3)?;
    let (label_dims, labels) = read_idx_gz(&labels_path, 1)?;
    if dims[1] != 28 || dims[2] != 28 {
        return Err(file_err(&images_path, format!("images are {}x{}, expected 28x28", dims[1], dims[2])));
    }
    if label_dims[0] != dims[0] {
        return Err(file_err(
            &labels_path,
            format!("{} labels for {} images in {}", label_dims[0], dims[0], images_path.display()),
        ));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l >= 10) {
        return Err(file_err(&labels_path, format!("label {l} of example {i} is not in 0..10")));
    }
    Ok((dims, pixels, labels))
}

/// Loads `dir/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` (assets/fashion-mnist).
pub fn load_fashion_mnist(dir: &Path) -> Result<FashionMnist> {
    let (train_dims, train_pixels, train_labels) = read_split(dir, "train")?;
    let (test_dims, test_pixels, test_labels) = read_split(dir, "t10k")?;
    if train_pixels.is_empty() {
        return Err(file_err(dir, "the training set has no images"));
    }
    // Statistics of p / 255 over every training pixel, accumulated in f64.
    let n = train_pixels.len() as f64;
    let sum: f64 = train_pixels.iter().map(|&p| p as f64).sum();
    let sum_sq: f64 = train_pixels.iter().map(|&p| (p as f64) * (p as f64)).sum();
    let mean = sum / n / 255.0;
    let var = (sum_sq / n / (255.0 * 255.0) - mean * mean).max(0.0);
    let std = var.sqrt().max(1e-12);
    let normalise = |pixels: Vec<u8>| -> Vec<f32> {
        pixels.into_iter().map(|p| ((p as f64 / 255.0 - mean) / std) as f32).collect()
    };
    Ok(FashionMnist {
        train: ImageSet {
            images: normalise(train_pixels),
            labels: train_labels,
            rows: train_dims[1],
            cols: train_dims[2],
        },
        test: ImageSet { images: normalise(test_pixels), labels: test_labels, rows: test_dims[1], cols: test_dims[2] },
        mean: mean as f32,
        std: std as f32,
    })
}

// ---------------------------------------------------------------------------------------------
// SpamAssassin.

/// One email: `id` is `<group>/<id>` (ids repeat across groups), `text` the subject and the
/// decoded body (see [`email_subject_and_body`]), `label` 1 for spam and 0 for ham.
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    pub id: String,
    pub text: String,
    pub label: u8,
}

#[derive(serde::Deserialize)]
struct SpamFile {
    id: String,
    group: String,
    text: String,
}

/// Loads every `dir/<group>/<id>.json` of the SpamAssassin corpus (assets/spam-assassin),
/// sorted by `<group>/<id>`. Spam is any group whose name starts with `spam`.
pub fn load_spam_assassin(dir: &Path) -> Result<Vec<TextExample>> {
    let list = |d: &Path| -> Result<Vec<std::path::PathBuf>> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .map_err(|e| file_err(d, format!("{e} (run scripts/fetch-assets.sh)")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for group_dir in list(dir)?.into_iter().filter(|p| p.is_dir()) {
        for f in list(&group_dir)?.into_iter().filter(|p| p.extension().is_some_and(|x| x == "json")) {
            let bytes = std::fs::read(&f).map_err(|e| file_err(&f, e.to_string()))?;
            let email: SpamFile = serde_json::from_slice(&bytes)
                .map_err(|e| file_err(&f, format!("not an {{id, group, checksum, text}} JSON object: {e}")))?;
            let label = u8::from(email.group.starts_with("spam"));
            out.push(TextExample {
                id: format!("{}/{}", email.group, email.id),
                text: email_subject_and_body(&email.text),
                label,
            });
        }
    }
    if out.is_empty() {
        return Err(file_err(dir, "no <group>/<id>.json emails found"));
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The seed and test fraction of the fixed SpamAssassin split (documented in doc/training.md).
pub const SPAM_SPLIT_SEED: u64 = 20_240_606;
pub const SPAM_TEST_FRACTION: f64 = 0.2;

/// The fixed SpamAssassin split: [`load_spam_assassin`] then [`stratified_split`] with
/// [`SPAM_TEST_FRACTION`] and [`SPAM_SPLIT_SEED`]. Returns (train, test), each sorted by id.
pub fn spam_assassin_split(dir: &Path) -> Result<(Vec<TextExample>, Vec<TextExample>)> {
    let all = load_spam_assassin(dir)?;
    let labels: Vec<usize> = all.iter().map(|e| e.label as usize).collect();
    let split = stratified_split(&labels, SPAM_TEST_FRACTION, SPAM_SPLIT_SEED);
    let pick = |ix: &[usize]| ix.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
    Ok((pick(&split.train), pick(&split.test)))
}

/// Keeps what a reader sees of a raw RFC 822 email: the subject (RFC 2047 encoded words
/// decoded) and the body. Headers other than the subject are dropped (they give the label
/// away: spam traps, filter traces). Quoted-printable and base64 bodies are decoded, multipart
/// bodies reduced to their text parts (text/plain preferred within multipart/alternative),
/// HTML tags and script/style contents removed, and whitespace collapsed to single spaces.
pub fn email_subject_and_body(raw: &str) -> String {
    let raw = raw.replace("\r\n", "\n");
    let (headers, body) = split_headers(&raw);
    let subject = header(&headers, "subject").map(decode_encoded_words).unwrap_or_default();
    let body = entity_text(&headers, body, 0);
    let text = format!("{subject}\n{body}");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Header lines (unfolded) as (lower-case name, value), and the body after the first blank line.
fn split_headers(raw: &str) -> (Vec<(String, String)>, &str) {
    let (head, body) = match raw.find("\n\n") {
        Some(i) => (&raw[..i], &raw[i + 2..]),
        None if raw.starts_with('\n') => ("", &raw[1..]),
        None => (raw, ""),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            if !name.is_empty() && !name.contains(' ') {
                headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        // Other lines (the mbox "From " separator) are not headers.
    }
    (headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Media type (lower case) and parameters of a Content-Type value.
fn content_type(headers: &[(String, String)]) -> (String, Vec<(String, String)>) {
    let value = header(headers, "content-type").unwrap_or("text/plain");
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let params = parts
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_string()))
        .collect();
    (if media.is_empty() { "text/plain".into() } else { media }, params)
}

/// The readable text of a MIME entity (recursing into multiparts up to a small depth).
fn entity_text(headers: &[(String, String)], body: &str, depth: usize) -> String {
    let (media, params) = content_type(headers);
    if media.starts_with("multipart/") {
        let boundary = params.iter().find(|(k, _)| k == "boundary").map(|(_, v)| v.as_str());
        let Some(boundary) = boundary.filter(|b| !b.is_empty() && depth < 4) else {
            return String::new();
        };
        let parts = multipart_parts(body, boundary);
        let texts: Vec<(String, String)> = parts
            .iter()
            .map(|p| {
                let (h, b) = split_headers(p);
                (content_type(&h).0, entity_text(&h, b, depth + 1))
            })
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        if media == "multipart/alternative" {
            if let Some((_, t)) = texts.iter().find(|(m, _)| m == "text/plain") {
                return t.clone();
            }
            return texts.into_iter().next().map(|(_, t)| t).unwrap_or_default();
        }
        return texts.into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
    }
    if !media.starts_with("text/") {
        return String::new(); // attachments: images, archives, ...
    }
    let encoding = header(headers, "content-transfer-encoding").unwrap_or("").trim().to_ascii_lowercase();
    let decoded = match encoding.as_str() {
        "quoted-printable" => bytes_to_string(&decode_quoted_printable(body.as_bytes(), false)),
        "base64" => match decode_base64(body) {
            Some(b) => bytes_to_string(&b),
            None => body.to_string(),
        },
        _ => body.to_string(),
    };
    if media == "text/html" || looks_like_html(&decoded) {
        strip_html(&decoded)
    } else {
        decoded
    }
}

/// The parts of a multipart body between `--boundary` lines (preamble and epilogue dropped).
fn multipart_parts<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed.starts_with(&delimiter) {
            if let Some(s) = start {
                parts.push(&body[s..offset]);
            }
            if trimmed[delimiter.len()..].starts_with("--") {
                return parts;
            }
            start = Some(offset + line.len());
        }
        offset += line.len();
    }
    if let Some(s) = start {
        parts.push(&body[s..]);
    }
    parts
}

/// Bytes as text: UTF-8 when valid, else Latin-1 (the usual charset of this corpus).
fn bytes_to_string(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.iter().map(|&c| c as char).collect(),
    }
}

fn hex_value(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Quoted-printable (RFC 2045); `underscore_is_space` for RFC 2047 "Q" words.
fn decode_quoted_printable(s: &[u8], underscore_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'=' if s.get(i + 1) == Some(&b'\n') => i += 2, // soft line break
            b'=' if i + 2 < s.len() => match (hex_value(s[i + 1]), hex_value(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                }
                _ => {
                    out.push(b'=');
                    i += 1;
                }
            },
            b'_' if underscore_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Base64 ignoring whitespace; `None` on any other non-alphabet character.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            c if c.is_ascii_whitespace() => continue,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// RFC 2047 encoded words (`=?charset?Q|B?text?=`) in a header value.
fn decode_encoded_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("=?") {
        let decoded = rest[start + 2..].split_once('?').and_then(|(_charset, after)| {
            let (kind, after) = after.split_once('?')?;
            let (text, tail) = after.split_once("?=")?;
            let bytes = match kind {
                "Q" | "q" => decode_quoted_printable(text.as_bytes(), true),
                "B" | "b" => decode_base64(text)?,
                _ => return None,
            };
            Some((bytes_to_string(&bytes), tail))
        });
        match decoded {
            Some((text, tail)) => {
                out.push_str(&rest[..start]);
                out.push_str(&text);
                rest = tail;
            }
            None => {
                out.push_str(&rest[..start + 2]);
                rest = &rest[start + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn looks_like_html(s: &str) -> bool {
    let head: String = s.chars().take(2000).collect::<String>().to_ascii_lowercase();
    head.contains("<html") || head.contains("<body") || head.contains("<!doctype html")
}

/// Rough HTML to text: comments, tags and script/style contents removed, common entities
/// decoded. Not a parser; enough for a bag of words.
fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let lower = html.to_ascii_lowercase();
    let mut i = 0;
    while i < html.len() {
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
        } else if rest.starts_with("<script") || rest.starts_with("<style") {
            let close = if rest.starts_with("<script") { "</script" } else { "</style" };
            i += rest.find(close).map_or(rest.len(), |e| e + close.len());
            i += lower[i..].find('>').map_or(lower.len() - i, |e| e + 1);
        } else if rest.starts_with('<')
            && rest[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/' || c == '!')
        {
            i += rest.find('>').map_or(rest.len(), |e| e + 1);
            out.push(' ');
        } else if rest.starts_with('&') {
            let entity_end = rest.as_bytes()[..rest.len().min(10)].iter().position(|&b| b == b';');
            let decoded = entity_end.and_then(|e| decode_entity(&rest[1..e]).map(|c| (c, e + 1)));
            match decoded {
                Some((c, len)) => {
                    out.push(c);
                    i += len;
                }
                None => {
                    out.push('&');
                    i += 1;
                }
            }
        } else {
            let c = html[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn decode_entity(name: &str) -> Option<char> {
    Some(match name {
        "nbsp" => ' ',
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let num = name.strip_prefix('#')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code)?
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Splits and mini-batches.

/// Indices of a train/test split, each list ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// A stratified split: for each class `c`, the indices with label `c` (ascending) are shuffled
/// with `Rng::derive(seed, c)` and the first `round(count * test_fraction)` go to the test set.
/// The result depends only on the labels' order, the fraction and the seed.
pub fn stratified_split(labels: &[usize], test_fraction: f64, seed: u64) -> Split {
    let classes = labels.iter().map(|&l| l + 1).max().unwrap_or(0);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for c in 0..classes {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        Rng::derive(seed, c as u64).shuffle(&mut members);
        let n_test = ((members.len() as f64) * test_fraction.clamp(0.0, 1.0)).round() as usize;
        test.extend_from_slice(&members[..n_test]);
        train.extend_from_slice(&members[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Split { train, test }
}

/// The order of mini-batches over `len` examples: epoch `e` visits a permutation drawn from
/// `Rng::derive(seed, e)` (or `0..len` in order without shuffling), `batch_size` at a time.
/// Every batch is a pure function of (seed, epoch, batch index), so a run resumes anywhere
/// without saved generator state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOrder {
    pub len: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Drop the last, smaller batch (keeps one input shape per epoch).
    pub drop_last: bool,
}

impl BatchOrder {
    pub fn new(len: usize, batch_size: usize, seed: u64, shuffle: bool) -> BatchOrder {
        BatchOrder { len, batch_size: batch_size.max(1), seed, shuffle, drop_last: false }
    }

    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            Rng::derive(self.seed, epoch as u64).shuffle(&mut order);
        }
        order
    }

    /// The batches of `epoch` from batch index `start` on.
    pub fn batches(&self, epoch: usize, start: usize) -> Batches {
        Batches {
            order: self.permutation(epoch),
            batch_size: self.batch_size,
            next: start,
            end: self.batches_per_epoch(),
        }
    }
}

/// Iterator over the index lists of an epoch's mini-batches (see [`BatchOrder::batches`]).
#[derive(Debug, Clone)]
pub struct Batches {
    order: Vec<usize>,
    batch_size: usize,
    next: usize,
    end: usize,
}

impl Batches {
    /// Index of the batch the next call to `next` returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;
    fn next(&mut self) -> Option<Vec<usize>> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next * self.batch_size;
        let stop = (start + self.batch_size).min(self.order.len());
        self.next += 1;
        Some(self.order[start..stop].to_vec())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn assets(sub: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets").join(sub);
        if p.is_dir() {
            Some(p)
        } else {
            println!("skipped: {} is absent (run scripts/fetch-assets.sh)", p.display());
            None
        }
    }

    #[test]
    fn rng_is_deterministic_and_uniform_enough() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(
            (0..10).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..10).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let mut r = Rng::new(1);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[r.below(4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let mean = (0..20_000).map(|_| r.normal()).sum::<f64>() / 20_000.0;
        assert!(mean.abs() < 0.05, "{mean}");
    }

    #[test]
    fn split_is_stratified_disjoint_and_fixed() {
        let labels: Vec<usize> = (0..103).map(|i| usize::from(i % 3 == 0)).collect();
        let s = stratified_split(&labels, 0.2, 5);
        assert_eq!(s.train.len() + s.test.len(), 103);
        let ones = labels.iter().filter(|&&l| l == 1).count(); // 35
        assert_eq!(s.test.iter().filter(|&&i| labels[i] == 1).count(), (ones as f64 * 0.2).round() as usize);
        assert_eq!(s.test.iter().filter(|&&i| labels[i] == 0).count(), ((103 - ones) as f64 * 0.2).round() as usize);
        assert!(s.test.iter().all(|i| !s.train.contains(i)));
        assert_eq!(s, stratified_split(&labels, 0.2, 5));
        assert_ne!(s, stratified_split(&labels, 0.2, 6));
    }

    #[test]
    fn batches_cover_each_epoch_once_and_resume() {
        let order = BatchOrder::new(10, 3, 42, true);
        assert_eq!(order.batches_per_epoch(), 4);
        let e0: Vec<Vec<usize>> = order.batches(0, 0).collect();
        let mut seen: Vec<usize> = e0.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(e0.last().map(Vec::len), Some(1));
        assert_ne!(e0, order.batches(1, 0).collect::<Vec<_>>(), "epochs are shuffled differently");
        assert_eq!(order.batches(0, 2).collect::<Vec<_>>(), e0[2..].to_vec(), "resuming at batch 2");
        let dropped = BatchOrder { drop_last: true, ..order };
        assert_eq!(dropped.batches(0, 0).count(), 3);
        let plain = BatchOrder::new(5, 2, 0, false);
        assert_eq!(plain.batches(3, 0).collect::<Vec<_>>(), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn email_headers_dropped_subject_and_decoded_body_kept() {
        let raw = "From x@y  Thu Aug 22 2002\nReturn-Path: <x@y>\nSubject: =?iso-8859-1?Q?Caf=E9_offer?=\n \
                   today\nContent-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n\
                   <HTML><BODY><p>Win =\nbig&amp;now</p><script>var x=1;</script><!-- c --></BODY></HTML>\n";
        assert_eq!(email_subject_and_body(raw), "Café offer today Win big&now");
        let multipart = "Subject: hi\nContent-Type: multipart/alternative; boundary=\"XX\"\n\npreamble\n--XX\n\
                         Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ=\n--XX\n\
                         Content-Type: text/html\n\n<b>hello world</b>\n--XX--\nepilogue\n";
        assert_eq!(email_subject_and_body(multipart), "hi hello world");
        assert_eq!(email_subject_and_body("no headers at all"), "");
        assert_eq!(email_subject_and_body("Subject: s\n\nbody"), "s body");
    }

    #[test]
    fn idx_errors_name_the_file_and_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let write_gz = |name: &str, bytes: &[u8]| {
            use std::io::Write;
            let f = std::fs::File::create(dir.join(name)).unwrap();
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        };
        // Labels magic in the images file.
        write_gz("train-images-idx3-ubyte.gz", &[0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0]);
        let e = load_fashion_mnist(dir).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("magic"), "{e}");
        // Truncated data.
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
        img.extend(vec![0u8; 28 * 28 + 5]);
        write_gz("train-images-idx3-ubyte.gz", &img);
        let e = load_fashion_mnist(dir).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // Dims whose product overflows.
        write_gz(
            "train-images-idx3-ubyte.gz",
            &[0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255],
        );
        let e = load_fashion_mnist(dir).unwrap_err().to_string();
        assert!(e.contains("more than usize::MAX"), "{e}");
        // Not gzip at all.
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), b"plain").unwrap();
        let e = load_fashion_mnist(dir).unwrap_err().to_string();
        assert!(e.contains("gzip"), "{e}");
        // Missing file.
        let e = load_fashion_mnist(&dir.join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("nowhere") && e.contains("fetch-assets"), "{e}");
    }

    #[test]
    fn fashion_mnist_real_files() {
        let Some(dir) = assets("fashion-mnist") else { return };
        let d = load_fashion_mnist(&dir).unwrap();
        assert_eq!((d.train.len(), d.test.len()), (60_000, 10_000));
        assert_eq!((d.train.rows, d.train.cols), (28, 28));
        assert_eq!(d.train.class_counts(), vec![6_000; 10]);
        assert_eq!(d.test.class_counts(), vec![1_000; 10]);
        // Known statistics of Fashion-MNIST's training pixels.
        assert!((d.mean - 0.2860).abs() < 1e-3 && (d.std - 0.3530).abs() < 1e-3, "{} {}", d.mean, d.std);
        let m: f64 = d.train.images.iter().map(|&x| x as f64).sum::<f64>() / d.train.images.len() as f64;
        assert!(m.abs() < 1e-4, "normalised training mean {m}");
    }

    #[test]
    fn spam_assassin_real_files() {
        let Some(dir) = assets("spam-assassin") else { return };
        let all = load_spam_assassin(&dir).unwrap();
        let spam = all.iter().filter(|e| e.label == 1).count();
        assert_eq!((all.len(), spam), (6_046, 1_896));
        // Headers survive only inside forwarded messages and bounces.
        let with_headers = all.iter().filter(|e| e.text.contains("Return-Path:")).count();
        assert!(with_headers * 50 < all.len(), "{with_headers} texts with headers");
        let empty = all.iter().filter(|e| e.text.trim().is_empty()).count();
        assert!(empty < 10, "{empty} emails have no text");
        let first = &all[0];
        assert!(first.id.starts_with("easy-ham-1/"), "{}", first.id);
        let (train, test) = spam_assassin_split(&dir).unwrap();
        let count = |v: &[TextExample], l: u8| v.iter().filter(|e| e.label == l).count();
        assert_eq!((count(&train, 0), count(&train, 1), count(&test, 0), count(&test, 1)), (3_320, 1_517, 830, 379));
    }
}
