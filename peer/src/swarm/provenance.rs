//! Who named each chain value a download uses, so a parent that names false ones is caught and
//! what it spoiled is undone (sans-IO; the download driver acts on the answers).
//!
//! A piece is checked against values heard from parents (the first one heard for a piece is
//! used). A cluster member can name false values and serve bytes that match them: such pieces
//! check, but the chain they form cannot reach a value that is *anchored*, one known to be
//! true: the last piece's end value when the content digest is known (`--digest`, a registry
//! blob), or a value proved below. Two rules catch the liar:
//! - **It contradicts an anchor.** A parent naming another value for an anchored piece lies.
//! - **Bytes prove it.** Piece `i`'s end is anchored but its bytes fail against our start
//!   value, while they end at the anchor from the start value their parent named: that start
//!   value is the true one (finding bytes that reach an anchor from a false value means
//!   breaking SHA-256), so whoever named ours lied. The proved value becomes an anchor.
//!
//! The liar's values that no other parent confirmed are retracted with the pieces checked
//! against them (only those are fetched again), and the values other parents named for them,
//! kept aside as conflicts until now, are used instead. Values two parents agree on stay:
//! the threat model is one lying member, not several in collusion (see SECURITY.md).

use std::collections::HashMap;

use crate::core::ChainValue;
use crate::engine::ParentId;
use crate::storage::Learned;

/// Conflicting values kept per parent (a parent cannot make this node keep more).
const MAX_CLAIMS_PER_PARENT: usize = 1 << 16;

/// What a value heard from a parent means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// New, or the value already used.
    Fine,
    /// Another value is in use; this one is kept aside (and the piece not asked of it).
    Conflict,
    /// It contradicts an anchored value: the parent lies.
    Liar,
}

#[derive(Debug)]
pub struct Provenance {
    /// The parent that first named each value in use (None: known otherwise, e.g. computed
    /// here from the origin's bytes, or the digest).
    told: Vec<Option<ParentId>>,
    /// A second parent named the same value.
    confirmed: Vec<bool>,
    /// Known true: the digest's, or proved by bytes that reach an anchor.
    anchored: Vec<bool>,
    /// Values parents named that differ from those in use: (parent, piece) -> (value, held).
    claims: HashMap<(ParentId, u32), (ChainValue, bool)>,
    per_parent: HashMap<ParentId, usize>,
}

impl Provenance {
    pub fn new(count: u32) -> Provenance {
        let n = count as usize;
        Provenance {
            told: vec![None; n],
            confirmed: vec![false; n],
            anchored: vec![false; n],
            claims: HashMap::new(),
            per_parent: HashMap::new(),
        }
    }

    /// Piece `j`'s end value in use is known true.
    pub fn anchor(&mut self, j: u32) {
        if let Some(a) = self.anchored.get_mut(j as usize) {
            *a = true;
        }
    }

    pub fn is_anchored(&self, j: u32) -> bool {
        self.anchored.get(j as usize).copied().unwrap_or(false)
    }

    /// `parent` named `value` for piece `j`; the book answered `learned`, and the value in use
    /// before was `known`.
    pub fn heard(
        &mut self,
        parent: ParentId,
        j: u32,
        value: ChainValue,
        held: bool,
        learned: Learned,
        known: bool,
    ) -> Heard {
        let n = j as usize;
        if n >= self.told.len() {
            return Heard::Conflict;
        }
        match learned {
            Learned::OutOfRange => Heard::Conflict,
            Learned::Agrees if !known => {
                self.told[n] = Some(parent);
                Heard::Fine
            }
            Learned::Agrees => {
                if self.told[n] != Some(parent) {
                    self.confirmed[n] = true;
                }
                Heard::Fine
            }
            Learned::Conflicts if self.anchored[n] => Heard::Liar,
            Learned::Conflicts => {
                let count = self.per_parent.entry(parent).or_default();
                if *count < MAX_CLAIMS_PER_PARENT
                    && self.claims.insert((parent, j), (value, held)).is_none()
                {
                    *count += 1;
                }
                Heard::Conflict
            }
        }
    }

    /// The start value `parent` named for piece `i`, when it differs from ours and piece `i`'s
    /// end is anchored: its bytes can then prove which start value is true.
    pub fn alt_start(&self, parent: ParentId, i: u32) -> Option<ChainValue> {
        if i == 0 || !self.is_anchored(i) {
            return None;
        }
        self.claims.get(&(parent, i - 1)).map(|c| c.0)
    }

    /// Who named the value in use for piece `j`.
    pub fn teller(&self, j: u32) -> Option<ParentId> {
        self.told.get(j as usize).copied().flatten()
    }

    /// The values `liar` named that nobody confirmed and nothing anchored: to retract. They
    /// are forgotten here; [`Provenance::take_claims`] gives what others named instead.
    pub fn retract_from(&mut self, liar: ParentId) -> Vec<u32> {
        let mut out = Vec::new();
        for (j, t) in self.told.iter_mut().enumerate() {
            if *t == Some(liar) && !self.confirmed[j] && !self.anchored[j] {
                *t = None;
                out.push(j as u32);
            }
        }
        self.forget_parent(liar);
        out
    }

    /// The values other parents named for piece `j` (taken: the caller learns them again),
    /// `first`'s first.
    pub fn take_claims(
        &mut self,
        j: u32,
        first: Option<ParentId>,
    ) -> Vec<(ParentId, ChainValue, bool)> {
        let mut out: Vec<(ParentId, ChainValue, bool)> = self
            .claims
            .iter()
            .filter(|((_, k), _)| *k == j)
            .map(|((p, _), (v, h))| (*p, *v, *h))
            .collect();
        for (p, _, _) in &out {
            self.claims.remove(&(*p, j));
            if let Some(c) = self.per_parent.get_mut(p) {
                *c = c.saturating_sub(1);
            }
        }
        out.sort_by_key(|(p, _, _)| (Some(*p) != first, *p));
        out
    }

    /// A parent left: its kept-aside values go.
    pub fn forget_parent(&mut self, parent: ParentId) {
        self.claims.retain(|(p, _), _| *p != parent);
        self.per_parent.remove(&parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> ChainValue {
        ChainValue([n; 8])
    }

    #[test]
    fn a_liar_is_caught_by_an_anchor_or_by_proof_and_only_its_unconfirmed_values_go() {
        let (liar, honest, other) = (1, 2, 3);
        let mut p = Provenance::new(4);
        p.anchor(3);
        // The liar is heard first for pieces 0..3; the honest parent agrees on 0 only.
        for j in 0..3 {
            assert_eq!(
                p.heard(liar, j, v(100 + j), true, Learned::Agrees, false),
                Heard::Fine
            );
        }
        assert_eq!(
            p.heard(honest, 0, v(100), true, Learned::Agrees, true),
            Heard::Fine
        );
        for j in 1..3 {
            assert_eq!(
                p.heard(honest, j, v(j), true, Learned::Conflicts, true),
                Heard::Conflict
            );
        }
        // Contradicting the anchor is lying outright.
        assert_eq!(
            p.heard(liar, 3, v(103), true, Learned::Conflicts, true),
            Heard::Liar
        );
        // The honest parent's bytes for piece 3 may prove its start value for piece 2.
        assert_eq!(p.alt_start(honest, 3), Some(v(2)));
        assert_eq!(p.alt_start(other, 3), None);
        assert_eq!(
            p.alt_start(honest, 2),
            None,
            "piece 2's end is not anchored"
        );
        assert_eq!(p.teller(2), Some(liar));
        // Retracted: what the liar alone named; piece 0 was confirmed by the honest parent.
        assert_eq!(p.retract_from(liar), vec![1, 2]);
        assert_eq!(p.take_claims(2, Some(honest)), vec![(honest, v(2), true)]);
        assert!(p.take_claims(2, None).is_empty(), "taken once");
    }

    #[test]
    fn kept_aside_values_are_bounded_per_parent() {
        let mut p = Provenance::new(MAX_CLAIMS_PER_PARENT as u32 + 10);
        for j in 0..MAX_CLAIMS_PER_PARENT as u32 + 10 {
            p.heard(1, j, v(j), true, Learned::Conflicts, true);
        }
        assert_eq!(p.claims.len(), MAX_CLAIMS_PER_PARENT);
        p.forget_parent(1);
        assert!(p.claims.is_empty());
    }
}
