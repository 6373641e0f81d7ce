//! Optimizers (SGD with momentum / Nesterov, Adam, AdamW) and learning-rate schedules
//! (constant, cosine, step; linear warm-up).
//!
//! They work on the flat [`ParamStore`] buffers. Weight decay applies only to tensors marked
//! `decay` (convolution and linear weights). SGD follows PyTorch's convention (dampening 0):
//! `g += wd p; b = mu b + g; p -= lr (g + mu b)` (Nesterov) or `p -= lr b`.

use crate::params::ParamStore;
use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with momentum.
    Sgd,
    /// Adam with L2 weight decay added to the gradient.
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
}

/// Optimizer hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Update rule.
    pub kind: OptimizerKind,
    /// SGD momentum.
    pub momentum: f32,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f32,
    /// Adam beta1.
    pub beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// Adam epsilon.
    pub eps: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// An optimizer and its state (`m`: momentum / first moment, `v`: second moment).
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Hyper-parameters.
    pub config: OptimizerConfig,
    /// First state buffer (momentum or Adam's m).
    pub m: Vec<f32>,
    /// Second state buffer (Adam's v; empty for SGD).
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

impl Optimizer {
    /// A fresh optimizer for `n` parameters.
    pub fn new(config: OptimizerConfig, n: usize) -> Self {
        let v = if config.kind == OptimizerKind::Sgd { Vec::new() } else { vec![0.0; n] };
        Optimizer { config, m: vec![0.0; n], v, t: 0 }
    }

    /// One update of every parameter with learning rate `lr`.
    pub fn step(&mut self, p: &mut ParamStore, lr: f32) {
        self.t += 1;
        let c = self.config;
        for t in &p.tensors {
            let r = t.range();
            let wd = if t.decay { c.weight_decay } else { 0.0 };
            let (w, g, m) = (&mut p.data[r.clone()], &p.grad[r.clone()], &mut self.m[r.clone()]);
            match c.kind {
                OptimizerKind::Sgd => {
                    for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                        let g = g + wd * *w;
                        *m = c.momentum * *m + g;
                        let d = if c.nesterov { g + c.momentum * *m } else { *m };
                        *w -= lr * d;
                    }
                }
                OptimizerKind::Adam | OptimizerKind::AdamW => {
                    let v = &mut self.v[r];
                    let bc1 = 1.0 - c.beta1.powi(self.t.min(i32::MAX as u64) as i32);
                    let bc2 = 1.0 - c.beta2.powi(self.t.min(i32::MAX as u64) as i32);
                    let decoupled = c.kind == OptimizerKind::AdamW;
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let g = if decoupled { g } else { g + wd * *w };
                        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                        let upd = (*m / bc1) / ((*v / bc2).sqrt() + c.eps);
                        if decoupled {
                            *w -= lr * wd * *w;
                        }
                        *w -= lr * upd;
                    }
                }
            }
        }
    }
}

/// Learning-rate schedule shape after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant.
    Constant,
    /// Cosine decay from the base rate to `min_lr` at the last step.
    Cosine,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: usize,
        /// Factor.
        gamma: f32,
    },
}

/// A learning-rate schedule over a whole run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f32,
    /// Final learning rate of the cosine.
    pub min_lr: f32,
    /// Linear warm-up steps (from `base_lr / warmup` to `base_lr`).
    pub warmup_steps: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// Steps per epoch (for `Step`).
    pub steps_per_epoch: usize,
}

impl Schedule {
    /// Learning rate for step `s` (0-based).
    pub fn lr(&self, s: usize) -> f32 {
        if s < self.warmup_steps {
            return self.base_lr * (s + 1) as f32 / self.warmup_steps as f32;
        }
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = ((s - self.warmup_steps) as f32 / span as f32).min(1.0);
                self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f32::consts::PI * t).cos())
            }
            ScheduleKind::Step { every, gamma } => {
                let epoch = s / self.steps_per_epoch.max(1);
                self.base_lr * gamma.powi((epoch / every.max(1)) as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(w: f32, g: f32) -> ParamStore {
        let mut p = ParamStore::default();
        p.add("w".into(), vec![1], true, || w);
        p.grad[0] = g;
        p
    }

    #[test]
    fn sgd_matches_hand_computation() {
        let cfg = OptimizerConfig { momentum: 0.9, nesterov: false, weight_decay: 0.1, ..Default::default() };
        let mut p = store(1.0, 0.5);
        let mut o = Optimizer::new(cfg, 1);
        o.step(&mut p, 0.1);
        // g = 0.5 + 0.1 = 0.6; b = 0.6; w = 1 - 0.06
        assert!((p.data[0] - 0.94).abs() < 1e-6);
        o.step(&mut p, 0.1);
        // g = 0.5 + 0.094 = 0.594; b = 0.54 + 0.594 = 1.134; w = 0.94 - 0.1134
        assert!((p.data[0] - 0.8266).abs() < 1e-5);
        let cfg = OptimizerConfig { nesterov: true, weight_decay: 0.0, ..cfg };
        let mut p = store(1.0, 1.0);
        Optimizer::new(cfg, 1).step(&mut p, 0.1);
        // b = 1; d = 1 + 0.9 = 1.9
        assert!((p.data[0] - 0.81).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_is_lr_sized() {
        for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
            let cfg = OptimizerConfig { kind, weight_decay: 0.0, ..Default::default() };
            let mut p = store(1.0, 3.0);
            Optimizer::new(cfg, 1).step(&mut p, 0.01);
            assert!((p.data[0] - 0.99).abs() < 1e-5, "{kind:?}: {}", p.data[0]);
        }
        let cfg = OptimizerConfig { kind: OptimizerKind::AdamW, weight_decay: 0.5, ..Default::default() };
        let mut p = store(1.0, 0.0);
        Optimizer::new(cfg, 1).step(&mut p, 0.1);
        assert!((p.data[0] - 0.95).abs() < 1e-6);
    }

    #[test]
    fn schedules() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 1.0,
            min_lr: 0.0,
            warmup_steps: 10,
            total_steps: 110,
            steps_per_epoch: 10,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.5).abs() < 1e-6);
        assert!(s.lr(110).abs() < 1e-6);
        let s = Schedule { kind: ScheduleKind::Step { every: 2, gamma: 0.1 }, warmup_steps: 0, ..s };
        assert_eq!(s.lr(19), 1.0);
        assert!((s.lr(20) - 0.1).abs() < 1e-7);
    }
}
