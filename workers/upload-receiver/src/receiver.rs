//! The receiver's life: check the flags and the target, start the HTTPS
//! server, pick up an upload left by a killed receiver, run uploads until
//! one completes (or fails for good), then stop serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use populator_core::content::ContentMode;
use populator_core::error::{fail, Kind};
use populator_core::target::{Target, TargetKind};
use populator_core::Context;

use crate::auth::{self, Auth};
use crate::cli::Args;
use crate::pump::Limits;
use crate::server::{Job, Phase, Server, ServerOptions, Shared};
use crate::session::Runner;
use crate::tus::TusUploads;

/// The name of the file in a directory target when the client names none,
/// as CDI's upload server writes it.
const DEFAULT_FILE_NAME: &str = "disk.img";
/// How long answers in flight may take to reach their clients at the end.
const GRACE: Duration = Duration::from_secs(5);

pub fn run(args: Args, ctx: &Context) -> Result<String> {
    let config = args.server.config()?;
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    if args.content.content == ContentMode::Archive && target.kind != TargetKind::Filesystem {
        return Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!(
                "--content archive needs a directory target, but {} is a {} target",
                target.path.display(),
                target.kind.name()
            ),
        ));
    }
    let spec = args.content.spec(DEFAULT_FILE_NAME, args.common.owner);
    let limits = Limits::new(config.idle_timeout, config.deadline, ctx.cancel.clone());
    if let Some(passed) = limits.deadline_passed() {
        return Err(passed);
    }

    let identity = config.tls.identity(&["localhost", "upload-receiver"])?;
    let fingerprint = identity.fingerprint();
    let tls = auth::server_config(
        identity,
        config.client_ca_file.as_deref(),
        config.token.is_some(),
    )?;
    let auth = Auth::new(
        config.token.as_ref(),
        config.client_ca_file.is_some(),
        config.client_name.clone(),
    );
    if auth.open() {
        populator_core::log::warn("--insecure-no-auth: accepting uploads from anyone");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (jobs, mut queue) = tokio::sync::mpsc::channel(1);
    let shared = Arc::new(Shared {
        auth,
        phase: Mutex::new(Phase::Idle),
        jobs,
        tus: TusUploads::new(target.capacity),
    });
    if spec.mode == ContentMode::File {
        if let Some(saved) = crate::resumable::load(&target) {
            populator_core::log::info(format!(
                "found tus upload {} at {} of {} bytes in the target: clients may resume it at /files/{}",
                saved.id, saved.offset, saved.length, saved.id
            ));
            let mut session = shared.tus.register(
                saved.id.clone(),
                saved.length,
                saved.offset,
                Some(saved.file_name.clone()),
            );
            session.resume = Some(saved);
            shared.set_phase(Phase::Busy);
            let _ = shared.jobs.try_send(Job::Tus(session));
        }
    }
    let server = runtime.block_on(Server::start(
        ServerOptions {
            listen: config.listen,
            tls,
            header_read_timeout: config.header_read_timeout,
            max_connections: config.max_connections,
        },
        shared.clone(),
    ))?;
    populator_core::log::info(format!(
        "listening on https://{} (certificate SHA-256 {fingerprint}): CDI POST /v1beta1/upload[-async|-form|-form-async], tus /files",
        config.listen
    ));
    ctx.progress.set_stage("waiting");
    let runner = Runner {
        runtime: &runtime,
        shared: shared.clone(),
        target,
        spec,
        ctx,
        limits,
        client_names_file: args.content.file_name.is_none(),
    };
    let outcome = runner.run(&mut queue);
    shared.set_phase(Phase::Done);
    if outcome.is_ok() {
        // Late clients and proxies learn that it is over (409, tus HEAD).
        runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(config.linger) => {}
                _ = ctx.cancel.cancelled() => {}
            }
        });
    }
    runtime.block_on(server.shutdown(GRACE));
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}
