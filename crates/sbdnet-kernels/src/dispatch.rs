//! Run-time kernel selection.
//!
//! One decision for the whole process, made on first use: the environment variable
//! `SBDNET_KERNEL` (`reference`, `portable`, `avx2`) forces a path; otherwise AVX2 + FMA are
//! used when `is_x86_feature_detected!` reports them, else the portable code.

use std::sync::OnceLock;

/// Which implementation family kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Plain loops from [`crate::reference`]: slow, obviously correct.
    Reference,
    /// Optimized algorithms compiled for the baseline target (SSE2 on x86_64).
    Portable,
    /// Optimized algorithms compiled with AVX2 and FMA enabled.
    Avx2,
}

impl KernelPath {
    /// Lower-case name, as accepted by `SBDNET_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Reference => "reference",
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
        }
    }
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn decide(var: Option<&str>) -> KernelPath {
    match var.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("reference") => KernelPath::Reference,
        Some("portable") => KernelPath::Portable,
        _ if avx2_available() => KernelPath::Avx2,
        _ => KernelPath::Portable,
    }
}

/// The kernel path of this process (decided once, from `SBDNET_KERNEL` and the CPU).
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| decide(std::env::var("SBDNET_KERNEL").ok().as_deref()))
}

/// Define a kernel whose body is compiled twice: as portable code and inside an
/// `#[target_feature(enable = "avx2")]` function used when [`kernel_path`] is
/// [`KernelPath::Avx2`]. The body is a real function over slice arguments (not a closure), so
/// the compiler knows `&mut` arguments do not alias and vectorizes its loops with 256-bit
/// registers in the AVX2 build.
#[macro_export]
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::dispatch::kernel_path() == $crate::dispatch::KernelPath::Avx2 {
                    // SAFETY: the AVX2 path is chosen only when the CPU reports AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Run `f` compiled with AVX2+FMA when the process path is [`KernelPath::Avx2`], else as
/// portable code. `f` should be `#[inline(always)]` so its body is re-compiled inside the
/// `target_feature` wrapper and vectorized with 256-bit registers.
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel_path() == KernelPath::Avx2 {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `kernel_path()` returns Avx2 only when the CPU reports avx2 and fma.
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_force_paths() {
        assert_eq!(decide(Some("reference")), KernelPath::Reference);
        assert_eq!(decide(Some("PORTABLE")), KernelPath::Portable);
        let auto = decide(None);
        assert!(auto == KernelPath::Avx2 || auto == KernelPath::Portable);
        assert_eq!(auto == KernelPath::Avx2, avx2_available());
    }
}
