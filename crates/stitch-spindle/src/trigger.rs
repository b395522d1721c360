//! `sh.tangled.pipeline` triggers: authorize, then spawn one stitch build
//! per workflow without blocking the knot stream.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use stitch_server::service::{self, CreateBuild};

use crate::db::Run;
use crate::records::{PipelineRecord, TriggerMetadata, Workflow};
use crate::routing::queue_for;
use crate::Spindle;

/// Caller-metadata keys stitch builds of the spindle carry. The first three
/// identify the workflow run; the status translator reads them from events.
pub mod meta {
    /// Knot the trigger came from.
    pub const KNOT: &str = "tangled.knot";
    /// The trigger record's rkey.
    pub const PIPELINE_RKEY: &str = "tangled.pipeline_rkey";
    /// The workflow file name.
    pub const WORKFLOW: &str = "tangled.workflow";
    /// `push`, `pull_request` or `manual`.
    pub const KIND: &str = "tangled.kind";
    /// Repository owner DID.
    pub const REPO_DID: &str = "tangled.repo_did";
    /// Repository name.
    pub const REPO: &str = "tangled.repo";
    /// The ref pushed (push).
    pub const REF: &str = "tangled.ref";
    /// The commit under test.
    pub const COMMIT: &str = "tangled.commit";
    /// The branch under test.
    pub const BRANCH: &str = "tangled.branch";
    /// Target branch of a pull request.
    pub const TARGET_BRANCH: &str = "tangled.target_branch";
    /// What happened to the pull request.
    pub const PR_ACTION: &str = "tangled.pr_action";
    /// The DID the run is attributed to (the repo owner).
    pub const ACTOR: &str = "tangled.actor";
}

/// Why a trigger was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The record has no `triggerMetadata.repo`.
    #[error("trigger has no repo")]
    NoRepo,
    /// The trigger names another knot than the one it came from.
    #[error("trigger for knot {claimed:?} arrived from knot {actual:?}")]
    WrongKnot {
        /// `triggerMetadata.repo.knot`.
        claimed: String,
        /// The knot whose stream carried it.
        actual: String,
    },
    /// No tracked repo record names this spindle for the repo.
    #[error("repo {0} is not tracked by this spindle")]
    Untracked(String),
    /// The repo owner is neither the operator nor a member.
    #[error("repo owner {0} is not the spindle owner or a member")]
    NotMember(String),
    /// The spindle's database failed.
    #[error("{0}")]
    Internal(String),
}

/// Checks a trigger that arrived on `knot`; returns its repo's (did, name).
pub async fn authorize(
    spindle: &Spindle,
    knot: &str,
    record: &PipelineRecord,
) -> Result<(String, String), Refusal> {
    let repo = record
        .trigger_metadata
        .as_ref()
        .and_then(|t| t.repo.as_ref())
        .ok_or(Refusal::NoRepo)?;
    if repo.knot != knot {
        return Err(Refusal::WrongKnot {
            claimed: repo.knot.clone(),
            actual: knot.to_string(),
        });
    }
    let internal = |e: crate::error::SpindleError| Refusal::Internal(e.to_string());
    if !spindle
        .db
        .repo_tracked(knot, &repo.did, &repo.repo)
        .await
        .map_err(internal)?
    {
        return Err(Refusal::Untracked(format!("{}/{}", repo.did, repo.repo)));
    }
    if repo.did != spindle.settings.owner
        && !spindle.db.is_member(&repo.did).await.map_err(internal)?
    {
        return Err(Refusal::NotMember(repo.did.clone()));
    }
    Ok((repo.did.clone(), repo.repo.clone()))
}

/// Handles one trigger from `knot`: authorizes it and starts one task per
/// workflow (nil entries and empty names skipped). Returns at once.
pub async fn handle(spindle: &Spindle, knot: &str, rkey: &str, record: PipelineRecord) {
    let (repo_did, repo_name) = match authorize(spindle, knot, &record).await {
        Ok(repo) => repo,
        Err(refusal) => {
            tracing::warn!(knot, rkey, reason = %refusal, "spindle: ignoring pipeline trigger");
            return;
        }
    };
    let trigger = record.trigger_metadata.unwrap_or_default();
    for workflow in record.workflows.into_iter().flatten() {
        if workflow.name.is_empty() {
            continue;
        }
        let run = Run {
            knot: knot.to_string(),
            rkey: rkey.to_string(),
            workflow: workflow.name.clone(),
            repo_did: repo_did.clone(),
            repo_name: repo_name.clone(),
            build_id: None,
            error: None,
        };
        let spindle = spindle.clone();
        let trigger = trigger.clone();
        spindle.clone().tasks.spawn(async move {
            if let Err(e) = spawn_workflow(&spindle, run, &trigger, &workflow).await {
                tracing::error!(error = %e, "spindle: spawning a workflow failed");
            }
        });
    }
}

/// Creates the stitch build of one workflow, once per (knot, rkey, workflow).
async fn spawn_workflow(
    spindle: &Spindle,
    run: Run,
    trigger: &TriggerMetadata,
    workflow: &Workflow,
) -> Result<(), crate::error::SpindleError> {
    let queue = match queue_for(&workflow.raw, &spindle.settings.default_queue) {
        Ok(q) => q,
        Err(e) => {
            spindle.db.fail_run(&run, &e.to_string()).await?;
            return Ok(());
        }
    };
    if spindle.state.build_queue(&queue).is_none() {
        let error = format!("unknown queue {queue:?}: no such queue is configured on this spindle");
        spindle.db.fail_run(&run, &error).await?;
        return Ok(());
    }
    if !spindle.db.claim_run(&run, &queue).await? {
        tracing::debug!(knot = %run.knot, rkey = %run.rkey, workflow = %run.workflow, "spindle: replayed trigger; already spawned");
        return Ok(());
    }
    let request = build_request(&run, trigger);
    match service::create_build(&spindle.state, &queue, request).await {
        Ok((build, _)) => spindle.db.set_run_build(&run, &build.id).await,
        Err(e) => {
            spindle
                .db
                .fail_run(&run, &format!("could not create the build: {e}"))
                .await?;
            Ok(())
        }
    }
}

/// The build request of a workflow run: change URIs and metadata derived
/// from the trigger, and an idempotency key derived from (knot, rkey,
/// workflow) so a restart mid-spawn never creates a second build.
pub fn build_request(run: &Run, trigger: &TriggerMetadata) -> CreateBuild {
    let repo_url = format!("https://{}/{}/{}", run.knot, run.repo_did, run.repo_name);
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.to_string(), truncate(v));
        }
    };
    put(meta::KNOT, &run.knot);
    put(meta::PIPELINE_RKEY, &run.rkey);
    put(meta::WORKFLOW, &run.workflow);
    put(meta::KIND, &trigger.kind);
    put(meta::REPO_DID, &run.repo_did);
    put(meta::REPO, &run.repo_name);
    put(meta::ACTOR, &run.repo_did);
    let head = match (trigger.kind.as_str(), &trigger.push, &trigger.pull_request) {
        ("push", Some(push), _) => {
            put(meta::REF, &push.ref_);
            put(meta::COMMIT, &push.new_sha);
            put(
                meta::BRANCH,
                push.ref_.strip_prefix("refs/heads/").unwrap_or_default(),
            );
            format!("{repo_url}/commit/{}", non_empty(&push.new_sha, &push.ref_))
        }
        ("pull_request", _, Some(pr)) => {
            put(meta::COMMIT, &pr.source_sha);
            put(meta::BRANCH, &pr.source_branch);
            put(meta::TARGET_BRANCH, &pr.target_branch);
            put(meta::PR_ACTION, &pr.action);
            format!(
                "{repo_url}/commit/{}",
                non_empty(&pr.source_sha, &pr.source_branch)
            )
        }
        _ => {
            let branch = trigger
                .repo
                .as_ref()
                .map(|r| r.default_branch.as_str())
                .unwrap_or_default();
            put(meta::BRANCH, branch);
            format!("{repo_url}/tree/{}", non_empty(branch, "HEAD"))
        }
    };
    CreateBuild {
        base: Vec::new(),
        head: vec![head],
        metadata: m,
        idempotency_key: Some(idempotency_key(&run.knot, &run.rkey, &run.workflow)),
    }
}

/// `spindle:` + SHA-256 of the NUL-joined tuple: fixed length whatever the
/// names, and distinct tuples never collide by concatenation.
pub fn idempotency_key(knot: &str, rkey: &str, workflow: &str) -> String {
    let mut h = Sha256::new();
    h.update(knot.as_bytes());
    h.update([0]);
    h.update(rkey.as_bytes());
    h.update([0]);
    h.update(workflow.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("spindle:{hex}")
}

fn non_empty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() {
        b
    } else {
        a
    }
}

/// Metadata values are bounded; a pathological name is cut rather than
/// failing the whole build.
fn truncate(v: &str) -> String {
    const MAX: usize = 1024;
    if v.len() <= MAX {
        return v.to_string();
    }
    let mut end = MAX;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{PullRequestData, TriggerRepo};

    fn run() -> Run {
        Run {
            knot: "knot.example.com".into(),
            rkey: "3lzpipeline22".into(),
            workflow: "ci.yml".into(),
            repo_did: "did:plc:owner".into(),
            repo_name: "myrepo".into(),
            build_id: None,
            error: None,
        }
    }

    #[test]
    fn pull_requests_and_manual_runs_become_requests() {
        let pr = TriggerMetadata {
            kind: "pull_request".into(),
            pull_request: Some(PullRequestData {
                source_branch: "feat".into(),
                target_branch: "main".into(),
                source_sha: "c".repeat(40),
                action: "opened".into(),
            }),
            ..TriggerMetadata::default()
        };
        let req = build_request(&run(), &pr);
        assert_eq!(
            req.head,
            [format!(
                "https://knot.example.com/did:plc:owner/myrepo/commit/{}",
                "c".repeat(40)
            )]
        );
        assert_eq!(req.metadata[meta::BRANCH], "feat");
        assert_eq!(req.metadata[meta::TARGET_BRANCH], "main");
        assert_eq!(req.metadata[meta::PR_ACTION], "opened");
        assert_eq!(req.metadata[meta::ACTOR], "did:plc:owner");
        assert!(
            stitch_core::ChangeSet::new(req.base.clone(), req.head.clone())
                .validate()
                .is_ok()
        );
        assert!(stitch_core::BuildMetadata::from(req.metadata.clone())
            .validate()
            .is_ok());

        let manual = TriggerMetadata {
            kind: "manual".into(),
            repo: Some(TriggerRepo {
                default_branch: "trunk".into(),
                ..TriggerRepo::default()
            }),
            ..TriggerMetadata::default()
        };
        let req = build_request(&run(), &manual);
        assert_eq!(
            req.head,
            ["https://knot.example.com/did:plc:owner/myrepo/tree/trunk"]
        );
        assert!(!req.metadata.contains_key(meta::COMMIT));
    }

    #[test]
    fn idempotency_keys_are_per_tuple_and_valid() {
        let a = idempotency_key("k", "r", "w");
        assert_eq!(a, idempotency_key("k", "r", "w"));
        assert_ne!(a, idempotency_key("k", "rw", ""));
        assert_ne!(a, idempotency_key("k", "r", "w2"));
        assert_eq!(a.len(), "spindle:".len() + 64);
    }
}
