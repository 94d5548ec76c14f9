//! Learning-rate schedules.

/// Cosine annealing stepped every iteration down to 1e-6 (the official `CosineAnnealingLR` with
/// T_max = total iterations, eta_min = 1e-6).
pub fn cosine(lr0: f64, step: usize, total: usize) -> f64 {
    let eta_min = 1e-6;
    if total == 0 {
        return lr0;
    }
    let t = step.min(total) as f64 / total as f64;
    eta_min + (lr0 - eta_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
}

/// Polynomial decay lr0·(1 − step/total)^0.9, the schedule the released Cityscapes models were
/// trained with (reference §5.4).
pub fn poly(lr0: f64, step: usize, total: usize) -> f64 {
    if total == 0 {
        return lr0;
    }
    lr0 * (1.0 - step.min(total) as f64 / total as f64).powf(0.9)
}

#[cfg(test)]
mod tests {
    use super::{cosine, poly};

    #[test]
    fn cosine_starts_at_lr_and_ends_at_eta_min() -> mdeq_testkit::Result {
        assert_eq!(cosine(1e-3, 0, 100), 1e-3);
        assert!((cosine(1e-3, 100, 100) - 1e-6).abs() < 1e-15);
        assert!((cosine(1e-3, 50, 100) - (1e-6 + (1e-3 - 1e-6) / 2.0)).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn poly_decays_from_lr_to_zero() -> mdeq_testkit::Result {
        assert_eq!(poly(0.01, 0, 100), 0.01);
        assert_eq!(poly(0.01, 100, 100), 0.0);
        assert!((poly(0.01, 50, 100) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
        Ok(())
    }
}
