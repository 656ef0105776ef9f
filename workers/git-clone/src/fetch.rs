//! Fetching one ref: list what the remote advertises, pick the ref (branch
//! before tag, as `git clone -b`), fetch exactly that at the asked depth, and
//! for a commit the server will not hand out by SHA (libgit2 speaks protocol
//! v0 only) fetch the branches and tags and deepen until the commit is there.
//! Network failures are retried with backoff; the rest fail at once.

use std::time::Duration;

use anyhow::Result;
use git2::{AutotagOption, Direction, FetchOptions, Oid, Repository};
use populator_core::error::{fail, terminated, Kind};
use populator_core::Context;

use crate::auth::Session;
use crate::cli::WantRef;
use crate::errors::{classify, Failure};
use crate::repo_url::Scheme;

/// What the fetch found.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub commit: Oid,
    /// The remote's full ref name (`refs/heads/main`), or the SHA asked for.
    pub refname: String,
    /// Set when the ref is a branch: the local branch to create.
    pub branch: Option<String>,
}

/// Where a fetched commit is kept until HEAD points at it.
const WANT_REF: &str = "refs/populator/want";

struct Advertised {
    name: String,
    oid: Oid,
    symref: Option<String>,
}

/// One fetch request: refspec, the local ref it fills, and how to report it.
struct Plan {
    refspec: String,
    local: String,
    refname: String,
    branch: Option<String>,
    /// A SHA nobody advertises: fetch it directly, or search for it.
    unadvertised: Option<Oid>,
}

/// Fetches `want` from the session's URL into `repo`, retrying network failures.
pub fn fetch(
    repo: &Repository,
    session: &Session,
    want: &WantRef,
    depth: u32,
    ctx: &Context,
) -> Result<Fetched> {
    let retries = session.auth().network.retries;
    let mut backoff = session.auth().network.retry_backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        session.reset();
        let failure = match fetch_once(repo, session, want, depth) {
            Ok(f) => return Ok(f),
            Err(f) => f,
        };
        if ctx.cancel.is_cancelled() {
            return Err(terminated());
        }
        if !failure.retryable {
            return Err(failure.into_error());
        }
        if attempt > retries {
            return Err(fail(
                Kind::Transient,
                failure.reason,
                format!(
                    "{} (gave up after {attempt} attempts; a later run may succeed)",
                    failure.message
                ),
            ));
        }
        populator_core::log::warn(format!(
            "{}; retrying in {:.1}s (attempt {} of {})",
            failure.message,
            backoff.as_secs_f64(),
            attempt + 1,
            retries + 1
        ));
        sleep_unless_cancelled(backoff, ctx)?;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn sleep_unless_cancelled(d: Duration, ctx: &Context) -> Result<()> {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        ctx.cancel.check()?;
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
    ctx.cancel.check()
}

fn failure(session: &Session, err: &git2::Error) -> Failure {
    match session.take_failure() {
        Some(f) => f.into(),
        None => classify(err, &session.url.url),
    }
}

fn fetch_options<'s>(session: &'s Session, depth: i32) -> FetchOptions<'s> {
    let mut fo = FetchOptions::new();
    fo.remote_callbacks(session.callbacks())
        .proxy_options(session.proxy())
        .download_tags(AutotagOption::None)
        .update_fetchhead(false);
    if depth > 0 {
        fo.depth(depth);
    }
    fo
}

fn fetch_once(
    repo: &Repository,
    session: &Session,
    want: &WantRef,
    depth: u32,
) -> Result<Fetched, Failure> {
    let url = session.url.url.clone();
    let mut remote = repo
        .remote_anonymous(&url)
        .map_err(|e| failure(session, &e))?;
    let mut conn = remote
        .connect_auth(
            Direction::Fetch,
            Some(session.callbacks()),
            Some(session.proxy()),
        )
        .map_err(|e| failure(session, &e))?;
    let advertised: Vec<Advertised> = conn
        .list()
        .map_err(|e| failure(session, &e))?
        .iter()
        .map(|h| Advertised {
            name: h.name().to_string(),
            oid: h.oid(),
            symref: h.symref_target().map(str::to_string),
        })
        .collect();
    let plan = choose(&advertised, want, &url)?;
    // libgit2's local transport cannot fetch shallow: file:// gets it all.
    let depth = if session.url.scheme == Scheme::File {
        0
    } else {
        depth as i32
    };
    if let Some(sha) = plan.unadvertised {
        let direct = conn.remote().fetch(
            &[&plan.refspec],
            Some(&mut fetch_options(session, depth)),
            None,
        );
        drop(conn);
        return match direct {
            Ok(()) => finish(repo, &plan, session),
            Err(e) => {
                let f = failure(session, &e);
                if f.kind != Kind::Internal {
                    return Err(f);
                }
                session.reset();
                search_commit(repo, &mut remote, session, sha, depth)?;
                Ok(Fetched {
                    commit: sha,
                    refname: sha.to_string(),
                    branch: None,
                })
            }
        };
    }
    conn.remote()
        .fetch(
            &[&plan.refspec],
            Some(&mut fetch_options(session, depth)),
            None,
        )
        .map_err(|e| failure(session, &e))?;
    drop(conn);
    finish(repo, &plan, session)
}

fn finish(repo: &Repository, plan: &Plan, session: &Session) -> Result<Fetched, Failure> {
    let commit = repo
        .find_reference(&plan.local)
        .and_then(|r| r.peel_to_commit())
        .map_err(|e| failure(session, &e))?
        .id();
    if plan.local == WANT_REF {
        if let Ok(mut r) = repo.find_reference(WANT_REF) {
            let _ = r.delete();
        }
    }
    Ok(Fetched {
        commit,
        refname: plan.refname.clone(),
        branch: plan.branch.clone(),
    })
}

/// Fetches every branch and tag, deeper each time, until `sha` is present.
fn search_commit(
    repo: &Repository,
    remote: &mut git2::Remote<'_>,
    session: &Session,
    sha: Oid,
    depth: i32,
) -> Result<(), Failure> {
    const UNSHALLOW: i32 = i32::MAX;
    let steps: Vec<i32> = if depth == 0 {
        vec![0]
    } else {
        vec![depth.max(64), depth.max(1024), UNSHALLOW]
    };
    let refspecs = [
        "+refs/heads/*:refs/remotes/origin/*",
        "+refs/tags/*:refs/tags/*",
    ];
    for d in steps {
        session.reset();
        remote
            .fetch(&refspecs, Some(&mut fetch_options(session, d)), None)
            .map_err(|e| failure(session, &e))?;
        if repo.find_commit(sha).is_ok() {
            return Ok(());
        }
    }
    Err(Failure {
        kind: Kind::Usage,
        reason: "UnknownRef",
        message: format!(
            "commit {sha} is not in {} (no branch or tag reaches it)",
            session.url.url
        ),
        retryable: false,
    })
}

fn choose(advertised: &[Advertised], want: &WantRef, url: &str) -> Result<Plan, Failure> {
    let unknown = |message: String| Failure {
        kind: Kind::Usage,
        reason: "UnknownRef",
        message,
        retryable: false,
    };
    if advertised.is_empty() {
        return Err(Failure {
            kind: Kind::Usage,
            reason: "EmptyRepository",
            message: format!("{url} is an empty repository (no branch, no tag)"),
            retryable: false,
        });
    }
    let find = |name: &str| advertised.iter().find(|a| a.name == name);
    match want {
        WantRef::Head => {
            let head = find("HEAD")
                .ok_or_else(|| unknown(format!("{url} has no HEAD; name a branch with --ref")))?;
            let branch = head
                .symref
                .as_deref()
                .and_then(|s| s.strip_prefix("refs/heads/"))
                .filter(|b| find(&format!("refs/heads/{b}")).is_some())
                .map(str::to_string)
                .or_else(|| {
                    advertised
                        .iter()
                        .filter(|a| a.oid == head.oid)
                        .filter_map(|a| a.name.strip_prefix("refs/heads/"))
                        .min_by_key(|b| !matches!(*b, "main" | "master"))
                        .map(str::to_string)
                });
            Ok(match branch {
                Some(b) => branch_plan(&b),
                None => Plan {
                    refspec: format!("+HEAD:{WANT_REF}"),
                    local: WANT_REF.into(),
                    refname: "HEAD".into(),
                    branch: None,
                    unadvertised: None,
                },
            })
        }
        WantRef::Name(name) => {
            let candidates: Vec<String> = if name.starts_with("refs/") {
                vec![name.clone()]
            } else {
                vec![format!("refs/heads/{name}"), format!("refs/tags/{name}")]
            };
            let found = candidates
                .iter()
                .find(|c| find(c).is_some())
                .ok_or_else(|| {
                    let mut names: Vec<&str> = advertised
                        .iter()
                        .filter_map(|a| {
                            a.name
                                .strip_prefix("refs/heads/")
                                .or_else(|| a.name.strip_prefix("refs/tags/"))
                        })
                        .filter(|n| !n.ends_with("^{}"))
                        .collect();
                    let more = names.len() > 10;
                    names.truncate(10);
                    unknown(format!(
                        "ref '{name}' is neither a branch nor a tag of {url} (it has: {}{})",
                        names.join(", "),
                        if more { ", …" } else { "" }
                    ))
                })?;
            Ok(ref_plan(found))
        }
        WantRef::Commit(sha) => {
            let holder = advertised
                .iter()
                .filter(|a| a.oid == *sha && a.name != "HEAD")
                .map(|a| a.name.trim_end_matches("^{}").to_string())
                .min_by_key(|n| !n.starts_with("refs/heads/"));
            Ok(match holder {
                Some(name) => {
                    let mut plan = ref_plan(&name);
                    plan.refname = sha.to_string();
                    plan.branch = None;
                    plan
                }
                None => Plan {
                    refspec: format!("+{sha}:{WANT_REF}"),
                    local: WANT_REF.into(),
                    refname: sha.to_string(),
                    branch: None,
                    unadvertised: Some(*sha),
                },
            })
        }
    }
}

fn branch_plan(branch: &str) -> Plan {
    Plan {
        refspec: format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"),
        local: format!("refs/remotes/origin/{branch}"),
        refname: format!("refs/heads/{branch}"),
        branch: Some(branch.to_string()),
        unadvertised: None,
    }
}

fn ref_plan(name: &str) -> Plan {
    if let Some(b) = name.strip_prefix("refs/heads/") {
        return branch_plan(b);
    }
    let local = if name.starts_with("refs/tags/") {
        name.to_string()
    } else {
        WANT_REF.to_string()
    };
    Plan {
        refspec: format!("+{name}:{local}"),
        local,
        refname: name.to_string(),
        branch: None,
        unadvertised: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(name: &str, hex: &str, symref: Option<&str>) -> Advertised {
        Advertised {
            name: name.into(),
            oid: Oid::from_str(hex).unwrap(),
            symref: symref.map(str::to_string),
        }
    }

    #[test]
    fn picks_branch_before_tag_and_follows_head() {
        let a = "1111111111111111111111111111111111111111";
        let b = "2222222222222222222222222222222222222222";
        let list = vec![
            ad("HEAD", a, Some("refs/heads/dev")),
            ad("refs/heads/dev", a, None),
            ad("refs/heads/x", b, None),
            ad("refs/tags/x", b, None),
            ad("refs/tags/v1", b, None),
            ad("refs/tags/v1^{}", a, None),
        ];
        let p = choose(&list, &WantRef::Head, "u").ok().unwrap();
        assert_eq!(p.branch.as_deref(), Some("dev"));
        let p = choose(&list, &WantRef::Name("x".into()), "u").ok().unwrap();
        assert_eq!(p.refname, "refs/heads/x");
        let p = choose(&list, &WantRef::Name("v1".into()), "u")
            .ok()
            .unwrap();
        assert_eq!(p.local, "refs/tags/v1");
        assert!(choose(&list, &WantRef::Name("nope".into()), "u").is_err());
        // A commit only a peeled tag points at is fetched through the tag.
        let p = choose(&list, &WantRef::Commit(Oid::from_str(a).unwrap()), "u")
            .ok()
            .unwrap();
        assert_eq!(p.refspec, "+refs/heads/dev:refs/remotes/origin/dev");
        assert_eq!(p.branch, None);
        let c = Oid::from_str("3333333333333333333333333333333333333333").unwrap();
        let p = choose(&list, &WantRef::Commit(c), "u").ok().unwrap();
        assert_eq!(p.unadvertised, Some(c));
    }
}
