//! The float reference executor: every layer kind as plain `f32` loops, binary values as
//! `+-1.0` floats, binary weights unpacked to `+-1.0` (and `0.0` in masked-out groups). It is
//! the oracle the planned, bit-packed executor is tested against, and the way to run a model
//! on a machine where nothing else is trusted (`SBDNET_KERNEL=reference`).

use crate::error::RuntimeError;
use crate::format::DeployedModel;
use crate::graph::{f32s, i32s, mask_groups, u64s, u8s, Conv, Kind, Op, Output, ValueInfo, Weights};
use sbdnet_kernels::binary::words;

/// Unpack a binary convolution's weights to OHWI `+-1.0` floats (`[cout][k][k][cin/groups]`),
/// zero in masked-out groups.
pub fn unpack_binary_weights(cv: &Conv, bits: &[u64], mask: Option<(&[u8], usize)>) -> Vec<f32> {
    let kk = cv.k * cv.k;
    let wd = words(cv.cin);
    let bit = |word: u64, i: usize| if (word >> (i % 64)) & 1 == 1 { -1.0 } else { 1.0 };
    if cv.depthwise() {
        let mut w = vec![0.0; cv.cout * kk];
        for c in 0..cv.cout {
            let keep = mask.is_none_or(|(m, _)| m[c] == 1);
            for tap in 0..kk {
                w[c * kk + tap] = if keep { bit(bits[tap * wd + c / 64], c) } else { 0.0 };
            }
        }
        w
    } else {
        let mut w = vec![0.0; cv.cout * kk * cv.cin];
        for co in 0..cv.cout {
            for tap in 0..kk {
                for ci in 0..cv.cin {
                    let keep = mask.is_none_or(|(m, g)| m[(co * kk + tap) * cv.cin.div_ceil(g) + ci / g] == 1);
                    let word = bits[(co * kk + tap) * wd + ci / 64];
                    w[(co * kk + tap) * cv.cin + ci] = if keep { bit(word, ci) } else { 0.0 };
                }
            }
        }
        w
    }
}

/// Float weights of any convolution (float or unpacked binary), OHWI.
pub fn conv_weights_f32(m: &DeployedModel, name: &str, cv: &Conv) -> Result<Vec<f32>, RuntimeError> {
    let t = &m.tensors;
    Ok(match &cv.weights {
        Weights::Float { tensor } => f32s(t, name, tensor, cv.cout * cv.k * cv.k * (cv.cin / cv.groups))?.to_vec(),
        Weights::Binary { bits, mask, group_size } => {
            let b = u64s(t, name, bits, crate::graph::binary_weight_words(cv))?;
            let mk = match mask {
                Some(mn) => {
                    let (_, total) = mask_groups(cv, *group_size).map_err(|e| crate::error::graph_err(name, e))?;
                    Some((u8s(t, name, mn, total)?, group_size.unwrap_or(1)))
                }
                None => None,
            };
            unpack_binary_weights(cv, b, mk)
        }
    })
}

/// Plain convolution of `n` NHWC images with OHWI weights (zero padding), raw sums: each
/// sum starts at 0 and takes its valid taps in `(ky, kx, ci)` order with fused multiply-add
/// (`f32::mul_add`), the rule the planned first-layer kernels follow exactly.
#[allow(clippy::too_many_arguments)]
pub fn conv_raw(cv: &Conv, x: &[f32], xi: ValueInfo, yo: ValueInfo, w: &[f32], n: usize, out: &mut [f32]) {
    let cpg = cv.cin / cv.groups;
    let opg = cv.cout / cv.groups;
    for b in 0..n {
        for oy in 0..yo.h {
            for ox in 0..yo.w {
                for co in 0..cv.cout {
                    let g = co / opg;
                    let mut s = 0.0f32;
                    for ky in 0..cv.k {
                        let iy = (oy * cv.stride + ky) as isize - cv.pad as isize;
                        if iy < 0 || iy >= xi.h as isize {
                            continue;
                        }
                        for kx in 0..cv.k {
                            let ix = (ox * cv.stride + kx) as isize - cv.pad as isize;
                            if ix < 0 || ix >= xi.w as isize {
                                continue;
                            }
                            let xo = ((b * xi.h + iy as usize) * xi.w + ix as usize) * xi.c + g * cpg;
                            let wo = ((co * cv.k + ky) * cv.k + kx) * cpg;
                            for ci in 0..cpg {
                                s = x[xo + ci].mul_add(w[wo + ci], s);
                            }
                        }
                    }
                    out[((b * yo.h + oy) * yo.w + ox) * cv.cout + co] = s;
                }
            }
        }
    }
}

/// Run `n` images (`n * h * w * c` normalized `f32` inputs) through the model in plain
/// floats; returns `n * classes` scores.
pub fn run(m: &DeployedModel, x: &[f32], n: usize) -> Result<Vec<f32>, RuntimeError> {
    let expected = m.values[0].len();
    if x.len() != n * expected {
        return Err(RuntimeError::Input { got: x.len(), expected, batch: n });
    }
    let t = &m.tensors;
    let mut vals: Vec<Vec<f32>> = vec![x.to_vec()];
    for (i, l) in m.graph.layers.iter().enumerate() {
        let name = l.name.as_str();
        let xi = m.values[l.inputs[0]];
        let yo = m.values[i + 1];
        let xin = &vals[l.inputs[0]];
        let mut y = vec![0.0f32; n * yo.len()];
        match &l.op {
            Op::Conv(cv) => {
                let w = conv_weights_f32(m, name, cv)?;
                conv_raw(cv, xin, xi, yo, &w, n, &mut y);
                let c = cv.cout;
                match &cv.output {
                    Output::Affine { scale, bias, act } => {
                        let (sc, bi) = (f32s(t, name, scale, c)?, f32s(t, name, bias, c)?);
                        for (j, v) in y.iter_mut().enumerate() {
                            *v = act.apply(sc[j % c] * *v + bi[j % c]);
                        }
                    }
                    Output::Threshold { thr, flip } => {
                        let (th, fl) = (i32s(t, name, thr, c)?, u8s(t, name, flip, c)?);
                        for (j, v) in y.iter_mut().enumerate() {
                            let s = *v as i64;
                            let th = th[j % c] as i64;
                            let pos = if fl[j % c] == 1 { s < th } else { s > th };
                            *v = if pos { 1.0 } else { -1.0 };
                        }
                    }
                    Output::Sign { scale, bias, act, t: th } => {
                        let (sc, bi, th) = (f32s(t, name, scale, c)?, f32s(t, name, bias, c)?, f32s(t, name, th, c)?);
                        for (j, v) in y.iter_mut().enumerate() {
                            *v = if act.apply(sc[j % c] * *v + bi[j % c]) > th[j % c] { 1.0 } else { -1.0 };
                        }
                    }
                }
            }
            Op::Linear { inp, out, weight, bias } => {
                let w = f32s(t, name, weight, inp * out)?;
                let b = match bias {
                    Some(b) => Some(f32s(t, name, b, *out)?),
                    None => None,
                };
                for r in 0..n {
                    for o in 0..*out {
                        let mut s = b.map_or(0.0, |b| b[o]);
                        for k in 0..*inp {
                            s += xin[r * inp + k] * w[o * inp + k];
                        }
                        y[r * out + o] = s;
                    }
                }
            }
            Op::Binarize { t: th } => {
                let th = f32s(t, name, th, xi.c)?;
                for (j, (v, &x)) in y.iter_mut().zip(xin).enumerate() {
                    *v = if x > th[j % xi.c] { 1.0 } else { -1.0 };
                }
            }
            Op::Affine { scale, bias, act } => {
                let (sc, bi) = (f32s(t, name, scale, xi.c)?, f32s(t, name, bias, xi.c)?);
                for (j, (v, &x)) in y.iter_mut().zip(xin).enumerate() {
                    *v = act.apply(sc[j % xi.c] * x + bi[j % xi.c]);
                }
            }
            Op::Activation { act } => {
                for (v, &x) in y.iter_mut().zip(xin) {
                    *v = act.apply(x);
                }
            }
            Op::Pool { k, stride, max } => {
                for b in 0..n {
                    for oy in 0..yo.h {
                        for ox in 0..yo.w {
                            for c in 0..xi.c {
                                let mut acc = if *max { f32::NEG_INFINITY } else { 0.0 };
                                for ky in 0..*k {
                                    for kx in 0..*k {
                                        let v =
                                            xin[((b * xi.h + oy * stride + ky) * xi.w + ox * stride + kx) * xi.c + c];
                                        acc = if *max { acc.max(v) } else { acc + v };
                                    }
                                }
                                if !*max {
                                    acc /= (k * k) as f32;
                                }
                                y[((b * yo.h + oy) * yo.w + ox) * yo.c + c] = acc;
                            }
                        }
                    }
                }
            }
            Op::GlobalAvgPool => {
                let hw = xi.h * xi.w;
                for b in 0..n {
                    for c in 0..xi.c {
                        let s: f32 = (0..hw).map(|p| xin[(b * hw + p) * xi.c + c]).sum();
                        y[b * xi.c + c] = s / hw as f32;
                    }
                }
            }
            Op::Flatten => y.copy_from_slice(xin),
            Op::Add => {
                let other = &vals[l.inputs[1]];
                for ((v, &a), &b) in y.iter_mut().zip(xin).zip(other) {
                    *v = a + b;
                }
            }
        }
        debug_assert!(yo.kind == Kind::F32 || y.iter().all(|v| *v == 1.0 || *v == -1.0));
        vals.push(y);
    }
    Ok(vals.pop().unwrap_or_default())
}
