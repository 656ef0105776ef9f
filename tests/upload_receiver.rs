//! End-to-end tests of upload-receiver (issue 6): real curl and the real
//! tus client (tuspy) over TLS, loop devices with ext4, kills and restarts,
//! as root.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use populator_tests::fixtures::{random_fixture, sha256_file, sha256_prefix};
use populator_tests::loopdev::{Fs, LoopDevice};
use populator_tests::nginx::free_port;
use populator_tests::podman;
use populator_tests::run::{assert_empty_dir, worker, Spawned, WorkerCmd};
use populator_tests::{require_root, scratch, sh, test_dir};

const MIB: u64 = 1 << 20;
const TOKEN: &str = "upl-7c1e-secret-token";

fn token_file() -> PathBuf {
    let path = scratch().join("upload-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path
}

/// A receiver command on a free port with the test token.
fn receiver(target: &Path) -> (WorkerCmd, u16) {
    let port = free_port();
    let cmd = worker("upload-receiver")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--token-file")
        .arg(token_file())
        .arg("--target")
        .arg(target)
        .args(["--progress", "log", "--linger", "2"]);
    (cmd, port)
}

/// Starts the receiver and waits until it accepts connections.
fn start(cmd: &WorkerCmd, port: u16) -> Spawned<'_> {
    let mut child = cmd.spawn();
    wait_listening(&mut child, port);
    child
}

fn wait_listening(child: &mut Spawned<'_>, port: u16) {
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.child.try_wait() {
            panic!("the receiver exited early with {status}");
        }
        assert!(
            Instant::now() < until,
            "the receiver did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn url(port: u16, path: &str) -> String {
    format!("https://127.0.0.1:{port}{path}")
}

/// curl's answer: status code (0 when no HTTP answer) and body.
struct Answer {
    status: u32,
    body: String,
    curl_exit: i32,
}

fn curl(args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-sk", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        curl_exit: out.status.code().unwrap_or(-1),
    }
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// A raw-body CDI upload without `Expect: 100-continue`: the body is on its
/// way before the receiver can answer, as with clients that never wait.
fn post_without_expect(auth: &str, file: &str, port: u16) -> Answer {
    curl(&[
        "-H",
        "Expect:",
        "-H",
        auth,
        "-X",
        "POST",
        "-T",
        file,
        &url(port, "/v1beta1/upload"),
    ])
}

fn upload_args<'a>(auth: &'a str, file: &'a str, to: &'a str) -> Vec<&'a str> {
    vec!["-H", auth, "-X", "POST", "-T", file, to]
}

#[test]
fn curl_sync_async_and_form_uploads_of_256m_to_a_block_device_and_a_directory() {
    require_root();
    let data = random_fixture("random-256m.bin", 256 * MIB, 1);
    let expected = sha256_file(&data);
    let file = data.to_str().unwrap();
    let dir = test_dir("curl-256m");
    let block = LoopDevice::new(&dir, "blk", 264 * MIB);
    let fs = LoopDevice::with_fs(&dir, "fs", 400 * MIB, Fs::Ext4);
    let auth = bearer();
    for (endpoint, form) in [
        ("/v1beta1/upload", false),
        ("/v1beta1/upload-async", false),
        ("/v1alpha1/upload-form", true),
        ("/v1beta1/upload-form-async", true),
    ] {
        for target in [&block.device, &fs.mount_point().to_path_buf()] {
            block.fill_random();
            let (cmd, port) = receiver(target);
            let child = start(&cmd, port);
            let to = url(port, endpoint);
            let answer = if form {
                curl(&["-H", &auth, "-F", &format!("file=@{file}"), &to])
            } else {
                curl(&upload_args(&auth, file, &to))
            };
            let run = child.wait();
            assert_eq!(
                answer.status,
                200,
                "{endpoint}: {}{}",
                answer.body,
                run.dump()
            );
            run.success();
            assert_eq!(run.sha256(), expected, "{endpoint}{}", run.dump());
            assert_eq!(run.result()["bytesRead"], 256 * MIB);
            if target == &block.device {
                assert_eq!(run.result()["target"]["kind"], "block");
                assert_eq!(
                    sha256_prefix(&block.device, 256 * MIB),
                    expected,
                    "{endpoint}"
                );
            } else {
                let written = fs.mount_point().join("disk.img");
                assert_eq!(sha256_file(&written), expected, "{endpoint}");
                std::fs::remove_file(written).unwrap();
                assert!(!fs
                    .mount_point()
                    .join(".disk.img.populator-partial")
                    .exists());
            }
            // The progress went through the core's log lines.
            run.stderr_contains("of 256.0 MiB");
        }
    }
}

const TUS_CLIENT: &str = r#"
import sys, warnings
warnings.filterwarnings("ignore")
from tusclient import client
endpoint, token, path, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
resume = sys.argv[5] if len(sys.argv) > 5 else None
c = client.TusClient(endpoint, headers={"Authorization": "Bearer " + token})
up = c.uploader(path, url=resume, chunk_size=chunk, upload_checksum=True,
                verify_tls_cert=False, retries=60, retry_delay=0.5,
                metadata={"filename": "uploaded.img"})
if resume is None:
    up.set_url(up.create_url())
print("URL", up.url, flush=True)
up.upload()
print("DONE", up.offset, flush=True)
"#;

fn tus_script() -> PathBuf {
    let path = scratch().join("tus_client.py");
    std::fs::write(&path, TUS_CLIENT).unwrap();
    path
}

/// Starts the tus client; returns it and the upload URL it printed.
fn tus_client(port: u16, data: &Path, resume: Option<&str>) -> (std::process::Child, String) {
    let mut cmd = Command::new("python3");
    cmd.arg(tus_script())
        .arg(url(port, "/files/"))
        .arg(TOKEN)
        .arg(data)
        .arg((8 * MIB).to_string());
    if let Some(r) = resume {
        cmd.arg(r);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running python3 (tuspy: pip install tuspy)");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let upload = line
        .strip_prefix("URL ")
        .unwrap_or_else(|| panic!("the tus client printed {line:?}"))
        .trim()
        .to_string();
    (child, upload)
}

/// The offset a tus HEAD reports (None when the receiver does not answer).
fn tus_offset(upload: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-I",
            "-H",
            "Tus-Resumable: 1.0.0",
            "-H",
            &bearer(),
            upload,
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("upload-offset")
            .then(|| v.trim().parse().ok())?
    })
}

fn wait_for_offset(upload: &str, at_least: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(o) = tus_offset(upload).filter(|&o| o >= at_least) {
            return o;
        }
        assert!(
            Instant::now() < until,
            "the upload never reached {at_least} bytes"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn wait_client(mut child: std::process::Child) {
    let status = child.wait().unwrap();
    assert!(status.success(), "the tus client failed: {status}");
}

#[test]
fn tus_client_killed_halfway_resumes_into_a_directory() {
    require_root();
    let data = random_fixture("random-256m.bin", 256 * MIB, 1);
    let expected = sha256_file(&data);
    let dir = test_dir("tus-client-kill");
    let fs = LoopDevice::with_fs(&dir, "fs", 400 * MIB, Fs::Ext4);
    let (cmd, port) = receiver(fs.mount_point());
    let receiver = start(&cmd, port);
    let (client, upload) = tus_client(port, &data, None);
    let mut client = client;
    let reached = wait_for_offset(&upload, 128 * MIB);
    client.kill().unwrap();
    client.wait().unwrap();
    // The receiver keeps what arrived.
    std::thread::sleep(Duration::from_millis(300));
    let kept = tus_offset(&upload).expect("the receiver answers HEAD");
    assert!(
        kept >= reached && kept < 256 * MIB,
        "offset {kept} after the kill"
    );
    let (client, again) = tus_client(port, &data, Some(&upload));
    assert_eq!(again, upload);
    wait_client(client);
    let run = receiver.wait();
    run.success();
    assert_eq!(run.sha256(), expected);
    assert_eq!(
        sha256_file(&fs.mount_point().join("uploaded.img")),
        expected
    );
    assert!(!fs.mount_point().join(".populator-upload-state").exists());
    assert!(!fs
        .mount_point()
        .join(".uploaded.img.populator-partial")
        .exists());
}

#[test]
fn tus_receiver_killed_halfway_and_restarted_resumes_on_a_block_device() {
    require_root();
    let data = random_fixture("random-256m.bin", 256 * MIB, 1);
    let expected = sha256_file(&data);
    let dir = test_dir("tus-receiver-kill");
    let block = LoopDevice::new(&dir, "blk", 272 * MIB);
    block.fill_random();
    let (cmd, port) = receiver(&block.device);
    let first = start(&cmd, port);
    let (client, upload) = tus_client(port, &data, None);
    wait_for_offset(&upload, 128 * MIB);
    first.signal(libc::SIGKILL);
    let killed = first.wait();
    assert_eq!(killed.code, 137, "{}", killed.dump());
    // Same arguments: the state at the end of the device names the upload.
    let mut second = cmd.spawn();
    wait_listening(&mut second, port);
    wait_client(client);
    let run = second.wait();
    run.success();
    run.stderr_contains("resuming tus upload");
    assert_eq!(run.sha256(), expected);
    assert_eq!(sha256_prefix(&block.device, 256 * MIB), expected);
    // The state record at the end of the device is gone.
    let tail = sh(&format!(
        "tail -c 4096 {} | tr -d '\\0' | wc -c",
        block.device.display()
    ));
    assert_eq!(tail.trim(), "0", "the state record was left on the device");
}

#[test]
fn tus_receiver_restart_resumes_into_a_directory() {
    require_root();
    let data = random_fixture("random-64m.bin", 64 * MIB, 3);
    let expected = sha256_file(&data);
    let out = test_dir("tus-restart-dir");
    let (cmd, port) = receiver(&out);
    let first = start(&cmd, port);
    let (client, upload) = tus_client(port, &data, None);
    wait_for_offset(&upload, 32 * MIB);
    first.signal(libc::SIGKILL);
    first.wait();
    assert!(out.join(".populator-upload-state").exists());
    let mut second = cmd.spawn();
    wait_listening(&mut second, port);
    wait_client(client);
    let run = second.wait();
    run.success();
    assert_eq!(sha256_file(&out.join("uploaded.img")), expected);
    assert!(!out.join(".populator-upload-state").exists());
}

fn base64(bytes: &[u8]) -> String {
    sh(&format!(
        "python3 -c 'import base64, sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())' {}",
        hex::encode(bytes)
    ))
    .trim()
    .to_string()
}

#[test]
fn content_digest_and_upload_checksum_are_checked() {
    require_root();
    let data = random_fixture("random-8m.bin", 8 * MIB, 4);
    let file = data.to_str().unwrap();
    let sum = sha256_file(&data);
    let right = format!(
        "Content-Digest: sha-256=:{}:",
        base64(&hex::decode(&sum).unwrap())
    );
    let wrong = format!("Content-Digest: sha-256=:{}:", base64(&[7u8; 32]));
    let auth = bearer();

    let out = test_dir("digest-right");
    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    let to = url(port, "/v1beta1/upload");
    let mut args = upload_args(&auth, file, &to);
    args.extend(["-H", &right]);
    let answer = curl(&args);
    let run = child.wait();
    assert_eq!(answer.status, 200, "{}{}", answer.body, run.dump());
    run.success();
    assert_eq!(sha256_file(&out.join("disk.img")), sum);

    let out = test_dir("digest-wrong");
    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    let to = url(port, "/v1beta1/upload");
    let mut args = upload_args(&auth, file, &to);
    args.extend(["-H", &wrong]);
    let answer = curl(&args);
    let run = child.wait();
    assert_eq!(answer.status, 400, "{}{}", answer.body, run.dump());
    assert!(answer.body.contains("ChecksumMismatch"), "{}", answer.body);
    run.code(3)
        .reason("ChecksumMismatch")
        .message_contains("sha256 checksum mismatch");
    assert_empty_dir(&out, &run);

    // tus: one PATCH with a right, then a wrong Upload-Checksum.
    for (ok, digest) in [(true, sum.clone()), (false, "00".repeat(32))] {
        let out = test_dir(if ok { "tus-sum-right" } else { "tus-sum-wrong" });
        let (cmd, port) = receiver(&out);
        let child = start(&cmd, port);
        let created = Command::new("curl")
            .args([
                "-sk",
                "-i",
                "-X",
                "POST",
                "-H",
                "Tus-Resumable: 1.0.0",
                "-H",
                &auth,
            ])
            .args(["-H", &format!("Upload-Length: {}", 8 * MIB)])
            .arg(url(port, "/files"))
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&created.stdout).into_owned();
        assert!(head.starts_with("HTTP/1.1 201"), "{head}");
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("location: "))
            .unwrap_or_else(|| panic!("no Location in {head}"))
            .trim()
            .to_string();
        let checksum = format!(
            "Upload-Checksum: sha256 {}",
            base64(&hex::decode(&digest).unwrap())
        );
        let to = url(port, &location);
        let answer = curl(&[
            "-X",
            "PATCH",
            "-H",
            "Tus-Resumable: 1.0.0",
            "-H",
            "Content-Type: application/offset+octet-stream",
            "-H",
            "Upload-Offset: 0",
            "-H",
            &auth,
            "-H",
            &checksum,
            "--data-binary",
            &format!("@{file}"),
            &to,
        ]);
        let run = child.wait();
        if ok {
            assert_eq!(answer.status, 204, "{}{}", answer.body, run.dump());
            run.success();
            assert_eq!(sha256_file(&out.join("disk.img")), sum);
        } else {
            assert_eq!(answer.status, 460, "{}{}", answer.body, run.dump());
            run.code(3).reason("ChecksumMismatch");
            assert_empty_dir(&out, &run);
        }
    }
}

#[test]
fn wrong_token_is_401_nothing_is_written_and_the_token_never_shows() {
    let data = random_fixture("random-8m.bin", 8 * MIB, 4);
    let file = data.to_str().unwrap();
    let out = test_dir("token");
    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    let to = url(port, "/v1beta1/upload");
    for auth in ["Authorization: Bearer not-the-token", "X-Nothing: 1"] {
        let answer = curl(&upload_args(auth, file, &to));
        assert_eq!(answer.status, 401, "{auth}: {}", answer.body);
    }
    let tus = curl(&[
        "-X",
        "POST",
        "-H",
        "Tus-Resumable: 1.0.0",
        "-H",
        "Upload-Length: 5",
        &url(port, "/files"),
    ]);
    assert_eq!(tus.status, 401);
    assert_eq!(curl(&[&url(port, "/healthz")]).status, 200);
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "written before authentication"
    );
    let auth = bearer();
    let answer = curl(&upload_args(&auth, file, &to));
    let run = child.wait();
    assert_eq!(answer.status, 200, "{}", run.dump());
    run.success().never_shows(TOKEN);
    assert_eq!(sha256_file(&out.join("disk.img")), sha256_file(&data));
}

/// A CA and client certificates signed by it, with the given common names.
fn client_pki(dir: &Path, names: &[&str]) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "client CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("client-ca.pem"), ca.pem()).unwrap();
    for name in names {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, *name);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    dir.join("client-ca.pem")
}

#[test]
fn mutual_tls_checks_the_client_name() {
    let dir = test_dir("mtls");
    let ca = client_pki(&dir, &["cdi-uploadproxy", "intruder"]);
    let server = populator_tests::tls::make_ca(&dir.join("server"));
    let data = random_fixture("random-8m.bin", 8 * MIB, 4);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let port = free_port();
    let cmd = worker("upload-receiver")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--client-ca-file")
        .arg(&ca)
        .args(["--client-name", "cdi-uploadproxy", "--linger", "0"])
        .arg("--tls-cert-file")
        .arg(&server.server_cert)
        .arg("--tls-key-file")
        .arg(&server.server_key)
        .arg("--target")
        .arg(&out);
    let child = start(&cmd, port);
    let to = url(port, "/v1beta1/upload");
    let with_cert = |name: &str| {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&server.ca_cert)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-X", "POST", "-T"])
            .arg(&data)
            .arg(&to)
            .output()
            .unwrap()
    };
    let wrong = with_cert("intruder");
    assert_eq!(String::from_utf8_lossy(&wrong.stdout), "401");
    // Without a certificate the handshake itself fails.
    let none = curl(&["-X", "POST", "-T", data.to_str().unwrap(), &to]);
    assert_ne!(
        none.curl_exit, 0,
        "curl succeeded without a client certificate"
    );
    assert_eq!(
        none.status, 0,
        "answered without a client certificate: {}",
        none.body
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    let right = with_cert("cdi-uploadproxy");
    let run = child.wait();
    assert_eq!(
        String::from_utf8_lossy(&right.stdout),
        "200",
        "{}",
        run.dump()
    );
    run.success();
    assert_eq!(sha256_file(&out.join("disk.img")), sha256_file(&data));
}

#[test]
fn a_second_upload_meanwhile_is_503_and_one_after_completion_is_409() {
    let data = random_fixture("random-8m.bin", 8 * MIB, 4);
    let file = data.to_str().unwrap().to_string();
    let out = test_dir("busy");
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--linger", "5"]);
    let child = start(&cmd, port);
    let to = url(port, "/v1beta1/upload");
    let auth = bearer();
    // 8 MiB at 2 MiB/s: four seconds of a running upload.
    let slow = {
        let (auth, file, to) = (auth.clone(), file.clone(), to.clone());
        std::thread::spawn(move || {
            let mut args = upload_args(&auth, &file, &to);
            args.extend(["--limit-rate", "2M"]);
            curl(&args)
        })
    };
    wait_until(|| child_progress(&out));
    let second = curl(&upload_args(&auth, &file, &to));
    assert_eq!(second.status, 503, "{}", second.body);
    let tus = curl(&[
        "-X",
        "POST",
        "-H",
        "Tus-Resumable: 1.0.0",
        "-H",
        &auth,
        "-H",
        "Upload-Length: 5",
        &url(port, "/files"),
    ]);
    assert_eq!(tus.status, 503, "{}", tus.body);
    let first = slow.join().unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    let late = curl(&upload_args(&auth, &file, &to));
    assert_eq!(late.status, 409, "{}", late.body);
    let run = child.wait();
    run.success();
    assert_eq!(sha256_file(&out.join("disk.img")), sha256_file(&data));
}

/// The partial file of a running upload exists.
fn child_progress(out: &Path) -> bool {
    out.join(".disk.img.populator-partial").exists()
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_declared_size_over_capacity_is_413_and_exit_4() {
    require_root();
    let data = random_fixture("random-64m.bin", 64 * MIB, 3);
    let dir = test_dir("capacity");
    let block = LoopDevice::new(&dir, "blk", 32 * MIB);
    let (cmd, port) = receiver(&block.device);
    let child = start(&cmd, port);
    let answer = curl(&upload_args(
        &bearer(),
        data.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let run = child.wait();
    assert_eq!(answer.status, 413, "{}{}", answer.body, run.dump());
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("can take only 32.0 MiB");

    // tus: the Upload-Length decides.
    let (cmd, port) = receiver(&block.device);
    let child = start(&cmd, port);
    let answer = curl(&[
        "-X",
        "POST",
        "-H",
        "Tus-Resumable: 1.0.0",
        "-H",
        &bearer(),
        "-H",
        &format!("Upload-Length: {}", 64 * MIB),
        &url(port, "/files"),
    ]);
    let run = child.wait();
    assert_eq!(answer.status, 413, "{}{}", answer.body, run.dump());
    run.code(4).reason("InsufficientCapacity");

    // Forms: a_form_larger_than_the_volume_is_413_up_front_and_one_without_length_is_507.
}

const STALLING_CLIENT: &str = r#"
import socket, ssl, sys, time
port, request = int(sys.argv[1]), sys.argv[2].encode().decode("unicode_escape").encode()
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
s.settimeout(60)
s.sendall(request)
got = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
except (ConnectionError, ssl.SSLError):
    pass
sys.stdout.write(got.decode("latin-1"))
"#;

/// Sends `request` over TLS and then nothing; returns how long until the
/// receiver closed the connection, and what it answered.
fn stall_with(port: u16, request: &str) -> (Duration, String) {
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["60", "python3", "-c", STALLING_CLIENT])
        .arg(port.to_string())
        .arg(request)
        .output()
        .unwrap();
    (
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn stalled_clients_are_disconnected_after_the_timeouts() {
    let data = random_fixture("random-8m.bin", 8 * MIB, 4);
    let out = test_dir("stall");
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--idle-timeout", "2", "--header-read-timeout", "2"]);
    let child = start(&cmd, port);
    // A body that stops after 5 bytes of 1000.
    let (took, answer) = stall_with(
        port,
        &format!("POST /v1beta1/upload HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer {TOKEN}\\r\\nContent-Length: 1000\\r\\n\\r\\nhello"),
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    assert!(answer.contains("408"), "answered {answer:?}");
    // Headers that never end.
    let (took, _) = stall_with(port, "POST /v1beta1/upload HTTP/1.1\\r\\nHost: x\\r\\n");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    // The receiver still takes a good upload.
    let answer = curl(&upload_args(
        &bearer(),
        data.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let run = child.wait();
    assert_eq!(answer.status, 200, "{}", run.dump());
    run.success().stderr_contains("sent nothing for 2 s");
}

fn rfc3339_in(seconds: u64) -> String {
    sh(&format!(
        "date -u -d '+{seconds} seconds' +%Y-%m-%dT%H:%M:%SZ"
    ))
    .trim()
    .to_string()
}

#[test]
fn the_deadline_ends_a_running_upload_and_sigterm_exits_143() {
    let data = random_fixture("random-64m.bin", 64 * MIB, 3);
    let out = test_dir("deadline");
    let (cmd, port) = receiver(&out);
    let cmd = cmd.arg("--deadline").arg(rfc3339_in(3));
    let child = start(&cmd, port);
    let started = Instant::now();
    let mut args = upload_args_owned(port, &data);
    args.extend(["--limit-rate".into(), "4M".into()]);
    let answer = curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let run = child.wait();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the deadline did not stop the upload"
    );
    // Answered while curl still sends: curl may see the reset first.
    assert!(
        answer.status == 503 || (matches!(answer.status, 0 | 100) && answer.curl_exit != 0),
        "status {}: {}",
        answer.status,
        answer.body
    );
    run.code(75)
        .reason("DeadlinePassed")
        .message_contains("--deadline");
    assert_empty_dir(&out, &run);

    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    child.signal(libc::SIGTERM);
    let run = child.wait();
    run.code(143).reason("Terminated");
}

fn upload_args_owned(port: u16, data: &Path) -> Vec<String> {
    vec![
        "-H".into(),
        bearer(),
        "-X".into(),
        "POST".into(),
        "-T".into(),
        data.to_str().unwrap().into(),
        url(port, "/v1beta1/upload"),
    ]
}

#[test]
fn no_authentication_is_a_usage_error() {
    let out = test_dir("no-auth");
    let run = worker("upload-receiver")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--target")
        .arg(&out)
        .run();
    run.code(2)
        .reason("InvalidConfiguration")
        .message_contains("--token-file");
}

#[test]
fn compressed_archives_are_extracted() {
    let dir = test_dir("archive");
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "hello\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), vec![7u8; 100_000]).unwrap();
    let archive = dir.join("tree.tar.gz");
    sh(&format!(
        "tar -C {} -czf {} .",
        tree.display(),
        archive.display()
    ));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--content", "archive"]);
    let child = start(&cmd, port);
    let answer = curl(&upload_args(
        &bearer(),
        archive.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let run = child.wait();
    assert_eq!(answer.status, 200, "{}", run.dump());
    run.success();
    assert_eq!(run.result()["compression"], "gzip");
    assert_eq!(
        std::fs::read_to_string(out.join("a.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read(out.join("sub/b.bin")).unwrap(),
        vec![7u8; 100_000]
    );
}

#[test]
fn the_image_receives_an_upload_onto_a_block_device_under_podman() {
    require_root();
    let image = podman::require_image("upload-receiver");
    let data = random_fixture("random-24m.bin", 24 * MIB, 11);
    let dir = test_dir("image");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // uid 107 in the container reads the token and writes the result here.
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(out.join("token"), TOKEN).unwrap();
    let dev = LoopDevice::new(&dir, "blk", 32 * MIB);
    dev.fill_random();
    let device = dev.device.to_str().unwrap().to_string();
    sh(&format!("chown 107:107 {device}"));
    let port = free_port();
    let mut container = podman::podman_run()
        .args(["--network", "host", "--read-only"])
        .arg("--device")
        .arg(format!("{device}:/dev/block:rw"))
        .arg("-v")
        .arg(format!("{}:/out", out.display()))
        .args(["-e", "POPULATOR_TOKEN_FILE=/out/token"])
        .arg(&image)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--linger", "0", "--termination-log", "/out/result.json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("running podman");
    let until = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = container.try_wait() {
            panic!("the container exited early with {status}");
        }
        assert!(
            Instant::now() < until,
            "the container did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = curl(&upload_args(
        &bearer(),
        data.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let output = container.wait_with_output().unwrap();
    sh(&format!("chown 0:0 {device}"));
    let result = std::fs::read_to_string(out.join("result.json")).unwrap_or_default();
    let dump = format!(
        "\nstatus: {}\nstderr:\n{}\nresult:\n{result}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(answer.status, 200, "{}{dump}", answer.body);
    assert!(output.status.success(), "the container failed{dump}");
    let v: serde_json::Value = serde_json::from_str(&result).expect("a JSON result");
    assert_eq!(v["status"], "Succeeded", "{dump}");
    assert_eq!(v["target"]["path"], "/dev/block", "{dump}");
    assert_eq!(
        sha256_prefix(Path::new(&device), 24 * MIB),
        sha256_file(&data)
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains(TOKEN));
}

#[test]
fn a_compressed_tus_upload_is_decompressed_through_the_pipeline() {
    let raw = random_fixture("random-8m.bin", 8 * MIB, 4);
    let dir = test_dir("tus-gzip");
    let packed = dir.join("payload.img.gz");
    sh(&format!(
        "gzip -1 -c {} > {}",
        raw.display(),
        packed.display()
    ));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    let (client, _) = tus_client(port, &packed, None);
    wait_client(client);
    let run = child.wait();
    run.success();
    assert_eq!(run.result()["compression"], "gzip", "{}", run.dump());
    assert_eq!(run.sha256(), sha256_file(&packed));
    assert_eq!(sha256_file(&out.join("uploaded.img")), sha256_file(&raw));
    assert!(!out.join(".populator-upload-state").exists());
}

#[test]
fn connections_are_bounded() {
    let out = test_dir("bounded");
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--max-connections", "1", "--header-read-timeout", "3"]);
    let child = start(&cmd, port);
    // The probe of start() has left; now one client holds the only slot,
    // saying nothing (not even a TLS hello), until the header-read timeout.
    std::thread::sleep(Duration::from_millis(300));
    let holder = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let health = curl(&["--max-time", "20", &url(port, "/healthz")]);
    let waited = started.elapsed();
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(
        waited >= Duration::from_millis(1500),
        "a second connection was served at once ({waited:?}) with --max-connections 1"
    );
    drop(holder);
    child.signal(libc::SIGTERM);
    child.wait().code(143);
}

/// A small qcow2 made by qemu-img (32 MiB virtual: random data at 4 MiB and
/// at 20 MiB, zeros elsewhere, zlib-compressed clusters) and its
/// `qemu-img convert -O raw`.
fn small_qcow2(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("disk.raw");
    let random = random_fixture("random-8m.bin", 8 * MIB, 21);
    sh(&format!(
        "truncate -s 32M {raw} && dd if={r} of={raw} bs=1M seek=4 conv=notrunc status=none \
         && dd if={r} of={raw} bs=1M count=3 seek=20 conv=notrunc status=none \
         && qemu-img convert -f raw -O qcow2 -c {raw} {dir}/disk.qcow2 \
         && qemu-img convert -f qcow2 -O raw {dir}/disk.qcow2 {dir}/reference.raw",
        raw = raw.display(),
        r = random.display(),
        dir = dir.display()
    ));
    (dir.join("disk.qcow2"), dir.join("reference.raw"))
}

#[test]
fn content_disk_converts_an_uploaded_qcow2_like_qemu_img() {
    require_root();
    let dir = test_dir("disk-content");
    let (qcow2, reference) = small_qcow2(&dir);
    let want = sha256_file(&reference);
    assert_ne!(
        sha256_file(&qcow2),
        want,
        "the fixture must need conversion"
    );

    // A directory target: disk.img is the raw disk.
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--content", "disk"]);
    let child = start(&cmd, port);
    let answer = curl(&upload_args(
        &bearer(),
        qcow2.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let run = child.wait();
    assert_eq!(answer.status, 200, "{}{}", answer.body, run.dump());
    run.success();
    assert_eq!(sha256_file(&out.join("disk.img")), want, "{}", run.dump());

    // A block device with noise on it, through a tus upload.
    let block = LoopDevice::new(&dir, "blk", 48 * MIB);
    block.fill_random();
    let (cmd, port) = receiver(&block.device);
    let cmd = cmd.args(["--content", "disk"]);
    let child = start(&cmd, port);
    let (client, _) = tus_client(port, &qcow2, None);
    wait_client(client);
    let run = child.wait();
    run.success();
    assert_eq!(
        sha256_prefix(&block.device, 32 * MIB),
        want,
        "{}",
        run.dump()
    );
}

#[test]
fn a_form_larger_than_the_volume_is_413_up_front_and_one_without_length_is_507() {
    require_root();
    let data = random_fixture("random-64m.bin", 64 * MIB, 3);
    let dir = test_dir("form-capacity");
    let fs = LoopDevice::with_fs(&dir, "small", 24 * MIB, Fs::Ext4);

    // Content-Length tells that the file cannot fit: refused before a byte
    // is written, and curl sees the answer (lingering close).
    let (cmd, port) = receiver(fs.mount_point());
    let child = start(&cmd, port);
    let answer = curl(&[
        "-H",
        &bearer(),
        "-F",
        &format!("file=@{}", data.display()),
        &url(port, "/v1beta1/upload-form"),
    ]);
    let run = child.wait();
    assert_eq!(answer.status, 413, "{}{}", answer.body, run.dump());
    assert!(answer.body.contains("the form's file"), "{}", answer.body);
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("can take only");
    assert_eq!(run.result()["status"], "Failed", "{}", run.dump());
    assert_empty_dir(fs.mount_point(), &run);

    // Chunked: no length, the volume runs out while writing: 507, exit 4.
    let (cmd, port) = receiver(fs.mount_point());
    let child = start(&cmd, port);
    let answer = curl(&[
        "-H",
        &bearer(),
        "-H",
        "Transfer-Encoding: chunked",
        "-F",
        &format!("file=@{}", data.display()),
        &url(port, "/v1beta1/upload-form"),
    ]);
    let run = child.wait();
    // Forms get no lingering close: the client sees 507 or a reset, which
    // curl reports as status 0, or 100 when the reset follows 100 Continue.
    assert!(
        answer.status == 507 || (matches!(answer.status, 0 | 100) && answer.curl_exit != 0),
        "status {} (curl exit {}): {}{}",
        answer.status,
        answer.curl_exit,
        answer.body,
        run.dump()
    );
    run.code(4).reason("InsufficientCapacity");
    assert_eq!(run.result()["status"], "Failed", "{}", run.dump());
    assert_empty_dir(fs.mount_point(), &run);
}

/// A tus PATCH with curl: (status, Upload-Offset answered).
fn tus_patch(upload: &str, offset: u64, file: &Path) -> (u32, Option<u64>) {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"])
        .args(["-X", "PATCH", "-H", "Tus-Resumable: 1.0.0", "-H", &bearer()])
        .args(["-H", "Content-Type: application/offset+octet-stream"])
        .args(["-H", &format!("Upload-Offset: {offset}")])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(upload)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let offset = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("upload-offset")
            .then(|| v.trim().parse().ok())?
    });
    (status, offset)
}

/// Creates a tus upload of `length` bytes; returns its URL.
fn tus_create(port: u16, length: u64) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-D", "-", "-X", "POST"])
        .args(["-H", "Tus-Resumable: 1.0.0", "-H", &bearer()])
        .args(["-H", &format!("Upload-Length: {length}")])
        .arg(url(port, "/files"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let location = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Location in {text}"));
    url(port, &location)
}

#[test]
fn an_idle_tus_upload_is_parked_resumed_by_another_client_or_discarded() {
    require_root();
    let dir = test_dir("tus-idle");
    let data = random_fixture("random-8m.bin", 8 * MIB, 21);
    let (first, rest) = (dir.join("first"), dir.join("rest"));
    sh(&format!(
        "head -c 3145728 {d} > {f} && tail -c +3145729 {d} > {r}",
        d = data.display(),
        f = first.display(),
        r = rest.display()
    ));

    // Created, 3 MiB sent, then nothing for longer than the idle timeout:
    // the receiver is free again, and another client resumes the upload.
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--idle-timeout", "1.5"]);
    let child = start(&cmd, port);
    let upload = tus_create(port, 8 * MIB);
    assert_eq!(tus_patch(&upload, 0, &first), (204, Some(3 * MIB)));
    let busy = curl(&upload_args(
        &bearer(),
        "/dev/null",
        &url(port, "/v1beta1/upload"),
    ));
    assert_eq!(busy.status, 503, "the unfinished upload holds the receiver");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tus_offset(&upload),
        Some(3 * MIB),
        "HEAD of the parked upload"
    );
    // Any client with the URL and the token: here a plain curl.
    assert_eq!(tus_patch(&upload, 3 * MIB, &rest), (204, Some(8 * MIB)));
    let run = child.wait();
    run.success();
    assert!(
        run.stderr.contains("no longer holds the receiver")
            && run.stderr.contains("resumed at 3145728"),
        "{}",
        run.dump()
    );
    assert_eq!(sha256_file(&out.join("disk.img")), sha256_file(&data));

    // Parked, then a CDI upload claims the receiver: the tus upload's bytes
    // and state are discarded, the CDI upload is what lands.
    let out = dir.join("out2");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let cmd = cmd.args(["--idle-timeout", "1.5"]);
    let child = start(&cmd, port);
    let upload = tus_create(port, 8 * MIB);
    assert_eq!(tus_patch(&upload, 0, &first), (204, Some(3 * MIB)));
    std::thread::sleep(Duration::from_secs(3));
    let cdi = curl(&upload_args(
        &bearer(),
        rest.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    let run = child.wait();
    assert_eq!(cdi.status, 200, "{}{}", cdi.body, run.dump());
    run.success();
    assert!(run.stderr.contains("is discarded"), "{}", run.dump());
    assert_eq!(sha256_file(&out.join("disk.img")), sha256_file(&rest));
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["disk.img"], "{}", run.dump());
}

#[test]
fn early_refusals_linger_so_curl_sees_the_status() {
    require_root();
    let data = random_fixture("random-64m.bin", 64 * MIB, 3);
    let dir = test_dir("linger");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (cmd, port) = receiver(&out);
    let child = start(&cmd, port);
    let file = data.to_str().unwrap();
    // No Expect: 100-continue: curl sends the body at once, the receiver
    // answers before reading it. Without the lingering close curl mostly
    // reports "connection reset" (status 000; 15 of 15 attempts under load
    // with the receiver before it), so a few rounds make the test reliable.
    for _ in 0..10 {
        let wrong = post_without_expect("Authorization: Bearer wrong", file, port);
        assert_eq!(
            wrong.status, 401,
            "exit {}: {}",
            wrong.curl_exit, wrong.body
        );
        let patch = tus_patch(&url(port, "/files/0123456789abcdef"), 0, &data);
        assert_eq!(patch.0, 404);
    }
    let small = random_fixture("random-1m.bin", MIB, 5);
    let ok = curl(&upload_args(
        &bearer(),
        small.to_str().unwrap(),
        &url(port, "/v1beta1/upload"),
    ));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let late = post_without_expect(&bearer(), file, port);
    let run = child.wait();
    assert_eq!(
        late.status,
        409,
        "exit {}: {}{}",
        late.curl_exit,
        late.body,
        run.dump()
    );
    run.success();

    // 413 before the receiver exits 4.
    let block = LoopDevice::new(&dir, "blk", 32 * MIB);
    let (cmd, port) = receiver(&block.device);
    let child = start(&cmd, port);
    let big = post_without_expect(&bearer(), file, port);
    let run = child.wait();
    assert_eq!(
        big.status,
        413,
        "exit {}: {}{}",
        big.curl_exit,
        big.body,
        run.dump()
    );
    run.code(4);
}
