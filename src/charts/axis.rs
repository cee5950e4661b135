//! Axis scales for the SVG charts: "nice" linear ticks (Heckbert, "Nice numbers for graph
//! labels", Graphics Gems I, 1990), decade ticks for log scales, and tick label formatting.

/// A value range mapped onto pixels, with the tick values to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Lower end of the axis (a tick value, at or below the smallest data value).
    pub lo: f64,
    /// Upper end of the axis (a tick value, at or above the largest data value).
    pub hi: f64,
    /// Tick positions in data units, ascending, all within `lo..=hi`.
    pub ticks: Vec<f64>,
    /// Whether positions are mapped through log10.
    pub log: bool,
    /// Spacing between ticks (linear scales) used to pick label precision.
    pub step: f64,
}

impl Scale {
    /// Linear scale covering `min..=max` with about `target` ticks at 1, 2 or 5 times a power of ten.
    pub fn linear(min: f64, max: f64, target: usize) -> Scale {
        let (min, max) = widen_degenerate(min, max);
        let target = target.max(2) as f64;
        let step = nice_number((max - min) / (target - 1.0), true);
        let lo = snap((min / step + 1e-9).floor() * step, step);
        let hi = snap((max / step - 1e-9).ceil() * step, step);
        let count = ((hi - lo) / step).round() as usize;
        let ticks = (0..=count)
            .map(|i| snap(lo + i as f64 * step, step))
            .collect();
        Scale {
            lo,
            hi,
            ticks,
            log: false,
            step,
        }
    }

    /// Log10 scale over whole decades covering `min..=max` (both must be > 0).
    /// Adds 2x and 5x ticks when the data spans fewer than three decades.
    pub fn log10(min: f64, max: f64) -> Scale {
        let lo_exp = min.log10().floor();
        let mut hi_exp = max.log10().ceil();
        if hi_exp <= lo_exp {
            hi_exp = lo_exp + 1.0;
        }
        let mut ticks = Vec::new();
        let fine = hi_exp - lo_exp < 3.0;
        let mut exp = lo_exp;
        while exp <= hi_exp {
            let decade = pow10(exp);
            ticks.push(decade);
            if fine && exp < hi_exp {
                ticks.push(2.0 * decade);
                ticks.push(5.0 * decade);
            }
            exp += 1.0;
        }
        Scale {
            lo: pow10(lo_exp),
            hi: pow10(hi_exp),
            ticks,
            log: true,
            step: 0.0,
        }
    }

    /// Position of `value` as a fraction of the axis length (0 at `lo`, 1 at `hi`).
    pub fn fraction(&self, value: f64) -> f64 {
        if self.log {
            (value.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        }
    }

    /// Tick label text, with a precision that tells neighbouring ticks apart.
    pub fn label(&self, value: f64) -> String {
        if self.log {
            format_number(value, value)
        } else {
            format_number(value, self.step)
        }
    }
}

/// A zero-width range has no scale: give it room around the single value.
fn widen_degenerate(min: f64, max: f64) -> (f64, f64) {
    if max > min {
        return (min, max);
    }
    let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
    (min - pad, max + pad)
}

/// Heckbert's nice number: 1, 2, 5 or 10 times a power of ten, near `x`.
pub fn nice_number(x: f64, round: bool) -> f64 {
    let exp = x.log10().floor();
    let fraction = x / 10f64.powf(exp);
    let nice = if round {
        match fraction {
            f if f < 1.5 => 1.0,
            f if f < 3.0 => 2.0,
            f if f < 7.0 => 5.0,
            _ => 10.0,
        }
    } else {
        match fraction {
            f if f <= 1.0 => 1.0,
            f if f <= 2.0 => 2.0,
            f if f <= 5.0 => 5.0,
            _ => 10.0,
        }
    };
    nice * 10f64.powf(exp)
}

/// Removes float noise such as 0.30000000000000004 by rounding to a tenth of the step;
/// dividing by an exact power of ten gives the shortest decimal representation.
fn snap(value: f64, step: f64) -> f64 {
    let exp = step.log10().floor() as i32 - 1;
    let snapped = if exp < 0 {
        let scale = 10f64.powi(-exp);
        (value * scale).round() / scale
    } else {
        let unit = 10f64.powi(exp);
        (value / unit).round() * unit
    };
    if snapped == 0.0 {
        0.0 // no "-0"
    } else {
        snapped
    }
}

/// 10^exp computed so that negative powers are correctly rounded (0.01, not 0.010000000000000002).
fn pow10(exp: f64) -> f64 {
    let exp = exp as i32;
    if exp >= 0 {
        10f64.powi(exp)
    } else {
        1.0 / 10f64.powi(-exp)
    }
}

/// Formats `value` with as many digits as `resolution` (a tick step or the value itself) needs:
/// scientific for tiny numbers (learning rates), k/M suffixes for large ones (tokens/s).
pub fn format_number(value: f64, resolution: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = value.abs();
    let resolution = resolution.abs().max(f64::MIN_POSITIVE);
    if magnitude < 1e-3 {
        let digits = (magnitude.log10().floor() - resolution.log10().floor()).clamp(0.0, 3.0);
        return format!("{:.*e}", digits as usize, value);
    }
    if magnitude >= 1e4 {
        let (scaled, suffix, scaled_res) = if magnitude >= 1e6 {
            (value / 1e6, "M", resolution / 1e6)
        } else {
            (value / 1e3, "k", resolution / 1e3)
        };
        return format!("{}{}", format_fixed(scaled, scaled_res), suffix);
    }
    format_fixed(value, resolution)
}

fn format_fixed(value: f64, resolution: f64) -> String {
    let decimals = (-resolution.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_are_nice_and_cover_the_data() {
        let scale = Scale::linear(0.13, 2.47, 5);
        assert_eq!(scale.ticks, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!((scale.lo, scale.hi), (0.0, 2.5));
        let labels: Vec<String> = scale.ticks.iter().map(|t| scale.label(*t)).collect();
        assert_eq!(labels, ["0", "0.5", "1.0", "1.5", "2.0", "2.5"]);
    }

    #[test]
    fn integer_steps_have_no_decimals() {
        let scale = Scale::linear(1.0, 100.0, 5);
        assert_eq!(scale.ticks, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(scale.label(40.0), "40");
    }

    #[test]
    fn ticks_have_no_float_noise() {
        let scale = Scale::linear(0.1, 0.7, 7);
        for tick in &scale.ticks {
            let text = format!("{tick}");
            assert!(text.len() <= 4, "noisy tick {text}");
        }
    }

    #[test]
    fn single_value_gets_a_range_around_it() {
        let scale = Scale::linear(3.0, 3.0, 5);
        assert!(scale.lo < 3.0 && scale.hi > 3.0, "{scale:?}");
        let zero = Scale::linear(0.0, 0.0, 5);
        assert!(zero.lo < 0.0 && zero.hi > 0.0, "{zero:?}");
    }

    #[test]
    fn tiny_and_huge_numbers_read_well() {
        assert_eq!(format_number(2e-4, 5e-5), "2.0e-4");
        assert_eq!(format_number(0.0002, 0.0002), "2e-4");
        assert_eq!(format_number(12_500.0, 500.0), "12.5k");
        assert_eq!(format_number(3_000_000.0, 1_000_000.0), "3M");
        assert_eq!(format_number(-0.25, 0.05), "-0.25");
    }

    #[test]
    fn log_scale_uses_decades() {
        let scale = Scale::log10(0.03, 250.0);
        assert_eq!((scale.lo, scale.hi), (0.01, 1000.0));
        assert!(scale.ticks.contains(&1.0) && scale.ticks.contains(&100.0));
        assert!((scale.fraction(1.0) - 0.4).abs() < 1e-12);
        let narrow = Scale::log10(1.5, 4.0);
        assert_eq!(narrow.ticks, vec![1.0, 2.0, 5.0, 10.0]);
    }
}
