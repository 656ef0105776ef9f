//! End-to-end tests of http-import (issue 2): real nginx, a fault proxy and
//! loop devices with ext4, as root.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use populator_tests::fixtures::{
    mostly_zero_file, random_fixture, secret_file, sha256_file, sha256_prefix,
};
use populator_tests::loopdev::{Fs, LoopDevice};
use populator_tests::nginx::{self, nginx};
use populator_tests::proxy::{Fault, FaultProxy};
use populator_tests::run::{assert_empty_dir, worker};
use populator_tests::{require_root, scratch, sh, shared_dir, test_dir};

const MIB: u64 = 1 << 20;

fn import(url: &str, target: &Path) -> populator_tests::run::WorkerCmd {
    worker("http-import")
        .arg("--url")
        .arg(url)
        .arg("--target")
        .arg(target)
        .args(["--retry-backoff", "0.1"])
}

fn disk_usage(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn imports_256m_to_a_directory_an_image_file_and_a_block_device() {
    require_root();
    let data = random_fixture("random-256m.bin", 256 * MIB, 1);
    let expected = sha256_file(&data);
    let url = nginx().serve("random-256m.bin", &data);
    let dir = test_dir("import-256m");

    let fs = LoopDevice::with_fs(&dir, "fs", 400 * MIB, Fs::Ext4);
    let run = import(&url, fs.mount_point()).run();
    run.success();
    assert_eq!(run.sha256(), expected, "{}", run.dump());
    assert_eq!(run.result()["target"]["kind"], "filesystem");
    assert_eq!(run.result()["bytesRead"], 256 * MIB);
    assert_eq!(run.result()["bytesWritten"], 256 * MIB);
    assert_eq!(
        sha256_file(&fs.mount_point().join("random-256m.bin")),
        expected
    );
    assert!(!fs
        .mount_point()
        .join(".random-256m.bin.populator-partial")
        .exists());

    // An image file, with the URL and target given through the environment.
    let image = dir.join("disk.img");
    let run = worker("http-import")
        .env("POPULATOR_URL", &url)
        .env("POPULATOR_TARGET", image.to_str().unwrap())
        .run();
    run.success();
    assert_eq!(run.result()["target"]["kind"], "file");
    assert_eq!(sha256_file(&image), expected);

    let block = LoopDevice::new(&dir, "blk", 256 * MIB + 4 * MIB);
    block.fill_random();
    let run = import(&url, &block.device).run();
    run.success();
    assert_eq!(run.result()["target"]["kind"], "block");
    assert_eq!(run.sha256(), expected);
    assert_eq!(sha256_prefix(&block.device, 256 * MIB), expected);
}

#[test]
fn compressed_sources_are_decompressed_and_the_checksum_is_over_the_received_bytes() {
    let raw = random_fixture("payload-12m.bin", 12 * MIB, 2);
    let dir = test_dir("compressed");
    for (ext, tool, name) in [
        ("gz", "gzip -1", "gzip"),
        ("xz", "xz -0 -T1", "xz"),
        ("zst", "zstd -q -1", "zstd"),
        ("bz2", "bzip2 -1", "bzip2"),
    ] {
        let packed = dir.join(format!("payload.bin.{ext}"));
        sh(&format!(
            "{tool} -c {} > {}",
            raw.display(),
            packed.display()
        ));
        let url = nginx().serve(&format!("compressed/payload.bin.{ext}"), &packed);
        let out = dir.join(format!("out-{ext}"));
        std::fs::create_dir_all(&out).unwrap();
        let packed_sha = sha256_file(&packed);
        let run = import(&url, &out)
            .arg("--checksum")
            .arg(format!("sha256:{packed_sha}"))
            .run();
        run.success();
        assert_eq!(run.result()["compression"], name, "{}", run.dump());
        assert_eq!(run.sha256(), packed_sha);
        assert_eq!(
            sha256_file(&out.join("payload.bin")),
            sha256_file(&raw),
            "{ext}: decompressed bytes differ"
        );

        // A checksum of the decompressed bytes is not the checksum of the source.
        let out2 = dir.join(format!("out2-{ext}"));
        std::fs::create_dir_all(&out2).unwrap();
        let run = import(&url, &out2)
            .arg("--checksum")
            .arg(format!("sha256:{}", sha256_file(&raw)))
            .run();
        run.code(3).reason("ChecksumMismatch");
    }
}

fn make_tree(root: &Path) {
    sh(&format!(
        r#"set -e; cd {root}
        mkdir -p dir/sub empty private
        printf 'hello\n' > dir/a.txt; printf 'exec\n' > dir/run.sh; head -c 300000 /dev/urandom > dir/sub/blob
        chmod 0755 dir/run.sh; chmod 0600 dir/sub/blob; chmod 0750 private; chmod 0700 empty
        ln -s ../dir/a.txt private/rel-link; ln -s /nonexistent/target dangling
        ln dir/a.txt dir/hard-a; printf 'x' > 'name with spaces'
        truncate -s 5M sparse; printf 'end' >> sparse
        touch -h -d '2001-02-03 04:05:06.123456789' dir/a.txt dir/run.sh dir/sub/blob private/rel-link dangling sparse 'name with spaces'
        touch -d '2002-03-04 05:06:07' dir/sub dir private empty"#,
        root = root.display()
    ));
}

#[test]
fn archives_extract_with_modes_symlinks_hardlinks_and_mtimes() {
    require_root();
    let dir = test_dir("archives");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    make_tree(&tree);
    for (ext, compress) in [
        ("tar", "cat"),
        ("tar.gz", "gzip -1"),
        ("tar.zst", "zstd -q"),
    ] {
        let archive = dir.join(format!("tree.{ext}"));
        sh(&format!(
            "tar --format=posix -C {} -cSf - . | {compress} > {}",
            tree.display(),
            archive.display()
        ));
        let url = nginx().serve(&format!("archives/tree.{ext}"), &archive);
        let vol = LoopDevice::with_fs(
            &dir,
            &format!("vol-{}", ext.replace('.', "-")),
            64 * MIB,
            Fs::Ext4,
        );
        let run = import(&url, vol.mount_point())
            .args(["--content", "archive"])
            .run();
        run.success();
        let diff = sh(&format!(
            "rsync -aHX --checksum --dry-run --itemize-changes --exclude=/lost+found {}/ {}/ | grep -v '^\\.d\\.\\.t\\.\\.\\.\\.\\.\\. \\./$' || true",
            tree.display(),
            vol.mount_point().display()
        ));
        assert_eq!(
            diff.trim(),
            "",
            "{ext}: the extracted tree differs from the source (rsync itemized){}",
            run.dump()
        );
        let a = std::fs::metadata(vol.mount_point().join("dir/a.txt")).unwrap();
        assert_eq!(
            a.mtime_nsec(),
            123456789,
            "{ext}: PAX sub-second mtime lost"
        );
        assert_eq!(
            a.ino(),
            std::fs::metadata(vol.mount_point().join("dir/hard-a"))
                .unwrap()
                .ino(),
            "{ext}: hardlink broken"
        );
        assert!(
            disk_usage(&vol.mount_point().join("sparse")) < MIB,
            "{ext}: the sparse file was filled in"
        );
        assert!(!vol.mount_point().join(".populator-staging").exists());
    }
}

#[test]
fn a_gigabyte_that_is_90_percent_zeros_lands_sparse_and_reads_back_on_a_device() {
    require_root();
    let dir = test_dir("sparse-1g");
    let data = shared_dir("fixtures").join("mostly-zero-1g.bin");
    mostly_zero_file(&data, 1024 * MIB, 10, 3);
    let expected = sha256_file(&data);
    let url = nginx().serve("mostly-zero-1g.bin", &data);

    let fs = LoopDevice::with_fs(&dir, "fs", 1200 * MIB, Fs::Ext4);
    let run = import(&url, fs.mount_point()).run();
    run.success();
    let out = fs.mount_point().join("mostly-zero-1g.bin");
    assert_eq!(sha256_file(&out), expected);
    let used = disk_usage(&out);
    assert!(
        used <= 110 * MIB,
        "the file uses {} MiB of disk, more than 110 MiB{}",
        used / MIB,
        run.dump()
    );

    let block = LoopDevice::new(&dir, "blk", 1024 * MIB);
    block.fill_random();
    let run = import(&url, &block.device).run();
    run.success();
    assert_eq!(
        sha256_prefix(&block.device, 1024 * MIB),
        expected,
        "zero regions did not read back as zeros"
    );
}

#[test]
fn connections_dropped_at_10_50_and_90_percent_are_resumed() {
    let size = 64 * MIB;
    let data = random_fixture("random-64m.bin", size, 4);
    let expected = sha256_file(&data);
    nginx().serve("random-64m.bin", &data);
    let proxy = FaultProxy::start(nginx().port);
    // Each resumed request starts where the last one broke.
    proxy.plan([
        Fault::DropAfter(size / 10),
        Fault::DropAfter(size * 4 / 10),
        Fault::DropAfter(size * 4 / 10),
    ]);
    let out = test_dir("resume");
    let run = import(&proxy.url("random-64m.bin"), &out).run();
    run.success();
    assert_eq!(run.result()["resumes"], 3, "{}", run.dump());
    assert_eq!(run.result()["restarts"], 0);
    assert_eq!(run.sha256(), expected);
    assert_eq!(sha256_file(&out.join("random-64m.bin")), expected);
    let requests = proxy.requests.lock().unwrap().join("\n");
    assert!(
        requests.contains(&format!("Range: bytes={}-", size / 10))
            || requests.contains(&format!("range: bytes={}-", size / 10)),
        "{requests}"
    );
    assert!(
        requests.to_ascii_lowercase().contains("if-range:"),
        "{requests}"
    );

    // Parallel ranged connections survive drops too.
    let proxy = FaultProxy::start(nginx().port);
    proxy.plan([
        Fault::Pass,
        Fault::DropAfter(MIB),
        Fault::Pass,
        Fault::DropAfter(3 * MIB),
    ]);
    let out = test_dir("resume-parallel");
    let run = import(&proxy.url("random-64m.bin"), &out)
        .args(["--connections", "4"])
        .run();
    run.success();
    assert_eq!(run.result()["connections"], 4, "{}", run.dump());
    assert!(
        run.result()["resumes"].as_u64().unwrap() >= 1,
        "{}",
        run.dump()
    );
    assert_eq!(run.sha256(), expected, "{}", run.dump());
    assert_eq!(run.result()["bytesWritten"], size);
    assert_eq!(sha256_file(&out.join("random-64m.bin")), expected);
}

#[test]
fn a_file_that_changes_between_attempts_is_imported_again_from_zero() {
    let size = 32 * MIB;
    let first = random_fixture("changing-a.bin", size, 5);
    let second = random_fixture("changing-b.bin", size, 6);
    let served = nginx().serve("changing.bin", &first);
    let _ = served;
    let proxy = FaultProxy::start(nginx().port);
    let www_file = nginx().www.join("changing.bin");
    let replacement = second.clone();
    proxy
        .plan([Fault::DropAfter(size * 3 / 10)])
        .on_drop(move |_| {
            // A new file with another mtime: nginx gives it another ETag.
            let tmp = www_file.with_extension("new");
            std::fs::copy(&replacement, &tmp).unwrap();
            sh(&format!(
                "touch -d '2020-01-01' {} && mv {} {}",
                tmp.display(),
                tmp.display(),
                www_file.display()
            ));
        });
    let out = test_dir("changed");
    let run = import(&proxy.url("changing.bin"), &out).run();
    run.success();
    assert_eq!(run.result()["restarts"], 1, "{}", run.dump());
    assert_eq!(run.sha256(), sha256_file(&second));
    assert_eq!(sha256_file(&out.join("changing.bin")), sha256_file(&second));
}

#[test]
fn tls_needs_the_ca_or_an_explicit_opt_out() {
    let data = random_fixture("random-1m.bin", MIB, 7);
    nginx().serve("random-1m.bin", &data);
    let url = nginx().tls_url("random-1m.bin");
    let out = test_dir("tls");
    import(&url, &out)
        .run()
        .code(5)
        .reason("TlsVerificationFailed")
        .message_contains("--ca-file");
    assert_empty_dir(&out, &import(&url, &out).run());

    let run = import(&url, &out)
        .arg("--ca-file")
        .arg(&nginx().ca.ca_cert)
        .run();
    run.success();
    assert_eq!(sha256_file(&out.join("random-1m.bin")), sha256_file(&data));

    let out = test_dir("tls-insecure");
    let run = import(&url, &out).arg("--insecure-skip-tls-verify").run();
    run.success().stderr_contains("TLS verification is off");
}

/// Parses CDI's scrape: `kubevirt_cdi_import_progress_total\{ownerUID="…"\} (\d{1,3}\.?\d*)`.
fn cdi_progress(body: &str, owner: &str) -> Option<f64> {
    let prefix = format!("kubevirt_cdi_import_progress_total{{ownerUID=\"{owner}\"}} ");
    let rest = body.lines().find_map(|l| l.strip_prefix(&prefix))?;
    let int_len = rest.chars().take_while(char::is_ascii_digit).count();
    assert!(
        (1..=3).contains(&int_len),
        "CDI's regex would not match {rest:?}"
    );
    rest.parse().ok()
}

#[test]
fn metrics_show_rising_progress_under_cdi_s_name_with_the_owner_label() {
    let data = random_fixture("random-48m.bin", 48 * MIB, 8);
    nginx().serve("random-48m.bin", &data);
    let proxy = FaultProxy::start(nginx().port);
    proxy.default_fault(Fault::Throttle(12 * MIB));
    let port = nginx::free_port();
    let out = test_dir("metrics");
    let cmd = import(&proxy.url("random-48m.bin"), &out).args([
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--owner-uid",
        "0f1e2d3c-pvc",
        "--metrics-progress-name",
        "kubevirt_cdi_import_progress_total",
        "--metrics-linger",
        "3",
    ]);
    let child = cmd.spawn();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut body = String::new();
    while Instant::now() < deadline {
        body = populator_tests::run::scrape_metrics(port);
        if let Some(p) = cdi_progress(&body, "0f1e2d3c-pvc") {
            seen.push(p);
            if p >= 100.0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let run = child.wait();
    run.success();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress fell: {seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&100.0),
        "the last scrape (during the linger) is not 100: {seen:?}{}",
        run.dump()
    );
    let middle: Vec<_> = seen.iter().filter(|&&p| p > 0.0 && p < 100.0).collect();
    assert!(middle.len() >= 3, "too few intermediate values: {seen:?}");
    assert!(
        body.contains("populator_bytes_read_total{ownerUID=\"0f1e2d3c-pvc\"}"),
        "{body}"
    );
}

#[test]
fn sigterm_mid_transfer_exits_143_and_the_same_command_then_succeeds() {
    let data = random_fixture("random-48m.bin", 48 * MIB, 8);
    nginx().serve("random-48m.bin", &data);
    let proxy = FaultProxy::start(nginx().port);
    proxy.default_fault(Fault::Throttle(8 * MIB));
    let out = test_dir("sigterm");
    let cmd = import(&proxy.url("random-48m.bin"), &out);
    let child = cmd.spawn();
    std::thread::sleep(Duration::from_millis(1500));
    child.signal(libc::SIGTERM);
    let run = child.wait();
    run.code(143).reason("Terminated");
    assert_empty_dir(&out, &run);

    proxy.default_fault(Fault::Pass);
    let run = cmd.run();
    run.success();
    assert_eq!(sha256_file(&out.join("random-48m.bin")), sha256_file(&data));
}

#[test]
fn credentials_work_and_never_appear_in_output_or_result() {
    let data = random_fixture("random-1m.bin", MIB, 7);
    let expected = sha256_file(&data);
    for sub in ["basic", "bearer", "header"] {
        nginx().serve(&format!("{sub}/random-1m.bin"), &data);
    }
    let dir = test_dir("credentials");
    let user = secret_file(&dir, "user", nginx::USER);
    let pass = secret_file(&dir, "pass", nginx::PASSWORD);
    let token = secret_file(&dir, "token", nginx::TOKEN);
    let headers = secret_file(
        &dir,
        "headers",
        &format!("{}: {}", nginx::SECRET_HEADER, nginx::SECRET_VALUE),
    );
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    let basic = import(&nginx().url("basic/random-1m.bin"), &out)
        .arg("--username-file")
        .arg(&user)
        .arg("--password-file")
        .arg(&pass)
        .args(["--progress", "json"])
        .run();
    basic.success().never_shows(nginx::PASSWORD);
    assert_eq!(basic.sha256(), expected);
    let bearer = import(&nginx().url("bearer/random-1m.bin"), &out)
        .arg("--bearer-token-file")
        .arg(&token)
        .run();
    bearer.success().never_shows(nginx::TOKEN);
    let header = import(&nginx().url("header/random-1m.bin"), &out)
        .arg("--header-file")
        .arg(&headers)
        .run();
    header.success().never_shows(nginx::SECRET_VALUE);

    let wrong = secret_file(&dir, "wrong", "not-the-password-81");
    import(&nginx().url("basic/random-1m.bin"), &out)
        .arg("--username-file")
        .arg(&user)
        .arg("--password-file")
        .arg(&wrong)
        .run()
        .code(5)
        .reason("Unauthorized")
        .never_shows("not-the-password-81");

    // A redirect to another origin gets no credentials (that location answers
    // 400 to any); a redirect within the origin keeps them.
    nginx().serve("random-1m.bin", &data);
    let away = import(&nginx().url("redirect-elsewhere/random-1m.bin"), &out)
        .arg("--bearer-token-file")
        .arg(&token)
        .arg("--header-file")
        .arg(&headers)
        .run();
    away.success().never_shows(nginx::TOKEN);
    assert_eq!(away.sha256(), expected);
    import(&nginx().url("redirect-same/bearer/random-1m.bin"), &out)
        .arg("--bearer-token-file")
        .arg(&token)
        .run()
        .success();

    // Secrets may come as values in the environment too.
    let env = import(&nginx().url("bearer/random-1m.bin"), &out)
        .env("POPULATOR_BEARER_TOKEN", nginx::TOKEN)
        .run();
    env.success().never_shows(nginx::TOKEN);
    let half = import(&nginx().url("basic/random-1m.bin"), &out)
        .arg("--username-file")
        .arg(&user)
        .run();
    half.code(2)
        .message_contains("needs both a username and a password");

    // A missing secret file is a usage error that names it.
    import(&nginx().url("bearer/random-1m.bin"), &out)
        .arg("--bearer-token-file")
        .arg(dir.join("absent"))
        .run()
        .code(2)
        .message_contains("absent");
}

#[test]
fn checksum_mismatch_exits_3_and_leaves_no_file() {
    let data = random_fixture("random-1m.bin", MIB, 7);
    let url = nginx().serve("random-1m.bin", &data);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = test_dir("mismatch");
    let run = import(&url, &out).arg("--checksum").arg(&wrong).run();
    run.code(3)
        .reason("ChecksumMismatch")
        .message_contains("sha256 checksum mismatch");
    assert_empty_dir(&out, &run);
    let image = out.join("disk.img");
    let run = import(&url, &image)
        .args(["--checksum", &format!("md5:{}", "1".repeat(32))])
        .run();
    run.code(3).reason("ChecksumMismatch");
    assert!(
        !image.exists(),
        "the image file the worker created was left behind{}",
        run.dump()
    );
    // A malformed checksum is a usage error.
    import(&url, &out)
        .args(["--checksum", "sha256:abc"])
        .run()
        .code(2)
        .message_contains("64 hex digits");
}

#[test]
fn data_larger_than_the_target_exits_4_before_writing_when_the_size_is_known() {
    require_root();
    let data = random_fixture("random-48m.bin", 48 * MIB, 8);
    let url = nginx().serve("random-48m.bin", &data);
    let dir = test_dir("capacity");

    let small_dev = LoopDevice::new(&dir, "small", 32 * MIB);
    let run = import(&url, &small_dev.device).run();
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("can take only");
    assert_eq!(
        run.result()["bytesWritten"],
        0,
        "found only after writing{}",
        run.dump()
    );

    let small_fs = LoopDevice::with_fs(&dir, "smallfs", 32 * MIB, Fs::Ext4);
    let run = import(&url, small_fs.mount_point()).run();
    run.code(4).reason("InsufficientCapacity");
    assert_eq!(run.result()["bytesWritten"], 0);
    assert_empty_dir(small_fs.mount_point(), &run);

    let out = dir.join("pvc");
    std::fs::create_dir_all(&out).unwrap();
    let run = import(&url, &out).args(["--pvc-size", "10Mi"]).run();
    run.code(4).message_contains("can take only 10.0 MiB");

    // No Content-Length: found while writing, never past the device's end.
    let proxy = FaultProxy::start(nginx().port);
    proxy.default_fault(Fault::HideLength);
    let run = import(&proxy.url("random-48m.bin"), &small_dev.device).run();
    run.code(4).reason("InsufficientCapacity");
    assert!(run.result()["bytesWritten"].as_u64().unwrap() <= 32 * MIB);

    // A decompression bomb: 1 GiB of zeros in a tiny gzip, into a 64 MiB claim.
    let bomb = dir.join("bomb.gz");
    sh(&format!(
        "head -c 1G /dev/zero | gzip -1 > {}",
        bomb.display()
    ));
    let run = import(&nginx().serve("bomb.bin.gz", &bomb), &out)
        .args(["--pvc-size", "64Mi"])
        .run();
    run.code(4).reason("InsufficientCapacity");
    assert_empty_dir(&out, &run);
}

#[test]
fn http_errors_map_to_the_contract_s_exit_codes() {
    let out = test_dir("http-errors");
    import(&nginx().url("does-not-exist.bin"), &out)
        .run()
        .code(2)
        .reason("NotFound")
        .message_contains("404");
    import(&nginx().url("status/410"), &out)
        .run()
        .code(2)
        .reason("NotFound");
    nginx().serve(
        "basic/random-1m.bin",
        &random_fixture("random-1m.bin", MIB, 7),
    );
    import(&nginx().url("basic/random-1m.bin"), &out)
        .run()
        .code(5)
        .reason("Unauthorized");
    nginx().serve(
        "header/random-1m.bin",
        &random_fixture("random-1m.bin", MIB, 7),
    );
    import(&nginx().url("header/random-1m.bin"), &out)
        .run()
        .code(5)
        .reason("Forbidden");
    let started = Instant::now();
    let run = import(&nginx().url("status/503"), &out)
        .args(["--retries", "2"])
        .run();
    run.code(75)
        .reason("ServerError")
        .message_contains("after 2 retries")
        .stderr_contains("retrying in");
    assert!(started.elapsed() < Duration::from_secs(20));
    let closed = nginx::free_port();
    import(&format!("http://127.0.0.1:{closed}/x.bin"), &out)
        .args(["--retries", "1"])
        .run()
        .code(75)
        .reason("Unreachable");
    import("ftp://127.0.0.1/x", &out).run().code(2);
    worker("http-import")
        .args(["--url", "http://x/", "--bogus-flag"])
        .run()
        .code(2)
        .reason("InvalidArguments")
        .message_contains("--bogus-flag");
    assert_empty_dir(&out, &import(&nginx().url("status/410"), &out).run());
}

#[test]
fn truncated_compressed_sources_exit_3() {
    let raw = random_fixture("payload-12m.bin", 12 * MIB, 2);
    let dir = test_dir("truncated");
    for (ext, tool) in [
        ("gz", "gzip -1"),
        ("xz", "xz -0 -T1"),
        ("zst", "zstd -q -1"),
        ("bz2", "bzip2 -1"),
    ] {
        let packed = dir.join(format!("cut.bin.{ext}"));
        sh(&format!(
            "{tool} -c {} | head -c 6000000 > {}",
            raw.display(),
            packed.display()
        ));
        let out = dir.join(format!("out-{ext}"));
        std::fs::create_dir_all(&out).unwrap();
        let run = import(
            &nginx().serve(&format!("truncated/cut.bin.{ext}"), &packed),
            &out,
        )
        .run();
        run.code(3)
            .reason("CorruptData")
            .message_contains("corrupt or truncated");
        assert_empty_dir(&out, &run);
    }
}

#[test]
fn hostile_archives_are_refused_and_nothing_lands_outside_the_target() {
    require_root();
    let dir = test_dir("hostile");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let tars = dir.join("tars");
    std::fs::create_dir_all(&tars).unwrap();
    sh(&format!(
        "python3 {}/fixtures/hostile_tars.py {} {}",
        env!("CARGO_MANIFEST_DIR"),
        tars.display(),
        outside.display()
    ));
    let passwd_before = std::fs::metadata("/etc/passwd").unwrap();

    for (name, message) in [
        ("dotdot", "climbs out of the target"),
        ("dotdot-deep", "climbs out of the target"),
        ("absolute", "absolute path"),
        ("symlink-then-file", "through the symlink"),
        ("symlink-absolute-then-file", "through the symlink"),
        ("symlink-dotdot-chain", "through the symlink"),
        ("hardlink-outside", "points outside the target"),
        ("hardlink-absolute", "points outside the target"),
        ("hardlink-through-symlink", "through a symlink"),
    ] {
        let target = dir.join(format!("t-{name}"));
        std::fs::create_dir_all(&target).unwrap();
        let url = nginx().serve(
            &format!("hostile/{name}.tar"),
            &tars.join(format!("{name}.tar")),
        );
        let run = import(&url, &target).args(["--content", "archive"]).run();
        run.code(3)
            .reason("UnsafeArchive")
            .message_contains(message);
        assert_empty_dir(&target, &run);
        let escaped: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
        assert!(
            escaped.is_empty(),
            "{name}: something was written outside the target{}",
            run.dump()
        );
        assert!(
            !dir.join("escaped.txt").exists() && !scratch().join("escaped.txt").exists(),
            "{name}: escaped via .."
        );
    }
    let passwd_after = std::fs::metadata("/etc/passwd").unwrap();
    assert_eq!(
        (passwd_before.nlink(), passwd_before.mtime()),
        (passwd_after.nlink(), passwd_after.mtime())
    );

    // Device nodes and fifos: skipped by default, made as root when asked.
    let url = nginx().serve("hostile/devices.tar", &tars.join("devices.tar"));
    let target = dir.join("t-devices");
    std::fs::create_dir_all(&target).unwrap();
    let run = import(&url, &target).args(["--content", "archive"]).run();
    run.success().stderr_contains("skipping device nodes");
    assert_eq!(run.result()["skippedEntries"], 2);
    assert!(
        target.join("keep.txt").exists()
            && !target.join("null2").exists()
            && !target.join("fifo").exists()
    );
    let target = dir.join("t-devices-kept");
    std::fs::create_dir_all(&target).unwrap();
    import(&url, &target)
        .args(["--content", "archive", "--preserve-devices"])
        .run()
        .success();
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(target.join("null2"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(target.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    // setuid/setgid bits: dropped unless asked for.
    let url = nginx().serve("hostile/setuid.tar", &tars.join("setuid.tar"));
    let target = dir.join("t-setuid");
    std::fs::create_dir_all(&target).unwrap();
    import(&url, &target)
        .args(["--content", "archive"])
        .run()
        .success();
    assert_eq!(
        std::fs::metadata(target.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(target.join("sgid")).unwrap().mode() & 0o7777,
        0o755
    );
    let target = dir.join("t-setuid-kept");
    std::fs::create_dir_all(&target).unwrap();
    import(&url, &target)
        .args(["--content", "archive", "--preserve-setuid"])
        .run()
        .success();
    assert_eq!(
        std::fs::metadata(target.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );

    // More entries than the volume has inodes: a capacity error, found early.
    let small = LoopDevice::new(&dir, "few-inodes", 16 * MIB);
    let mnt = dir.join("few-inodes.mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mkfs.ext4 -q -F -N 256 {} && mount {} {}",
        small.device.display(),
        small.device.display(),
        mnt.display()
    ));
    let url = nginx().serve("hostile/many-entries.tar", &tars.join("many-entries.tar"));
    let run = import(&url, &mnt).args(["--content", "archive"]).run();
    sh(&format!("umount {}", mnt.display()));
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("inodes");

    // A bomb: a tar.gz holding far more than the claim.
    let bomb = dir.join("bomb.tar.gz");
    sh(&format!(
        "cd {} && head -c 300M /dev/zero > big && tar -cf - big | gzip -1 > {} && rm big",
        dir.display(),
        bomb.display()
    ));
    let target = dir.join("t-bomb");
    std::fs::create_dir_all(&target).unwrap();
    let run = import(&nginx().serve("hostile/bomb.tar.gz", &bomb), &target)
        .args(["--content", "archive", "--pvc-size", "64Mi"])
        .run();
    run.code(4).reason("InsufficientCapacity");
    assert_empty_dir(&target, &run);
}

#[test]
fn owner_flag_sets_the_owner_of_created_files_and_extracted_entries() {
    require_root();
    let data = random_fixture("random-1m.bin", MIB, 7);
    let url = nginx().serve("random-1m.bin", &data);
    let out = test_dir("owner-file");
    import(&url, &out)
        .args(["--owner", "107:108"])
        .run()
        .success();
    let m = std::fs::metadata(out.join("random-1m.bin")).unwrap();
    assert_eq!((m.uid(), m.gid()), (107, 108));

    let dir = test_dir("owner-archive");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    make_tree(&tree);
    let archive = dir.join("tree.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        tree.display(),
        archive.display()
    ));
    let target = dir.join("t");
    std::fs::create_dir_all(&target).unwrap();
    import(&nginx().serve("owner/tree.tar", &archive), &target)
        .args(["--content", "archive", "--owner", "107:108"])
        .run()
        .success();
    for rel in ["dir", "dir/a.txt", "private/rel-link", "dangling", "empty"] {
        let m = std::fs::symlink_metadata(target.join(rel)).unwrap();
        assert_eq!((m.uid(), m.gid()), (107, 108), "{rel} has the wrong owner");
    }
    import(&url, &out)
        .args(["--owner", "root"])
        .run()
        .code(2)
        .message_contains("UID:GID");
}
