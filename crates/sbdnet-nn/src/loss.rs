//! Softmax cross-entropy with optional label smoothing, and knowledge distillation.
//!
//! With `K` classes and smoothing `eps`, the target distribution is
//! `q = (1 - eps) * onehot(y) + eps / K`; the loss is `-sum_k q_k log softmax(z)_k`, averaged
//! over the batch, and its gradient `dL/dz = (softmax(z) - q) / B`.
//!
//! Distillation (Hinton et al., 2015) adds a teacher's logits `t`: with weight `a` and
//! temperature `T`, `L = (1 - a) CE(z, y) + a T^2 KL(softmax(t / T) || softmax(z / T))`, whose
//! gradient is `(1 - a) (softmax(z) - q) / B + a T (softmax(z / T) - softmax(t / T)) / B`
//! (the `T^2` keeps the soft term's gradient on the scale of the hard one's).

/// The loss of a classifier.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Loss {
    /// Label smoothing `eps` in `[0, 1)`.
    pub label_smoothing: f32,
}

impl Loss {
    /// Mean loss and correct count; writes `dL/dlogits` into `dlogits`.
    pub fn forward_backward(&self, logits: &[f32], labels: &[u8], classes: usize, dlogits: &mut [f32]) -> (f32, usize) {
        self.run(logits, labels, classes, Some(dlogits))
    }

    /// Mean loss (with this smoothing) and correct count, no gradient.
    pub fn evaluate(&self, logits: &[f32], labels: &[u8], classes: usize) -> (f32, usize) {
        self.run(logits, labels, classes, None)
    }

    /// Distillation loss (module docs) against `teacher` logits with weight `a` in `[0, 1]`
    /// and temperature `temp > 0`: mean loss and correct count; writes `dL/dlogits`.
    #[allow(clippy::too_many_arguments)]
    pub fn distill(
        &self,
        logits: &[f32],
        teacher: &[f32],
        labels: &[u8],
        classes: usize,
        a: f32,
        temp: f32,
        dlogits: &mut [f32],
    ) -> (f32, usize) {
        let (hard, correct) = self.run(logits, labels, classes, Some(&mut *dlogits));
        let n = labels.len().max(1);
        let mut soft = 0.0f64;
        for (i, d) in dlogits.chunks_exact_mut(classes).enumerate().take(labels.len()) {
            let z = &logits[i * classes..(i + 1) * classes];
            let t = &teacher[i * classes..(i + 1) * classes];
            let scaled = |v: &[f32], k: usize| v[k] / temp;
            let lse_z = log_sum_exp_by(classes, |k| scaled(z, k)).0;
            let lse_t = log_sum_exp_by(classes, |k| scaled(t, k)).0;
            for (k, dk) in d.iter_mut().enumerate() {
                let (lz, lt) = (scaled(z, k) - lse_z, scaled(t, k) - lse_t);
                let pt = lt.exp();
                soft += (pt * (lt - lz)) as f64;
                *dk = (1.0 - a) * *dk + a * temp * (lz.exp() - pt) / n as f32;
            }
        }
        let soft = (soft / n as f64) as f32 * temp * temp;
        ((1.0 - a) * hard + a * soft, correct)
    }

    fn run(&self, logits: &[f32], labels: &[u8], classes: usize, mut grad: Option<&mut [f32]>) -> (f32, usize) {
        let n = labels.len().max(1);
        let eps = self.label_smoothing;
        let off = eps / classes as f32;
        let mut total = 0.0f64;
        let mut correct = 0;
        for (i, &y) in labels.iter().enumerate() {
            let z = &logits[i * classes..(i + 1) * classes];
            let (lse, argmax) = log_sum_exp(z);
            correct += usize::from(argmax == y as usize);
            for (k, &zk) in z.iter().enumerate() {
                let logp = zk - lse;
                let q = off + if k == y as usize { 1.0 - eps } else { 0.0 };
                total -= (q * logp) as f64;
                if let Some(d) = grad.as_deref_mut() {
                    d[i * classes + k] = (logp.exp() - q) / n as f32;
                }
            }
        }
        ((total / n as f64) as f32, correct)
    }
}

/// `log(sum exp z)` and the index of the largest logit (first on ties). A NaN logit makes
/// the result NaN, which the trainer reports as a diverged run.
pub fn log_sum_exp(z: &[f32]) -> (f32, usize) {
    log_sum_exp_by(z.len(), |k| z[k])
}

/// [`log_sum_exp`] of `f(0), ..., f(n - 1)` (values computed on the fly, e.g. scaled by a
/// temperature).
fn log_sum_exp_by(n: usize, f: impl Fn(usize) -> f32) -> (f32, usize) {
    let mut m = f32::NEG_INFINITY;
    let mut arg = 0;
    for k in 0..n {
        let v = f(k);
        if v > m || v.is_nan() {
            m = v;
            arg = k;
        }
    }
    let s: f32 = (0..n).map(|k| (f(k) - m).exp()).sum();
    (m + s.ln(), arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let z = [0.3f32, -1.2, 2.0, 0.1, 0.7, -0.4];
        let labels = [2u8, 0];
        for eps in [0.0, 0.1] {
            let loss = Loss { label_smoothing: eps };
            let mut d = [0.0; 6];
            loss.forward_backward(&z, &labels, 3, &mut d);
            for i in 0..6 {
                let (mut zp, mut zm) = (z, z);
                zp[i] += 1e-2;
                zm[i] -= 1e-2;
                let fd = (loss.evaluate(&zp, &labels, 3).0 - loss.evaluate(&zm, &labels, 3).0) / 2e-2;
                assert!((fd - d[i]).abs() < 1e-3, "eps {eps} i {i}: {fd} vs {}", d[i]);
            }
        }
    }

    #[test]
    fn distillation_gradient_matches_finite_differences() {
        let z = [0.3f32, -1.2, 2.0, 0.1, 0.7, -0.4];
        let t = [1.5f32, -0.2, 0.4, -1.0, 2.2, 0.3];
        let labels = [2u8, 0];
        for (a, temp, eps) in [(0.5, 4.0, 0.0), (0.9, 2.0, 0.1), (1.0, 1.0, 0.0), (0.0, 3.0, 0.0)] {
            let loss = Loss { label_smoothing: eps };
            let f = |z: &[f32]| loss.distill(z, &t, &labels, 3, a, temp, &mut [0.0; 6]).0;
            let mut d = [0.0; 6];
            loss.distill(&z, &t, &labels, 3, a, temp, &mut d);
            for i in 0..6 {
                let (mut zp, mut zm) = (z, z);
                zp[i] += 1e-2;
                zm[i] -= 1e-2;
                let fd = (f(&zp) - f(&zm)) / 2e-2;
                assert!((fd - d[i]).abs() < 2e-3, "a {a} T {temp} i {i}: {fd} vs {}", d[i]);
            }
        }
        // The soft term vanishes where student and teacher agree; a = 0 is plain cross-entropy.
        let mut d = [0.0; 6];
        let (l, _) = Loss::default().distill(&t, &t, &labels, 3, 1.0, 4.0, &mut d);
        assert!(l.abs() < 1e-6 && d.iter().all(|v| v.abs() < 1e-7), "{l} {d:?}");
        let (l0, _) = Loss::default().distill(&z, &t, &labels, 3, 0.0, 4.0, &mut d);
        assert_eq!(l0, Loss::default().evaluate(&z, &labels, 3).0);
    }

    #[test]
    fn counts_correct_and_uniform_loss() {
        let z = [0.0f32; 10];
        let (l, c) = Loss::default().evaluate(&z, &[0], 10);
        assert!((l - 10f32.ln()).abs() < 1e-6);
        assert_eq!(c, 1);
        let (_, c) = Loss::default().evaluate(&[0.0, 1.0], &[0], 2);
        assert_eq!(c, 0);
    }
}
