//! Running out of memory as an error, not a crash.
//!
//! cubecl panics when an allocation fails (on the thread that asked, and then on the threads
//! that wait for it). [`catch_out_of_memory`] turns such a panic into an [`OutOfMemory`] error
//! that says what was asked for, what the device has and what to change, and the panic hook of
//! [`quiet_allocation_panics`] keeps those panics from printing a cascade of backtraces.
//!
//! `RUNNER_MEMORY_LIMIT` (bytes, or with a `K`/`M`/`G` suffix: `RUNNER_MEMORY_LIMIT=8G`) caps
//! what training may use: the peak of live GPU buffers on CUDA, the peak resident set on the
//! CPU. It is checked after every optimizer step ([`check_limit`]), so a run that would not fit
//! a smaller card fails the same way on a larger one (and the path is testable on the CPU).

use std::any::Any;
use std::panic::AssertUnwindSafe;

use burn::tensor::backend::Backend;

/// What to change when training does not fit.
const ADVICE: &str = "lower `batch_size` or `max_seq_len` (or `max_tokens_per_batch`), set \
     `gradient_checkpointing = \"offload\"`, or train with `method = \"qlora\"`";

/// A pass needed more memory than the device has (or than `RUNNER_MEMORY_LIMIT` allows).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct OutOfMemory {
    /// `cuda:0`, `cpu`.
    pub device: String,
    /// The allocation that failed, when known.
    pub requested: Option<u64>,
    /// Free and total memory of the device when it failed (CUDA).
    pub free: Option<u64>,
    pub total: Option<u64>,
    /// The `RUNNER_MEMORY_LIMIT` that was passed, and the peak that passed it.
    pub limit: Option<u64>,
    pub peak: Option<u64>,
}

fn size_text(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// `cpu`, `cuda:0`: a device as the recipe's `device` key names it.
pub fn device_label(debug: &str) -> String {
    if debug.starts_with("Cpu") {
        return "cpu".into();
    }
    match debug.split("index: ").nth(1) {
        Some(rest) => format!(
            "cuda:{}",
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        ),
        None => debug.to_string(),
    }
}

impl OutOfMemory {
    fn describe(&self) -> String {
        let mut s = format!("out of memory on {}", self.device);
        if let Some(r) = self.requested {
            s += &format!(": an allocation of {} ({r} bytes) failed", size_text(r));
        }
        if let (Some(free), Some(total)) = (self.free, self.total) {
            s += &format!(
                "; the device has {} free of {}",
                size_text(free),
                size_text(total)
            );
        }
        if let (Some(limit), Some(peak)) = (self.limit, self.peak) {
            s += &format!(
                "; training used {} at its peak, over RUNNER_MEMORY_LIMIT = {}",
                size_text(peak),
                size_text(limit)
            );
        }
        format!("{s}. To fit: {ADVICE}")
    }
}

/// Parses `RUNNER_MEMORY_LIMIT`-style sizes: `123`, `64K`, `512M`, `8G` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, unit) = match t
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '.')
    {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let value: f64 = digits.parse().ok()?;
    let scale = match unit.trim().to_ascii_uppercase().trim_end_matches("IB") {
        "" | "B" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    (value >= 0.0).then_some((value * scale as f64) as u64)
}

/// The limit from `RUNNER_MEMORY_LIMIT`, if set (an unreadable value is reported once and
/// ignored).
pub fn memory_limit() -> Option<u64> {
    let text = std::env::var("RUNNER_MEMORY_LIMIT").ok()?;
    let parsed = parse_size(&text);
    if parsed.is_none() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "RUNNER_MEMORY_LIMIT={text:?} is not a size (expected bytes or e.g. 8G); ignored"
            )
        });
    }
    parsed
}

/// The peak the limit is compared with: live GPU buffers on CUDA, the resident set's
/// high-water mark on the CPU.
fn peak_bytes<B: Backend>() -> Option<u64> {
    if let Some(mb) = crate::backend::accelerator_peak_mb::<B>() {
        return Some((mb * f64::from(1u32 << 20)) as u64);
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Fails when training has used more than `RUNNER_MEMORY_LIMIT` (see the module docs).
pub fn check_limit<B: Backend>(device: &B::Device) -> Result<(), OutOfMemory> {
    let Some(limit) = memory_limit() else {
        return Ok(());
    };
    match peak_bytes::<B>() {
        Some(peak) if peak > limit => Err(OutOfMemory {
            device: device_label(&format!("{device:?}")),
            requested: None,
            free: None,
            total: None,
            limit: Some(limit),
            peak: Some(peak),
        }),
        _ => Ok(()),
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Whether a panic message is an allocation failure of cubecl or the CUDA driver.
pub fn is_allocation_failure(message: &str) -> bool {
    [
        "BufferTooBig",
        "can't allocate buffer",
        "OUT_OF_MEMORY",
        "out of memory",
        "OutOfMemory",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// The size in cubecl's `can't allocate buffer of size: N` or `BufferTooBig { size: N, .. }`.
fn requested_size(message: &str) -> Option<u64> {
    let at = message
        .find("can't allocate buffer")
        .or_else(|| message.find("BufferTooBig"))?;
    let rest = &message[at..];
    let rest = &rest[rest.find("size:")? + "size:".len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The first allocation failure the panic hook saw since [`catch_out_of_memory`] started (its
/// message). After it, cubecl's other threads panic on the broken device state; those panics
/// are its consequences, not news.
static FIRST_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn first_failure() -> std::sync::MutexGuard<'static, Option<String>> {
    FIRST_FAILURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f`; a panic that is an allocation failure becomes an [`OutOfMemory`] for `device`,
/// any other panic goes on unwinding.
pub fn catch_out_of_memory<T>(device: &str, f: impl FnOnce() -> T) -> Result<T, OutOfMemory> {
    quiet_allocation_panics();
    *first_failure() = None;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(f));
    let failure = first_failure().take();
    match outcome {
        Ok(value) => Ok(value),
        Err(payload) => {
            // The panic that reached this thread may be a consequence (a closed channel to
            // cubecl's server thread) of an allocation failure on another thread.
            let message = match (failure, panic_text(payload.as_ref())) {
                (Some(first), _) => first,
                (None, Some(text)) if is_allocation_failure(text) => text.to_string(),
                _ => std::panic::resume_unwind(payload),
            };
            let (free, total) = device_memory_info();
            Err(OutOfMemory {
                device: device.to_string(),
                requested: requested_size(&message),
                free,
                total,
                limit: None,
                peak: None,
            })
        }
    }
}

fn device_memory_info() -> (Option<u64>, Option<u64>) {
    #[cfg(feature = "cuda")]
    if let Ok((free, total)) = crate::backend::cuda::device_memory_info(0) {
        return (Some(free as u64), Some(total as u64));
    }
    (None, None)
}

/// Installs (once) a panic hook that prints nothing for allocation failures, which
/// [`catch_out_of_memory`] reports as one error, and defers to the previous hook otherwise.
pub fn quiet_allocation_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_text(info.payload()).unwrap_or_default();
            let mut first = first_failure();
            if is_allocation_failure(message) {
                tracing::debug!("allocation failure: {message}");
                first.get_or_insert_with(|| message.to_string());
                return;
            }
            if first.is_some() {
                // A consequence of the allocation failure already recorded.
                tracing::debug!("after an allocation failure: {message}");
                return;
            }
            drop(first);
            previous(info)
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The failure record is process-wide: the tests that panic take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size(" 512m "), Some(512 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("12Q"), None);
    }

    #[test]
    fn an_allocation_panic_becomes_an_error_that_says_what_to_change() {
        let _serial = serial();
        let err = catch_out_of_memory("cuda:0", || -> () {
            panic!("called `Result::unwrap()` on an `Err` value: BufferTooBig {{ size: 3221225472, backtrace: <disabled> }}")
        })
        .unwrap_err();
        assert_eq!(err.requested, Some(3 << 30));
        let text = err.to_string();
        assert!(
            text.starts_with("out of memory on cuda:0: an allocation of 3.00 GiB"),
            "{text}"
        );
        for advice in [
            "batch_size",
            "max_seq_len",
            "gradient_checkpointing = \"offload\"",
            "qlora",
        ] {
            assert!(text.contains(advice), "{text}");
        }
    }

    #[test]
    fn cubecl_s_own_message_is_recognised_and_its_consequences_stay_quiet() {
        let _serial = serial();
        let err = catch_out_of_memory("cuda:0", || -> () {
            // cubecl's server thread fails the allocation; the caller then sees a closed channel.
            let server = std::thread::spawn(|| -> () {
                panic!("called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 25165824")
            });
            let _ = server.join();
            panic!("called `Result::unwrap()` on an `Err` value: CallError")
        })
        .unwrap_err();
        assert_eq!(err.requested, Some(25_165_824));
        assert!(
            err.to_string().contains("an allocation of 24.0 MiB"),
            "{err}"
        );
    }

    #[test]
    fn other_panics_keep_unwinding() {
        let _serial = serial();
        let caught = std::panic::catch_unwind(|| {
            let _ = catch_out_of_memory("cpu", || -> () { panic!("index out of bounds") });
        });
        assert!(caught.is_err());
    }
}
