//! Fuzz the `.sbd` loader: any bytes must give a typed error or a model that plans and runs,
//! never a panic and never an allocation beyond what the file and the shape limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbdnet_runtime::{DeployedModel, Plan, PlanOptions};

fuzz_target!(|data: &[u8]| {
    load_and_run(data);
    // Files with a data checksum: also with the checksum rewritten to fit the (mutated) data,
    // so mutations reach the validation behind it.
    let mut sealed = data.to_vec();
    if sbdnet_runtime::format::reseal(&mut sealed) {
        load_and_run(&sealed);
    }
});

fn load_and_run(data: &[u8]) {
    if let Ok(m) = DeployedModel::from_bytes(data, "fuzz") {
        // Keep planned runs small: skip models whose input alone is large.
        if m.values.iter().map(|v| v.storage()).sum::<usize>() < 1 << 22 {
            if let Ok(mut p) = Plan::new(&m, 1, PlanOptions::default()) {
                let x = vec![0.25f32; m.values[0].len()];
                let _ = p.run(&x, 1);
            }
        }
    }
}
