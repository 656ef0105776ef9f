//! Fuzzes the qcow2 parser: arbitrary bytes as a qcow2 image, converted onto
//! /dev/null with a 4 MiB capacity. Any error is fine; a panic, a hang or
//! an allocation beyond the bounds is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use populator_core::disk::{convert_bytes, Format};

fuzz_target!(|data: &[u8]| {
    let _ = convert_bytes(Format::Qcow2, data, 4 << 20);
});
