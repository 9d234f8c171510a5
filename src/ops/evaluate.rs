//! How far a segmentation is from a ground truth: the variation of information (split and merge
//! parts) and the adapted Rand error, as connectomics reports them (CREMI, the LSD paper, waterz's
//! `evaluate`), with scikit-image's definitions (`skimage.metrics.variation_of_information` and
//! `adapted_rand_error`), which the tests check against.
//!
//! Both come from the contingency table (voxels per pair of truth and test labels), so a volume
//! can be counted in any number of pieces: memory grows with the label pairs, never the voxels.
//! Voxels whose truth label is 0 (unlabelled) are not counted, in both measures.

use std::collections::HashMap;

/// Voxel counts per (truth, test) label pair.
#[derive(Clone, Debug, Default)]
pub struct Contingency {
    pairs: HashMap<(u64, u64), u64>,
}

/// The measures of one comparison. Entropies are in bits (base-2 logarithms, as scikit-image and CREMI).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// H(test | truth): over-segmentation (a truth segment split into several).
    pub voi_split: f64,
    /// H(truth | test): under-segmentation (truth segments merged into one).
    pub voi_merge: f64,
    /// 1 - the F-score of the pairs of voxels put together.
    pub adapted_rand_error: f64,
    /// Of the voxel pairs together in the truth, the share the test also puts together (called
    /// precision by scikit-image).
    pub rand_precision: f64,
    /// Of the voxel pairs together in the test, the share the truth also puts together.
    pub rand_recall: f64,
    /// Voxels counted (truth label not 0).
    pub voxels: u64,
}

impl Contingency {
    /// Counts voxel i of `truth` with voxel i of `test` (same shape, same order).
    pub fn add(&mut self, truth: &[u64], test: &[u64]) {
        assert_eq!(truth.len(), test.len(), "truth and test differ in size");
        // Runs of one pair are common (segments are large): count each run once.
        let mut run: Option<((u64, u64), u64)> = None;
        for pair in truth.iter().copied().zip(test.iter().copied()) {
            if pair.0 == 0 {
                continue;
            }
            match &mut run {
                Some((p, n)) if *p == pair => *n += 1,
                _ => {
                    if let Some((p, n)) = run.replace((pair, 1)) {
                        *self.pairs.entry(p).or_default() += n;
                    }
                }
            }
        }
        if let Some((p, n)) = run {
            *self.pairs.entry(p).or_default() += n;
        }
    }

    /// The measures; `None` when no voxel was counted.
    pub fn evaluate(&self) -> Option<Evaluation> {
        let mut truth_sizes: HashMap<u64, u64> = HashMap::new();
        let mut test_sizes: HashMap<u64, u64> = HashMap::new();
        for (&(t, s), &n) in &self.pairs {
            *truth_sizes.entry(t).or_default() += n;
            *test_sizes.entry(s).or_default() += n;
        }
        let voxels: u64 = self.pairs.values().sum();
        if voxels == 0 {
            return None;
        }
        let total = voxels as f64;
        // H(A|B) = -sum p_ab log2(p_ab / p_b), with p_ab / p_b = n_ab / n_b.
        let (mut split, mut merge) = (0.0, 0.0);
        for (&(t, s), &n) in &self.pairs {
            let p = n as f64 / total;
            split -= p * (n as f64 / truth_sizes[&t] as f64).log2();
            merge -= p * (n as f64 / test_sizes[&s] as f64).log2();
        }
        // Twice the voxel pairs together: sum n^2 - n over the table and over each marginal.
        let pairs_together = |counts: &mut dyn Iterator<Item = u64>| -> f64 {
            counts.map(|n| n as f64 * n as f64 - n as f64).sum()
        };
        let both = pairs_together(&mut self.pairs.values().copied());
        let in_truth = pairs_together(&mut truth_sizes.values().copied());
        let in_test = pairs_together(&mut test_sizes.values().copied());
        Some(Evaluation {
            voi_split: split.max(0.0),
            voi_merge: merge.max(0.0),
            adapted_rand_error: 1.0 - both / (0.5 * in_truth + 0.5 * in_test),
            rand_precision: both / in_truth,
            rand_recall: both / in_test,
            voxels,
        })
    }
}

impl Evaluation {
    /// One line for logs and the demo.
    pub fn describe(&self) -> String {
        format!(
            "VOI split {:.4}, merge {:.4} (bits); adapted Rand error {:.4} \
             (precision {:.4}, recall {:.4}) over {} voxels",
            self.voi_split,
            self.voi_merge,
            self.adapted_rand_error,
            self.rand_precision,
            self.rand_recall,
            self.voxels
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluate(truth: &[u64], test: &[u64]) -> Evaluation {
        let mut c = Contingency::default();
        c.add(truth, test);
        c.evaluate().unwrap()
    }

    #[test]
    fn a_perfect_segmentation_scores_zero_whatever_its_labels() {
        let e = evaluate(&[1, 1, 2, 2, 3], &[7, 7, 9, 9, 4]);
        assert_eq!(
            (e.voi_split, e.voi_merge, e.adapted_rand_error),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn splits_and_merges_land_on_their_own_side() {
        // Truth one segment of 4, test two of 2: a split costs 1 bit, no merge.
        let e = evaluate(&[1, 1, 1, 1], &[1, 1, 2, 2]);
        assert!((e.voi_split - 1.0).abs() < 1e-12 && e.voi_merge == 0.0);
        let e = evaluate(&[1, 1, 2, 2], &[5, 5, 5, 5]);
        assert!((e.voi_merge - 1.0).abs() < 1e-12 && e.voi_split == 0.0);
        // 12 pairs together in the test, 4 of them in the truth.
        assert!((e.rand_recall - 4.0 / 12.0).abs() < 1e-12 && e.rand_precision == 1.0);
    }

    #[test]
    fn pieces_add_up_to_the_whole_and_unlabelled_truth_is_not_counted() {
        let truth = [0, 1, 1, 2, 2, 2, 0, 3];
        let test = [4, 1, 2, 2, 2, 3, 3, 3];
        let whole = evaluate(&truth, &test);
        let mut c = Contingency::default();
        c.add(&truth[..3], &test[..3]);
        c.add(&truth[3..], &test[3..]);
        let pieces = c.evaluate().unwrap();
        assert!((pieces.voi_split - whole.voi_split).abs() < 1e-12);
        assert!((pieces.voi_merge - whole.voi_merge).abs() < 1e-12);
        assert!((pieces.adapted_rand_error - whole.adapted_rand_error).abs() < 1e-12);
        assert_eq!(whole.voxels, 6);
        assert_eq!(Contingency::default().evaluate(), None);
    }

    /// scikit-image's measures on the cases tests/fixtures/evaluate/make_evaluate_fixtures.py
    /// wrote (splits, merges, noise, unrelated labellings; unlabelled truth voxels), to 1e-9.
    #[test]
    fn equals_scikit_image() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/evaluate/skimage.json"))
                .unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let labels = |key: &str| -> Vec<u64> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect()
            };
            let e = evaluate(&labels("truth"), &labels("test"));
            for (key, ours) in [
                ("voi_split", e.voi_split),
                ("voi_merge", e.voi_merge),
                ("adapted_rand_error", e.adapted_rand_error),
                ("rand_precision", e.rand_precision),
                ("rand_recall", e.rand_recall),
            ] {
                let theirs = case[key].as_f64().unwrap();
                assert!(
                    (ours - theirs).abs() < 1e-9,
                    "{} {key}: {ours} vs scikit-image {theirs}",
                    case["name"]
                );
            }
        }
    }
}
