//! Decisions: act on a prediction only when its calibrated confidence reaches the threshold.

/// What the caller should do with a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The calibrated confidence reached the threshold: act on the label.
    Accept,
    /// Below the threshold: do not act (a human, or a later frame, decides).
    Abstain,
}

/// Accept when `confidence >= threshold` (so threshold 0 accepts everything, 1 only certainty).
pub fn decide(confidence: f64, threshold: f64) -> Decision {
    if confidence >= threshold {
        Decision::Accept
    } else {
        Decision::Abstain
    }
}

/// A threshold is a probability.
pub fn validate_threshold(threshold: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&threshold) {
        Ok(())
    } else {
        Err(format!("threshold must be between 0 and 1, got {threshold}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_inclusive() {
        assert_eq!(decide(0.8, 0.8), Decision::Accept);
        assert_eq!(decide(0.799_999, 0.8), Decision::Abstain);
        assert_eq!(decide(0.0, 0.0), Decision::Accept);
    }

    #[test]
    fn threshold_must_be_a_probability() {
        assert!(validate_threshold(1.0).is_ok());
        assert!(validate_threshold(1.5).is_err());
        assert!(validate_threshold(f64::NAN).is_err());
    }
}
