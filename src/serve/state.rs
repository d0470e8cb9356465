//! A camera's published state: the label it shows the world, changed only after N identical
//! accepted labels in a row, so that one odd frame never flips a door from "closed" to "open".

use crate::Decision;

/// Debounces one camera's accepted labels.
#[derive(Debug, Clone)]
pub struct Debouncer {
    required: u32,
    published: Option<String>,
    candidate: Option<String>,
    streak: u32,
}

/// What one decision did to the published state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUpdate {
    /// The published state after this decision (`None` until the first change).
    pub state: Option<String>,
    /// Whether this decision changed it.
    pub changed: bool,
}

impl Debouncer {
    /// A debouncer that needs `required` (≥ 1) identical accepted labels in a row.
    pub fn new(required: u32) -> Debouncer {
        Debouncer { required: required.max(1), published: None, candidate: None, streak: 0 }
    }

    /// Sets the count needed from now on (a reload), keeping the state.
    pub fn set_required(&mut self, required: u32) {
        self.required = required.max(1);
    }

    /// The published state.
    pub fn state(&self) -> Option<&str> {
        self.published.as_deref()
    }

    /// Feeds one decision. An abstain is passed over: it neither counts towards a change nor
    /// breaks a streak, because "not sure" is no evidence for or against any label. An accepted
    /// label equal to the published state resets the streak of a different candidate.
    pub fn update(&mut self, label: &str, decision: Decision) -> StateUpdate {
        if decision == Decision::Accept {
            if self.published.as_deref() == Some(label) {
                self.candidate = None;
                self.streak = 0;
            } else if self.candidate.as_deref() == Some(label) {
                self.streak += 1;
            } else {
                self.candidate = Some(label.to_string());
                self.streak = 1;
            }
            if self.streak >= self.required {
                self.published = self.candidate.take();
                self.streak = 0;
                return StateUpdate { state: self.published.clone(), changed: true };
            }
        }
        StateUpdate { state: self.published.clone(), changed: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Abstain, Accept};

    fn run(required: u32, decisions: &[(&str, Decision)]) -> Vec<(Option<String>, bool)> {
        let mut debouncer = Debouncer::new(required);
        decisions
            .iter()
            .map(|(label, decision)| debouncer.update(label, *decision))
            .map(|update| (update.state, update.changed))
            .collect()
    }

    #[test]
    fn the_state_changes_after_n_identical_accepted_labels() {
        let updates =
            run(3, &[("cat", Accept), ("cat", Accept), ("cat", Accept), ("dog", Accept), ("dog", Accept), ("cat", Accept)]);
        let states: Vec<_> = updates.iter().map(|(state, _)| state.as_deref()).collect();
        assert_eq!(states, [None, None, Some("cat"), Some("cat"), Some("cat"), Some("cat")]);
        assert_eq!(updates.iter().filter(|(_, changed)| *changed).count(), 1);
    }

    #[test]
    fn a_different_label_restarts_the_streak_and_abstains_never_change_the_state() {
        let updates = run(3, &[("cat", Accept), ("cat", Accept), ("dog", Accept), ("cat", Accept), ("cat", Accept)]);
        assert!(updates.iter().all(|(state, _)| state.is_none()), "{updates:?}");
        let updates = run(2, &[("cat", Accept), ("dog", Abstain), ("dog", Abstain), ("dog", Abstain), ("cat", Accept)]);
        assert_eq!(updates.last(), Some(&(Some("cat".to_string()), true)));
        assert!(updates[..4].iter().all(|(state, _)| state.is_none()));
    }

    #[test]
    fn one_is_no_debounce() {
        let updates = run(1, &[("cat", Accept), ("dog", Accept), ("dog", Accept)]);
        assert_eq!(updates, [(Some("cat".into()), true), (Some("dog".into()), true), (Some("dog".into()), false)]);
    }
}
