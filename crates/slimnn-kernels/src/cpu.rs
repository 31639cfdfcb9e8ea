//! Run-time CPU feature detection and the kernel tier.
//!
//! Features are read once per process. The active [`tier`] is the best tier the host supports,
//! capped by the `SLIMNN_CPU_TIER` environment variable (`generic`, `avx2`, `avx512` or `amx`) so
//! one machine can exercise every kernel set. Kernels that need an ISA extension are only reached
//! through a tier that this module vouches for.

use std::fmt;
use std::sync::OnceLock;

/// Name of the environment variable that caps the kernel tier.
pub const CPU_TIER_ENV: &str = "SLIMNN_CPU_TIER";

/// A kernel set, ordered from the most portable to the most specialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuTier {
    /// Portable Rust only (any architecture).
    Generic,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL and DQ (and everything in `Avx2`).
    Avx512,
    /// `Avx512` plus AMX tiles (tile, int8, bf16) granted by the OS.
    Amx,
}

impl CpuTier {
    /// Every tier, most portable first.
    pub const ALL: [CpuTier; 4] = [CpuTier::Generic, CpuTier::Avx2, CpuTier::Avx512, CpuTier::Amx];

    /// The lower-case name used by `SLIMNN_CPU_TIER`.
    pub fn name(self) -> &'static str {
        match self {
            CpuTier::Generic => "generic",
            CpuTier::Avx2 => "avx2",
            CpuTier::Avx512 => "avx512",
            CpuTier::Amx => "amx",
        }
    }

    /// Parses a tier name as accepted by `SLIMNN_CPU_TIER` (case-insensitive, surrounding
    /// whitespace ignored).
    pub fn parse(s: &str) -> Option<CpuTier> {
        let s = s.trim();
        CpuTier::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Whether this host can run kernels of this tier (ignoring the environment cap).
    pub fn is_supported(self) -> bool {
        self <= detected_tier()
    }
}

impl fmt::Display for CpuTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU features slimnn's kernels care about, as detected at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512dq: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    /// AMX-TILE, AMX-INT8 and AMX-BF16 all reported by CPUID.
    pub amx_cpuid: bool,
    /// The OS granted this process the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
    pub amx_granted: bool,
    /// Whether the grant was asked for: only when CPUID reports AMX and the tier cap allows
    /// `amx` (a grant enlarges every signal frame of the process).
    pub amx_requested: bool,
}

impl CpuFeatures {
    /// The best tier these features support.
    pub fn best_tier(&self) -> CpuTier {
        let avx2 = self.avx2 && self.fma;
        let avx512 = avx2 && self.avx512f && self.avx512bw && self.avx512vl && self.avx512dq;
        if avx512 && self.amx_cpuid && self.amx_granted {
            CpuTier::Amx
        } else if avx512 {
            CpuTier::Avx512
        } else if avx2 {
            CpuTier::Avx2
        } else {
            CpuTier::Generic
        }
    }
}

struct CpuState {
    features: CpuFeatures,
    detected: CpuTier,
    active: CpuTier,
    /// The raw `SLIMNN_CPU_TIER` value when it named no tier.
    bad_cap: Option<String>,
}

fn state() -> &'static CpuState {
    static STATE: OnceLock<CpuState> = OnceLock::new();
    STATE.get_or_init(|| {
        let raw = std::env::var(CPU_TIER_ENV).ok();
        let (cap, bad_cap) = parse_cap(raw.as_deref());
        let want_amx = cap.is_none_or(|c| c >= CpuTier::Amx);
        let features = detect(want_amx);
        let detected = features.best_tier();
        let active = cap.map_or(detected, |c| c.min(detected));
        CpuState { features, detected, active, bad_cap }
    })
}

/// Reads a `SLIMNN_CPU_TIER` value: the cap it names, or the raw value when it names no tier
/// (then ignored). Unset or blank means no cap.
fn parse_cap(raw: Option<&str>) -> (Option<CpuTier>, Option<String>) {
    match raw {
        None => (None, None),
        Some(r) if r.trim().is_empty() => (None, None),
        Some(r) => match CpuTier::parse(r) {
            Some(t) => (Some(t), None),
            None => (None, Some(r.to_string())),
        },
    }
}

#[cfg(target_arch = "x86_64")]
fn detect(want_amx: bool) -> CpuFeatures {
    use std::arch::x86_64::__cpuid_count;
    // AMX detection through `is_x86_feature_detected!` is not stable yet: read CPUID leaf 7
    // directly (EDX bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8).
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    let amx_cpuid = max_leaf >= 7 && {
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    };
    let mut f = CpuFeatures {
        avx2: std::is_x86_feature_detected!("avx2"),
        fma: std::is_x86_feature_detected!("fma"),
        avx512f: std::is_x86_feature_detected!("avx512f"),
        avx512bw: std::is_x86_feature_detected!("avx512bw"),
        avx512vl: std::is_x86_feature_detected!("avx512vl"),
        avx512dq: std::is_x86_feature_detected!("avx512dq"),
        avx512vnni: std::is_x86_feature_detected!("avx512vnni"),
        avx512bf16: std::is_x86_feature_detected!("avx512bf16"),
        amx_cpuid,
        amx_granted: false,
        amx_requested: false,
    };
    if amx_cpuid && want_amx {
        f.amx_requested = true;
        f.amx_granted = request_amx();
    }
    f
}

#[cfg(not(target_arch = "x86_64"))]
fn detect(_want_amx: bool) -> CpuFeatures {
    CpuFeatures::default()
}

/// Asks Linux for permission to use the AMX tile data state; true when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, feature) takes two integers and touches no user
    // memory; on kernels without AMX support it fails with an error code, which we report.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    rc == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_amx() -> bool {
    false
}

/// The features detected on this host.
pub fn features() -> CpuFeatures {
    state().features
}

/// The best tier this host supports, ignoring `SLIMNN_CPU_TIER`.
pub fn detected_tier() -> CpuTier {
    state().detected
}

/// The tier kernels use: [`detected_tier`] capped by `SLIMNN_CPU_TIER`.
pub fn tier() -> CpuTier {
    state().active
}

/// Every tier this host supports, most portable first (ignores the environment cap; tests use
/// this to cover each kernel set).
pub fn supported_tiers() -> Vec<CpuTier> {
    CpuTier::ALL.into_iter().filter(|t| t.is_supported()).collect()
}

/// A one-line description for logs and the CLI, e.g.
/// `avx512 (avx2, fma, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni)`.
pub fn describe() -> String {
    let s = state();
    describe_with(s.active, s.detected, &s.features, s.bad_cap.as_deref())
}

fn describe_with(active: CpuTier, detected: CpuTier, f: &CpuFeatures, bad_cap: Option<&str>) -> String {
    let flags = [
        (f.avx2, "avx2"),
        (f.fma, "fma"),
        (f.avx512f, "avx512f"),
        (f.avx512bw, "avx512bw"),
        (f.avx512vl, "avx512vl"),
        (f.avx512dq, "avx512dq"),
        (f.avx512vnni, "avx512vnni"),
        (f.avx512bf16, "avx512bf16"),
    ];
    let mut parts: Vec<&str> = flags.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
    if f.amx_cpuid {
        parts.push(match (f.amx_requested, f.amx_granted) {
            (_, true) => "amx granted",
            (true, false) => "amx refused by the OS",
            (false, false) => "amx not requested",
        });
    }
    let list = if parts.is_empty() { "no SIMD extensions used".to_string() } else { parts.join(", ") };
    let mut out = format!("{active} ({list})");
    if active < detected {
        out.push_str(&format!(", capped by {CPU_TIER_ENV} from {detected}"));
    }
    if let Some(bad) = bad_cap {
        out.push_str(&format!(", ignored {CPU_TIER_ENV}={bad:?}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(CpuTier::parse("generic"), Some(CpuTier::Generic));
        assert_eq!(CpuTier::parse(" AVX2 "), Some(CpuTier::Avx2));
        assert_eq!(CpuTier::parse("avx512"), Some(CpuTier::Avx512));
        assert_eq!(CpuTier::parse("amx"), Some(CpuTier::Amx));
        assert_eq!(CpuTier::parse("sse"), None);
        assert_eq!(CpuTier::parse(""), None);
    }

    #[test]
    fn cap_parsing() {
        assert_eq!(parse_cap(None), (None, None));
        assert_eq!(parse_cap(Some("  ")), (None, None));
        assert_eq!(parse_cap(Some("avx2")), (Some(CpuTier::Avx2), None));
        assert_eq!(parse_cap(Some("Generic")), (Some(CpuTier::Generic), None));
        assert_eq!(parse_cap(Some("avx9")), (None, Some("avx9".to_string())));
    }

    #[test]
    fn tiers_are_ordered() {
        assert!(CpuTier::Generic < CpuTier::Avx2);
        assert!(CpuTier::Avx2 < CpuTier::Avx512);
        assert!(CpuTier::Avx512 < CpuTier::Amx);
    }

    #[test]
    fn best_tier_needs_every_feature() {
        let mut f = CpuFeatures::default();
        assert_eq!(f.best_tier(), CpuTier::Generic);
        f.avx2 = true;
        assert_eq!(f.best_tier(), CpuTier::Generic, "avx2 without fma");
        f.fma = true;
        assert_eq!(f.best_tier(), CpuTier::Avx2);
        f.avx512f = true;
        f.avx512bw = true;
        f.avx512vl = true;
        assert_eq!(f.best_tier(), CpuTier::Avx2, "no avx512dq");
        f.avx512dq = true;
        assert_eq!(f.best_tier(), CpuTier::Avx512);
        f.amx_cpuid = true;
        assert_eq!(f.best_tier(), CpuTier::Avx512, "amx not granted");
        f.amx_granted = true;
        assert_eq!(f.best_tier(), CpuTier::Amx);
    }

    #[test]
    fn active_tier_is_supported() {
        assert!(tier() <= detected_tier());
        assert!(tier().is_supported());
        assert!(CpuTier::Generic.is_supported());
        assert_eq!(supported_tiers()[0], CpuTier::Generic);
        assert_eq!(*supported_tiers().last().unwrap(), detected_tier());
    }

    #[test]
    fn describe_lists_features_and_cap() {
        let f = CpuFeatures {
            avx2: true,
            fma: true,
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            avx512vnni: true,
            amx_cpuid: true,
            amx_granted: true,
            amx_requested: true,
            ..Default::default()
        };
        assert_eq!(
            describe_with(CpuTier::Amx, CpuTier::Amx, &f, None),
            "amx (avx2, fma, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, amx granted)"
        );
        let capped = describe_with(CpuTier::Avx2, CpuTier::Amx, &f, Some("sse"));
        assert!(capped.starts_with("avx2 ("), "{capped}");
        assert!(capped.contains("capped by SLIMNN_CPU_TIER from amx"), "{capped}");
        assert!(capped.contains("ignored SLIMNN_CPU_TIER=\"sse\""), "{capped}");
        let refused = CpuFeatures { amx_granted: false, ..f };
        let text = describe_with(CpuTier::Avx512, CpuTier::Avx512, &refused, None);
        assert!(text.ends_with("amx refused by the OS)"), "{text}");
        let unasked = CpuFeatures { amx_requested: false, ..refused };
        let text = describe_with(CpuTier::Avx512, CpuTier::Avx512, &unasked, None);
        assert!(text.ends_with("amx not requested)"), "{text}");
        let none = describe_with(CpuTier::Generic, CpuTier::Generic, &CpuFeatures::default(), None);
        assert_eq!(none, "generic (no SIMD extensions used)");
        assert!(describe().starts_with(tier().name()));
    }
}
