//! Fleet jobs: one command to many devices, rolled out at a rate and a concurrency.
//!
//! A job is created with its devices (named, or those with given tags, resolved once) and a
//! runner task per running job creates the devices' commands: at most `rate` a second
//! (a token bucket holding at most a tenth of a second's worth, or one) and while fewer
//! than `concurrency` of the job's commands have not ended. Each command then goes as any command does.
//! The job completes when every device has a command and none is open. Aborting it stops
//! the runner and cancels the job's commands not yet delivered: it sends nothing more.
//! Running jobs resume after a restart.

use std::{sync::Arc, time::Duration};

use tellus_core::{
    command::{new_job_id, Job, JobStatus},
    now_ms, CommandStatus, DeviceId, DeviceQuery,
};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{DeviceError, Devices};

/// How often a runner looks at its job.
const TICK: Duration = Duration::from_millis(100);
/// Most devices one job selects.
pub const MAX_DEVICES: usize = 100_000;
/// Fastest rollout, commands per second.
pub const MAX_RATE: f64 = 1_000.0;
/// Most commands of one job open at once.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Which devices a job is for.
#[derive(Debug, Clone)]
pub enum Selector {
    Ids(Vec<DeviceId>),
    /// Every registered device with all these tags.
    Tags(Vec<(String, String)>),
}

/// What a job is asked to do.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub params: serde_json::Value,
    pub timeout: Duration,
    pub selector: Selector,
    pub rate: f64,
    pub concurrency: u32,
}

impl Devices {
    /// Creates a job for the selected devices and starts rolling it out.
    pub async fn start_job(self: &Arc<Self>, new: NewJob) -> Result<Job, DeviceError> {
        self.check_command(&new.name, &new.params, new.timeout)?;
        if !(new.rate > 0.0 && new.rate <= MAX_RATE) {
            return Err(DeviceError::Invalid(format!(
                "rate must be more than 0 and at most {MAX_RATE} commands a second"
            )));
        }
        if new.concurrency == 0 || new.concurrency > MAX_CONCURRENCY {
            return Err(DeviceError::Invalid(format!(
                "concurrency must be 1 to {MAX_CONCURRENCY}"
            )));
        }
        match &new.selector {
            Selector::Ids(ids) if ids.len() > MAX_DEVICES => {
                return Err(DeviceError::Invalid(format!(
                    "a job is for at most {MAX_DEVICES} devices"
                )))
            }
            Selector::Tags(tags) if tags.is_empty() => {
                return Err(DeviceError::Invalid(
                    "selector: tags must name at least one tag".into(),
                ))
            }
            _ => {}
        }
        let selector = new.selector.clone();
        let devices = self
            .blocking(move |r| {
                let mut devices = Vec::new();
                match selector {
                    Selector::Ids(ids) => {
                        let mut seen = std::collections::HashSet::new();
                        for id in ids {
                            if !seen.insert(id.clone()) {
                                continue;
                            }
                            if r.device(&id)?.is_none() {
                                return Ok(Err(DeviceError::UnknownDevice(id)));
                            }
                            devices.push(id);
                        }
                    }
                    Selector::Tags(tags) => loop {
                        let page = r.devices(&DeviceQuery {
                            after: devices.last(),
                            limit: 1_000,
                            expiring_before: None,
                            tags: &tags,
                        })?;
                        let last_page = page.len() < 1_000;
                        devices.extend(page.into_iter().map(|d| d.id));
                        if last_page || devices.len() > MAX_DEVICES {
                            break;
                        }
                    },
                }
                Ok(Ok(devices))
            })
            .await??;
        if devices.is_empty() || devices.len() > MAX_DEVICES {
            return Err(DeviceError::Invalid(format!(
                "a job is for 1 to {MAX_DEVICES} devices; the selector names {}",
                devices.len()
            )));
        }
        let job = Job {
            id: new_job_id(),
            name: new.name,
            params: new.params,
            timeout_ms: u64::try_from(new.timeout.as_millis()).unwrap_or(u64::MAX),
            rate: new.rate,
            concurrency: new.concurrency,
            status: JobStatus::Running,
            created_at_ms: now_ms(),
            finished_at_ms: None,
            total: devices.len() as u64,
        };
        {
            let job = job.clone();
            self.blocking(move |r| r.insert_job(&job, &devices)).await?;
        }
        info!(job = %job.id, devices = job.total, "job started");
        self.spawn_runner(&job.id);
        Ok(job)
    }

    /// Starts the runners of the jobs a previous run left running.
    pub(super) async fn resume_jobs(self: &Arc<Self>) {
        match self
            .blocking(|r| r.jobs(Some(JobStatus::Running), None, 10_000))
            .await
        {
            Ok(jobs) => {
                for job in jobs {
                    info!(job = %job.id, "job resumed");
                    self.spawn_runner(&job.id);
                }
            }
            Err(e) => warn!(error = %e, "could not read the running jobs"),
        }
    }

    /// Starts the job's runner, unless it has one.
    fn spawn_runner(self: &Arc<Self>, id: &str) {
        let new = self
            .job_runners
            .lock()
            .is_ok_and(|mut r| r.insert(id.to_owned()));
        if new {
            let (devices, id) = (self.clone(), id.to_owned());
            tokio::spawn(async move {
                devices.clone().run_job(id.clone()).await;
                if let Ok(mut r) = devices.job_runners.lock() {
                    r.remove(&id);
                }
            });
        }
    }

    /// Rolls a job out until it completes or is aborted.
    async fn run_job(self: Arc<Self>, id: String) {
        let mut tokens = 1.0_f64;
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(TICK).await;
            // Under the jobs lock: an abort cannot slip in between the look at the status
            // and the commands recorded. Sending them comes after.
            let rolling = self.jobs_lock.lock().await;
            let job_id = id.clone();
            let look = self
                .blocking(move |r| {
                    let Some(job) = r.job(&job_id)? else {
                        return Ok(None);
                    };
                    let open = r.job_open_commands(&job_id)?;
                    Ok(Some((job, open)))
                })
                .await;
            let (job, open) = match look {
                Ok(Some(look)) => look,
                Ok(None) => return,
                Err(e) => {
                    warn!(job = %id, error = %e, "could not read the job; retrying");
                    continue;
                }
            };
            if job.status != JobStatus::Running {
                return;
            }
            let now = Instant::now();
            // At most a tick's worth at once (or one): the rate holds over any second.
            let burst = (job.rate * TICK.as_secs_f64()).max(1.0);
            tokens = (tokens + now.duration_since(last).as_secs_f64() * job.rate).min(burst);
            last = now;
            let room = u64::from(job.concurrency).saturating_sub(open);
            let n = room.min(tokens.floor() as u64) as usize;
            let job_id = id.clone();
            let next = self
                .blocking(move |r| r.job_devices_without_command(&job_id, n.max(1)))
                .await;
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    warn!(job = %id, error = %e, "could not read the job's devices; retrying");
                    continue;
                }
            };
            if next.is_empty() {
                if open == 0 {
                    if let Err(e) = self.finish_job(&id, JobStatus::Completed).await {
                        warn!(job = %id, error = %e, "could not record the job's end; retrying");
                        continue;
                    }
                    return;
                }
                continue;
            }
            let timeout = Duration::from_millis(job.timeout_ms);
            let mut recorded = Vec::with_capacity(n);
            for device in next.into_iter().take(n) {
                tokens -= 1.0;
                let params = job.params.clone();
                match self
                    .record(&device, &job.name, params, timeout, Some(id.clone()))
                    .await
                {
                    Ok(command) => recorded.push(command),
                    // A device deleted since: the registry skips it from now on.
                    Err(e) => {
                        warn!(job = %id, device_id = %device, error = %e, "could not create a job's command")
                    }
                }
            }
            drop(rolling);
            for command in &recorded {
                self.send_if_listening(command).await;
            }
        }
    }

    async fn finish_job(&self, id: &str, status: JobStatus) -> Result<Option<Job>, DeviceError> {
        let job_id = id.to_owned();
        let job = self
            .blocking(move |r| r.finish_job(&job_id, status, now_ms()))
            .await?;
        info!(job = %id, status = status.as_str(), "job ended");
        Ok(job)
    }

    /// Aborts a running job: no command more is created, and those not yet delivered are
    /// cancelled. `None` if there is no such job.
    pub async fn abort_job(&self, id: &str) -> Result<Option<Job>, DeviceError> {
        let job = {
            let _rolling = self.jobs_lock.lock().await;
            let job_id = id.to_owned();
            let Some(job) = self.blocking(move |r| r.job(&job_id)).await? else {
                return Ok(None);
            };
            match job.status {
                JobStatus::Running => self.finish_job(id, JobStatus::Aborted).await?,
                // Asked again (an earlier sweep may have failed halfway): sweep again.
                JobStatus::Aborted => Some(job),
                JobStatus::Completed => return Ok(Some(job)),
            }
        };
        for status in [CommandStatus::Queued, CommandStatus::Sent] {
            let mut after: Option<String> = None;
            loop {
                let (job_id, from) = (id.to_owned(), after.clone());
                let page = self
                    .blocking(move |r| r.job_commands(&job_id, Some(status), from.as_deref(), 500))
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for command in page {
                    // One that expired meanwhile stays as it ends.
                    self.cancel(&command.device, &command.id).await?;
                }
            }
        }
        Ok(job)
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, DeviceError> {
        let id = id.to_owned();
        self.blocking(move |r| r.job(&id)).await
    }

    pub async fn jobs(
        &self,
        status: Option<JobStatus>,
        before: Option<String>,
        limit: usize,
    ) -> Result<Vec<Job>, DeviceError> {
        self.blocking(move |r| r.jobs(status, before.as_deref(), limit))
            .await
    }

    /// The job's commands by status.
    pub async fn job_counts(
        &self,
        id: &str,
    ) -> Result<std::collections::BTreeMap<CommandStatus, u64>, DeviceError> {
        let id = id.to_owned();
        self.blocking(move |r| r.job_counts(&id)).await
    }

    /// The job's commands (oldest first), of one status when given, after a command.
    pub async fn job_commands(
        &self,
        id: &str,
        status: Option<CommandStatus>,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<tellus_core::Command>, DeviceError> {
        let id = id.to_owned();
        self.blocking(move |r| r.job_commands(&id, status, after.as_deref(), limit))
            .await
    }
}
