//! End-to-end tests of `--content disk` (issue 3): images made by the real
//! qemu-img from one known raw disk (1 GiB virtual: random regions, a
//! compressible region, written zeros and never-written areas, only ~20 MiB
//! allocated), served by nginx, converted by http-import onto a loop device
//! with noise on it and into a directory target, and compared byte for byte
//! with `qemu-img convert -O raw` of the same fixture.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use populator_tests::fixtures::{sha256_file, Noise};
use populator_tests::loopdev::LoopDevice;
use populator_tests::nginx::nginx;
use populator_tests::proxy::{Fault, FaultProxy};
use populator_tests::run::{worker, Run, WorkerCmd};
use populator_tests::{require_root, sh, shared_dir, test_dir};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Fixtures: (served name, qemu-img format, extra convert options).
const QCOW2: &[(&str, &str, &str)] = &[
    ("v2.qcow2", "qcow2", "-o compat=0.10"),
    ("v3.qcow2", "qcow2", ""),
    ("c2m.qcow2", "qcow2", "-o cluster_size=2M"),
    ("zlib.qcow2", "qcow2", "-c"),
    ("zstd.qcow2", "qcow2", "-c -o compression_type=zstd"),
    ("prealloc.qcow2", "qcow2", "-o preallocation=metadata"),
    ("extl2.qcow2", "qcow2", "-c -o extended_l2=on"),
];
const VMDK: &[(&str, &str, &str)] = &[
    ("sparse.vmdk", "vmdk", "-o subformat=monolithicSparse"),
    ("stream.vmdk", "vmdk", "-o subformat=streamOptimized"),
];
const VHD: &[(&str, &str, &str)] = &[
    ("dynamic.vhd", "vpc", "-o subformat=dynamic"),
    ("fixed.vhd", "vpc", "-o subformat=fixed"),
    ("dynamic.vhdx", "vhdx", "-o subformat=dynamic"),
    ("fixed.vhdx", "vhdx", "-o subformat=fixed"),
];

fn fixtures_dir() -> PathBuf {
    shared_dir("disk-fixtures")
}

/// The known raw disk, written sparse once per test process.
fn base_raw() -> &'static Path {
    static RAW: OnceLock<PathBuf> = OnceLock::new();
    RAW.get_or_init(|| {
        let path = fixtures_dir().join("base.raw");
        let file = File::create(&path).unwrap();
        file.set_len(GIB).unwrap();
        let mut noise = Noise::new(33);
        let mut random = |offset: u64, len: u64| {
            let mut buf = vec![0u8; len as usize];
            noise.fill(&mut buf);
            file.write_all_at(&buf, offset).unwrap();
        };
        random(0, 4 * MIB);
        random(300 * MIB + 4096, 4096);
        random(511 * MIB, 2 * MIB); // across an L2 table's reach (512 MiB)
        random(GIB - MIB, MIB); // the very end
                                // Explicit zeros (allocated in the raw file, zeros in the image).
        file.write_all_at(&vec![0u8; 2 * MIB as usize], 8 * MIB)
            .unwrap();
        // Compressible text, so compressed clusters really are compressed.
        let mut text = Vec::new();
        let mut word = [0u8; 8];
        while text.len() < 4 * MIB as usize {
            noise.fill(&mut word);
            text.extend_from_slice(format!("line {:x} of the disk\n", word[0] % 16).as_bytes());
        }
        text.truncate(4 * MIB as usize);
        file.write_all_at(&text, 100 * MIB).unwrap();
        file.sync_all().unwrap();
        path
    })
}

/// A qemu-img image of the base disk plus its reference raw conversion,
/// made once.
struct Fixture {
    image: PathBuf,
    reference: PathBuf,
    virtual_size: u64,
}

/// Fixtures made so far: name → (image, reference, virtual size).
type Made = std::sync::Mutex<std::collections::HashMap<String, (PathBuf, PathBuf, u64)>>;

fn fixture(name: &str, format: &str, options: &str) -> Fixture {
    static MADE: OnceLock<Made> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    let mut made = made.lock().unwrap();
    let (image, reference, virtual_size) = made
        .entry(name.to_string())
        .or_insert_with(|| {
            let dir = fixtures_dir();
            let image = dir.join(name);
            let reference = dir.join(format!("{name}.raw"));
            sh(&format!(
                "qemu-img convert -f raw -O {format} {options} {} {}",
                base_raw().display(),
                image.display()
            ));
            sh(&format!(
                "qemu-img convert -f {format} -O raw {} {}",
                image.display(),
                reference.display()
            ));
            let size = std::fs::metadata(&reference).unwrap().len();
            (image, reference, size)
        })
        .clone();
    Fixture {
        image,
        reference,
        virtual_size,
    }
}

/// `name.xz` or `name.gz` next to the image, made once.
fn compressed(image: &Path, tool: &str) -> PathBuf {
    let ext = if tool == "xz" { "xz" } else { "gz" };
    let out = PathBuf::from(format!("{}.{ext}", image.display()));
    if !out.exists() {
        let cmd = if tool == "xz" {
            "xz -T2 -1 -c"
        } else {
            "gzip -1 -c"
        };
        sh(&format!(
            "{cmd} {} > {}.tmp && mv {}.tmp {}",
            image.display(),
            out.display(),
            out.display(),
            out.display()
        ));
    }
    out
}

fn import(url: &str, target: &Path) -> WorkerCmd {
    import_with_progress(url, target, "none")
}

fn import_with_progress(url: &str, target: &Path, progress: &str) -> WorkerCmd {
    worker("http-import")
        .arg("--url")
        .arg(url)
        .arg("--target")
        .arg(target)
        .args(["--content", "disk", "--retry-backoff", "0.1"])
        .args(["--progress", progress])
}

/// Compares `len` bytes of two files (a device may be larger than the image).
fn assert_same(out: &Path, reference: &Path, len: u64, run: &Run) {
    let (mut a, mut b) = (File::open(out).unwrap(), File::open(reference).unwrap());
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(x.len() as u64) as usize;
        a.read_exact(&mut x[..n]).unwrap();
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap();
            panic!(
                "{} differs from {} at byte {}{}",
                out.display(),
                reference.display(),
                at + i as u64,
                run.dump()
            );
        }
        at += n as u64;
    }
}

/// Noise across the whole device (1 MiB every 32 MiB plus the last MiB), so
/// a zero region the converter failed to write shows up.
fn stripe_noise(dev: &LoopDevice, size: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.device)
        .unwrap();
    let mut buf = vec![0u8; MIB as usize];
    Noise::new(size).fill(&mut buf);
    let mut at = 0;
    while at + MIB <= size {
        file.write_all_at(&buf, at).unwrap();
        at += 32 * MIB;
    }
    file.write_all_at(&buf, size - MIB).unwrap();
    file.sync_all().unwrap();
}

/// Each fixture: plain and `.xz` to a noisy loop device, `.gz` to a
/// directory (`disk.img`, sparse). Four imports of a 1 GiB disk per fixture
/// cost minutes on a loaded machine; three cover both targets and both
/// compressions.
fn check_formats(test: &str, list: &[(&str, &str, &str)]) {
    require_root();
    let dir = test_dir(test);
    let device_size = GIB + 64 * MIB;
    let dev = LoopDevice::new(&dir, "dev", device_size);
    for (name, qemu_format, options) in list {
        let f = fixture(name, qemu_format, options);
        let plain = nginx().serve(&format!("{test}/{name}"), &f.image);
        let xz = nginx().serve(&format!("{test}/{name}.xz"), &compressed(&f.image, "xz"));
        let gz = nginx().serve(&format!("{test}/{name}.gz"), &compressed(&f.image, "gzip"));
        for (url, to_device) in [(&plain, true), (&xz, true), (&gz, false)] {
            let run = if to_device {
                stripe_noise(&dev, device_size);
                import(url, &dev.device).run()
            } else {
                let out = dir.join("fs");
                let _ = std::fs::remove_dir_all(&out);
                std::fs::create_dir_all(&out).unwrap();
                import(url, &out).run()
            };
            run.success();
            let r = run.result();
            let format = name.rsplit('.').next().unwrap();
            assert_eq!(r["format"], format, "{}", run.dump());
            assert_eq!(r["virtualSize"], f.virtual_size, "{}", run.dump());
            assert_eq!(r["conversion"], "streamed", "{}", run.dump());
            let out = if to_device {
                dev.device.clone()
            } else {
                let img = dir.join("fs/disk.img");
                assert_eq!(std::fs::metadata(&img).unwrap().len(), f.virtual_size);
                img
            };
            assert_same(&out, &f.reference, f.virtual_size, &run);
        }
    }
}

#[test]
fn qcow2_v2_v3_clusters_compression_prealloc_and_subclusters_convert_byte_identical() {
    check_formats("qcow2", QCOW2);
}

#[test]
fn vmdk_monolithic_sparse_and_stream_optimized_convert_byte_identical() {
    check_formats("vmdk", VMDK);
}

#[test]
fn vhd_and_vhdx_fixed_and_dynamic_convert_byte_identical() {
    check_formats("vhd", VHD);
}

/// A qcow2 whose L1 table was moved to the end by a resize: the metadata
/// comes after the data it maps.
fn out_of_order_qcow2() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixtures_dir();
        let small = dir.join("small.raw");
        sh(&format!(
            "head -c {} {} > {}",
            64 * MIB,
            base_raw().display(),
            small.display()
        ));
        let image = dir.join("late-l1.qcow2");
        let reference = dir.join("late-l1.raw");
        sh(&format!(
            "qemu-img convert -f raw -O qcow2 {s} {i} && qemu-img resize -f qcow2 {i} 1G && qemu-img convert -f qcow2 -O raw {i} {r}",
            s = small.display(),
            i = image.display(),
            r = reference.display()
        ));
        Fixture {
            image,
            reference,
            virtual_size: GIB,
        }
    })
}

#[test]
fn out_of_order_layouts_are_read_by_range_or_spooled_and_in_order_ones_stream_without_ranges() {
    require_root();
    let dir = test_dir("ranges");
    let f = out_of_order_qcow2();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let late = nginx().serve("ranges/late-l1.qcow2", &f.image);
    let late_xz = nginx().serve("ranges/late-l1.qcow2.xz", &compressed(&f.image, "xz"));

    // Range support: the L1 table and what it maps come by range requests.
    let run = import(&late, &out).run();
    run.success();
    assert_eq!(run.result()["conversion"], "ranged", "{}", run.dump());
    assert!(run.result()["rangeRequests"].as_u64().unwrap() > 0);
    assert_same(&out.join("disk.img"), &f.reference, GIB, &run);

    // No range support (and a compressed source, whose ranges are useless):
    // spooled, and the result says so.
    for url in [nginx().url_without_ranges("ranges/late-l1.qcow2"), late_xz] {
        let run = import(&url, &out).run();
        run.success().stderr_contains("starting over");
        assert_eq!(run.result()["conversion"], "spooled", "{}", run.dump());
        assert!(run.result()["spooledBytes"].as_u64().unwrap() > 0);
        assert_same(&out.join("disk.img"), &f.reference, GIB, &run);
    }

    // An in-order image needs no ranges: streamed from a server without them.
    let v3 = fixture("v3.qcow2", "qcow2", "");
    nginx().serve("ranges/v3.qcow2", &v3.image);
    let run = import(&nginx().url_without_ranges("ranges/v3.qcow2"), &out).run();
    run.success();
    assert_eq!(run.result()["conversion"], "streamed", "{}", run.dump());
    assert!(run.result().get("spooledBytes").is_none(), "{}", run.dump());
    assert_same(&out.join("disk.img"), &v3.reference, GIB, &run);
}

#[test]
fn progress_counts_produced_bytes_and_rises_from_0_to_100() {
    require_root();
    let dir = test_dir("progress");
    let f = fixture("zlib.qcow2", "qcow2", "-c");
    nginx().serve("progress/zlib.qcow2", &f.image);
    let proxy = FaultProxy::start(nginx().port);
    // ~20 MiB at 8 MiB/s: a few seconds of progress lines.
    proxy.default_fault(Fault::Throttle(8 * MIB));
    let run = import_with_progress(&proxy.url("progress/zlib.qcow2"), &dir, "json")
        .args(["--progress-interval", "0.2"])
        .run();
    run.success();
    let mut totals = Vec::new();
    let percents: Vec<f64> = run
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .filter_map(|v| {
            totals.push(v["totalBytes"].as_u64());
            v["percent"].as_f64()
        })
        .collect();
    assert_eq!(
        totals.last(),
        Some(&Some(f.virtual_size)),
        "progress counts toward the virtual size{}",
        run.dump()
    );
    assert!(
        percents.len() >= 5,
        "too few progress lines: {percents:?}{}",
        run.dump()
    );
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "progress fell: {percents:?}"
    );
    assert!(
        percents.iter().all(|&p| (0.0..=100.0).contains(&p)),
        "{percents:?}"
    );
    assert_eq!(*percents.last().unwrap(), 100.0, "{percents:?}");
    assert!(
        percents.iter().any(|&p| p > 5.0 && p < 95.0),
        "no progress during the conversion: {percents:?}"
    );
}

#[test]
fn checksum_is_over_the_published_bytes_and_grow_extends_disk_img() {
    require_root();
    let dir = test_dir("checksum");
    let f = fixture("v3.qcow2", "qcow2", "");
    let xz = compressed(&f.image, "xz");
    let url = nginx().serve("checksum/v3.qcow2.xz", &xz);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let good = format!("sha256:{}", sha256_file(&xz));
    import(&url, &out)
        .arg("--checksum")
        .arg(&good)
        .run()
        .success();
    let bad = format!("sha256:{}", sha256_file(&f.reference));
    import(&url, &out)
        .arg("--checksum")
        .arg(&bad)
        .run()
        .code(3)
        .reason("ChecksumMismatch");

    // --grow: disk.img grows (sparsely) to the volume minus the overhead.
    let run = import(&url, &out)
        .args([
            "--grow",
            "--filesystem-overhead",
            "0.1",
            "--pvc-size",
            "2Gi",
        ])
        .run();
    run.success();
    let grown = run.result()["grownTo"].as_u64().unwrap();
    let expected = ((2 * GIB) as f64 * 0.9) as u64 & !(MIB - 1);
    assert_eq!(grown, expected, "{}", run.dump());
    let img = out.join("disk.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), grown);
    assert_same(&img, &f.reference, GIB, &run);
}

/// A small qcow2 (64 MiB virtual, 64 KiB clusters) to corrupt.
fn small_qcow2(dir: &Path) -> (Vec<u8>, u64, u64) {
    let raw = dir.join("small.raw");
    sh(&format!(
        "head -c {} {} > {}",
        64 * MIB,
        base_raw().display(),
        raw.display()
    ));
    let image = dir.join("small.qcow2");
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        raw.display(),
        image.display()
    ));
    let data = std::fs::read(&image).unwrap();
    let l1 = u64::from_be_bytes(data[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(data[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    (data, l1, l2)
}

fn put_be64(data: &mut [u8], at: u64, value: u64) {
    data[at as usize..at as usize + 8].copy_from_slice(&value.to_be_bytes());
}

fn serve_bytes(dir: &Path, name: &str, data: &[u8]) -> String {
    let path = dir.join(name);
    File::create(&path).unwrap().write_all(data).unwrap();
    nginx().serve(&format!("bad/{name}"), &path)
}

#[test]
fn bad_images_fail_with_the_contract_s_codes_and_say_why() {
    require_root();
    let dir = test_dir("bad");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (good, l1, l2) = small_qcow2(&dir);
    let mut cases: Vec<(&str, Vec<u8>, i32, &str)> = Vec::new();

    cases.push((
        "truncated.qcow2",
        good[..good.len() / 2].to_vec(),
        3,
        "past the end",
    ));
    let mut past = good.clone();
    put_be64(&mut past, l1, 1 << 40 | 1 << 63);
    cases.push(("l1-past-end.qcow2", past, 3, "reaches past the end"));
    let mut twice = good.clone();
    let first = u64::from_be_bytes(twice[l2 as usize..l2 as usize + 8].try_into().unwrap());
    put_be64(&mut twice, l2 + 8, first);
    cases.push(("twice.qcow2", twice, 3, "referenced twice"));
    let mut overlap = good.clone();
    put_be64(&mut overlap, l2 + 16, l1 | 1 << 63);
    cases.push(("overlap.qcow2", overlap, 3, "overlaps"));
    let mut cluster = good.clone();
    cluster[20..24].copy_from_slice(&30u32.to_be_bytes());
    cases.push(("cluster-bits.qcow2", cluster, 3, "cluster size"));
    let mut exabyte = good.clone();
    put_be64(&mut exabyte, 24, 1 << 60);
    cases.push(("exabyte.qcow2", exabyte, 3, "absurd"));
    let mut l1_short = good.clone();
    put_be64(&mut l1_short, 24, 1 << 40);
    cases.push(("l1-too-small.qcow2", l1_short, 3, "L1 table has"));

    for (name, data, code, text) in &cases {
        let url = serve_bytes(&dir, name, data);
        import(&url, &out).run().code(*code).message_contains(text);
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(
            left.is_empty(),
            "{name}: the target should stay empty: {left:?}"
        );
    }

    // Other formats cut short: a declared size (tables past the end) and a
    // gzip stream whose size nobody declared (the data just stops).
    let vhdx =
        std::fs::read(fixture("dynamic.vhdx", "vhdx", "-o subformat=dynamic").image).unwrap();
    let url = serve_bytes(&dir, "short.vhdx", &vhdx[..vhdx.len() * 3 / 4]);
    import(&url, &out)
        .run()
        .code(3)
        .message_contains("past the end");
    let vmdk = std::fs::read(fixture("stream.vmdk", "vmdk", "-o subformat=streamOptimized").image)
        .unwrap();
    let mut gz = Vec::new();
    {
        let mut child = std::process::Command::new("gzip")
            .arg("-1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let half = vmdk[..vmdk.len() / 2].to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&half).unwrap());
        child.stdout.take().unwrap().read_to_end(&mut gz).unwrap();
        feeder.join().unwrap();
        assert!(child.wait().unwrap().success());
    }
    let url = serve_bytes(&dir, "short.vmdk.gz", &gz);
    import(&url, &out)
        .run()
        .code(3)
        .message_contains("truncated");

    // Features that are refused, made by qemu-img itself.
    let q = |args: &str| sh(&format!("cd {} && qemu-img {args}", dir.display()));
    q("create -q -f qcow2 base.qcow2 64M");
    q("create -q -f qcow2 -b base.qcow2 -F qcow2 child.qcow2");
    q("create -q -f qcow2 --object secret,id=s0,data=pw -o encrypt.format=luks,encrypt.key-secret=s0 luks.qcow2 64M");
    q("create -q -f qcow2 --object secret,id=s0,data=pw -o encrypt.format=aes,encrypt.key-secret=s0 aes.qcow2 64M || true");
    q("create -q -f qcow2 -o data_file=ext.raw ext.qcow2 64M");
    q("create -q -f vmdk -o subformat=twoGbMaxExtentSparse split.vmdk 64M");
    q("convert -q -f raw -O vpc small.raw diff.vhd");
    let mut diff = std::fs::read(dir.join("diff.vhd")).unwrap();
    diff[60..64].copy_from_slice(&4u32.to_be_bytes()); // differencing disk
    std::fs::write(dir.join("diff.vhd"), &diff).unwrap();
    let mut refused = vec![
        ("child.qcow2", "backing file"),
        ("luks.qcow2", "encrypted"),
        ("ext.qcow2", "external data file"),
        ("split.vmdk", "split"),
        ("diff.vhd", "differencing"),
    ];
    if dir.join("aes.qcow2").exists() {
        refused.push(("aes.qcow2", "encrypted"));
    }
    for (name, text) in refused {
        let url = nginx().serve(&format!("bad/{name}"), &dir.join(name));
        import(&url, &out)
            .run()
            .code(3)
            .reason("UnsupportedImage")
            .message_contains(text);
    }

    // A virtual size larger than the target: exit 4 before anything is
    // written, naming both sizes.
    q("create -q -f qcow2 big.qcow2 10G");
    let url = nginx().serve("bad/big.qcow2", &dir.join("big.qcow2"));
    let dev = LoopDevice::new(&dir, "dev", 256 * MIB);
    import(&url, &dev.device)
        .run()
        .code(4)
        .message_contains("10.0 GiB (10737418240 bytes)")
        .message_contains("256.0 MiB (268435456 bytes)");
    import(&url, &out)
        .args(["--pvc-size", "1Gi"])
        .run()
        .code(4)
        .message_contains("virtual size");
}

/// Where a fixture is cut, as a function of its length.
enum Cut {
    /// This many bytes before the end (inside the last cluster, or exactly
    /// the trailing marker or footer).
    FromEnd(u64),
    Half,
    /// Exactly where the last grain marker of a streamOptimized vmdk starts.
    LastGrain,
}

/// The offset of the last grain marker of a streamOptimized vmdk (qemu
/// writes no end-of-stream marker: the grains run to the end of the file).
fn last_grain_marker(image: &Path) -> u64 {
    let data = std::fs::read(image).unwrap();
    let le64 = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    let mut at = le64(64) as usize * 512;
    let mut last = None;
    while at + 16 <= data.len() {
        let size = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        assert!(size > 0, "a metadata marker at {at}: not qemu's layout");
        last = Some(at as u64);
        at = (at + 12 + size).div_ceil(512) * 512;
    }
    last.expect("no grain")
}

/// `head -c` of a fixture: (fixture, cut, gzip it too, what the message says).
type TruncationCase = (
    &'static str,
    &'static str,
    &'static str,
    Cut,
    bool,
    &'static str,
);

#[test]
fn truncated_images_fail_with_exit_3_and_never_succeed_with_zeros() {
    require_root();
    let dir = test_dir("truncated");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let cases: &[TruncationCase] = &[
        (
            "v3.qcow2",
            "qcow2",
            "",
            Cut::FromEnd(1000),
            true,
            "truncated",
        ),
        ("v3.qcow2", "qcow2", "", Cut::Half, false, "truncated"),
        ("zlib.qcow2", "qcow2", "-c", Cut::Half, true, "truncated"),
        (
            "sparse.vmdk",
            "vmdk",
            "-o subformat=monolithicSparse",
            Cut::FromEnd(1000),
            true,
            "truncated",
        ),
        (
            "stream.vmdk",
            "vmdk",
            "-o subformat=streamOptimized",
            Cut::LastGrain,
            true,
            "ends before the grain at byte",
        ),
        (
            "stream.vmdk",
            "vmdk",
            "-o subformat=streamOptimized",
            Cut::FromEnd(1000),
            false,
            "truncated",
        ),
        (
            "stream.vmdk",
            "vmdk",
            "-o subformat=streamOptimized",
            Cut::Half,
            true,
            "truncated",
        ),
        (
            "dynamic.vhd",
            "vpc",
            "-o subformat=dynamic",
            Cut::FromEnd(512),
            true,
            "ends before its footer",
        ),
        (
            "dynamic.vhd",
            "vpc",
            "-o subformat=dynamic",
            Cut::FromEnd(1000),
            false,
            "truncated",
        ),
        (
            "dynamic.vhdx",
            "vhdx",
            "-o subformat=dynamic",
            Cut::FromEnd(1000),
            true,
            "truncated",
        ),
        (
            "fixed.vhdx",
            "vhdx",
            "-o subformat=fixed",
            Cut::Half,
            false,
            "truncated",
        ),
    ];
    for (i, (name, format, options, cut, gzip, text)) in cases.iter().enumerate() {
        let f = fixture(name, format, options);
        let len = std::fs::metadata(&f.image).unwrap().len();
        let keep = match cut {
            Cut::FromEnd(n) => len - n,
            Cut::Half => len / 2,
            Cut::LastGrain => last_grain_marker(&f.image),
        };
        let cut_image = dir.join(format!("{i}-{name}"));
        sh(&format!(
            "head -c {keep} {} > {}",
            f.image.display(),
            cut_image.display()
        ));
        let mut served = vec![nginx().serve(&format!("truncated/{i}-{name}"), &cut_image)];
        if *gzip {
            // No declared length: the stream just stops.
            let gz = compressed(&cut_image, "gzip");
            served.push(nginx().serve(&format!("truncated/{i}-{name}.gz"), &gz));
        }
        for url in served {
            let run = import(&url, &out).run();
            run.code(3).reason("CorruptImage").message_contains(text);
            assert!(
                run.stderr
                    .lines()
                    .filter(|l| l.contains(": Failed ("))
                    .count()
                    == 1,
                "{name} cut to {keep} bytes: one failure line{}",
                run.dump()
            );
            let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
            assert!(left.is_empty(), "{url}: nothing may be left: {left:?}");
        }
    }
}

#[test]
fn a_source_replaced_during_a_ranged_import_fails_instead_of_mixing_two_images() {
    require_root();
    let dir = test_dir("changed");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let f = out_of_order_qcow2();
    let served = nginx().www.join("changed/late-l1.qcow2");
    // With an ETag it goes in If-Range and If-Match; without one (nginx's
    // /no-etag/ location) Last-Modified goes in If-Range and
    // If-Unmodified-Since.
    for (prefix, precondition) in [("", "if-match: \""), ("no-etag/", "if-unmodified-since: ")] {
        // A copy, not the fixture's hard link: its time is set back, and
        // other tests serve the same fixture at the same time.
        std::fs::create_dir_all(served.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&served);
        std::fs::copy(&f.image, &served).unwrap();
        sh(&format!(
            "touch -d '2001-02-03 04:05:06' {}",
            served.display()
        ));
        // The stream crawls (the L1 table is at its end, so range requests
        // start only once it is through); the range requests that follow
        // pass at full speed.
        let size = std::fs::metadata(&f.image).unwrap().len();
        let proxy = FaultProxy::start(nginx().port);
        proxy.plan([Fault::Throttle((size / 4).max(64 << 10))]);
        let cmd = import(&proxy.url(&format!("{prefix}changed/late-l1.qcow2")), &out);
        let child = cmd.spawn();
        for _ in 0..400 {
            if proxy.answered_count() > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert_eq!(proxy.answered_count(), 1, "the download did not start");
        // Another image, newer (another modification time, so another
        // ETag), takes its place, as a server's file is replaced by a new
        // release.
        let other = dir.join("other.qcow2");
        let mut data = std::fs::read(&f.image).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&other, &data).unwrap();
        std::fs::rename(&other, &served).unwrap();
        let run = child.wait();
        let requests = proxy.requests.lock().unwrap().clone();
        assert_eq!(run.code, 3, "requests: {requests:#?}{}", run.dump());
        run.code(3)
            .reason("SourceChanged")
            .message_contains("changed since the download started");
        let ranged: Vec<_> = requests
            .iter()
            .map(|r| r.to_ascii_lowercase())
            .filter(|r| r.contains("\r\nrange:"))
            .collect();
        assert!(
            !ranged.is_empty(),
            "no range request: {requests:?}{}",
            run.dump()
        );
        for r in ranged {
            assert!(
                r.contains("\r\nif-range: ") && r.contains(&format!("\r\n{precondition}")),
                "a range request without the first response's validator: {r}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(left.is_empty(), "nothing may be left: {left:?}");
    }
}

/// Block and grain tables of vhd, vhdx and vmdk images made by qemu-img
/// (64 MiB virtual), patched: an entry past the end of the file, two
/// entries naming the same block, an absurd disk size or block size.
#[test]
fn bad_block_and_grain_tables_fail_with_exit_3_and_say_why() {
    require_root();
    let dir = test_dir("bad-tables");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let raw = dir.join("small.raw");
    sh(&format!(
        "head -c {} {} > {}",
        64 * MIB,
        base_raw().display(),
        raw.display()
    ));
    let make = |format: &str, options: &str, name: &str| {
        let image = dir.join(name);
        sh(&format!(
            "qemu-img convert -f raw -O {format} {options} {} {}",
            raw.display(),
            image.display()
        ));
        std::fs::read(image).unwrap()
    };
    let be32 = |d: &[u8], at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
    let le32 = |d: &[u8], at: usize| u32::from_le_bytes(d[at..at + 4].try_into().unwrap());
    let le64 = |d: &[u8], at: usize| u64::from_le_bytes(d[at..at + 8].try_into().unwrap());
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();

    // vhd: footer copy → dynamic header (BAT offset at 16) → BAT.
    let vhd = make("vpc", "-o subformat=dynamic", "good.vhd");
    let bat = u64::from_be_bytes(vhd[512 + 16..512 + 24].try_into().unwrap()) as usize;
    let first = be32(&vhd, bat);
    let mut v = vhd.clone();
    v[bat..bat + 4].copy_from_slice(&0x0fff_ffffu32.to_be_bytes());
    cases.push(("bat-past-end.vhd".into(), v, "reaches past the end"));
    let mut v = vhd.clone();
    v[bat + 4..bat + 8].copy_from_slice(&first.to_be_bytes());
    cases.push(("bat-twice.vhd".into(), v, "referenced twice"));
    let mut v = vhd.clone();
    v[28..32].copy_from_slice(b"qem2");
    v[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes());
    cases.push(("exabytes.vhd".into(), v, "absurd"));
    let mut v = vhd.clone();
    v[512 + 32..512 + 36].copy_from_slice(&3u32.to_be_bytes());
    cases.push(("block-size.vhd".into(), v, "block size of 3 bytes"));

    // vmdk monolithicSparse: grain directory (sector at 56) → grain tables.
    let vmdk = make("vmdk", "-o subformat=monolithicSparse", "good.vmdk");
    let gd = le64(&vmdk, 56) as usize * 512;
    let gt = le32(&vmdk, gd) as usize * 512;
    let mut v = vmdk.clone();
    v[gd..gd + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    cases.push(("gd-past-end.vmdk".into(), v, "grain table at byte"));
    let mut v = vmdk.clone();
    let grain = le32(&vmdk, gt);
    v[gt + 4..gt + 8].copy_from_slice(&grain.to_le_bytes());
    cases.push(("grain-twice.vmdk".into(), v, "referenced twice"));
    let mut v = vmdk.clone();
    v[12..20].copy_from_slice(&(1u64 << 60).to_le_bytes());
    cases.push(("exabytes.vmdk".into(), v, "absurd"));

    // vhdx: region table at 192 KiB names the BAT region.
    let vhdx = make("vhdx", "-o subformat=dynamic", "good.vhdx");
    let bat_guid = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let regions = 192 << 10;
    let entry = (0..le32(&vhdx, regions + 8) as usize)
        .map(|i| regions + 16 + i * 32)
        .find(|&e| vhdx[e..e + 16] == bat_guid)
        .expect("no BAT region");
    let bat = le64(&vhdx, entry + 16) as usize;
    let mut v = vhdx.clone();
    v[bat..bat + 8].copy_from_slice(&(1u64 << 40 | 6).to_le_bytes());
    cases.push(("bat-past-end.vhdx".into(), v, "reaches past the end"));
    let mut v = vhdx.clone();
    let block = le64(&vhdx, bat);
    assert_eq!(block & 7, 6, "block 0 of the vhdx should be present");
    v[bat + 8..bat + 16].copy_from_slice(&block.to_le_bytes());
    cases.push(("bat-twice.vhdx".into(), v, "referenced twice"));

    for (name, data, text) in &cases {
        let url = serve_bytes(&dir, name, data);
        import(&url, &out)
            .run()
            .code(3)
            .reason("CorruptImage")
            .message_contains(text);
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(left.is_empty(), "{name}: nothing may be left: {left:?}");
    }
}
