//! The workers: threads that each own one session, fed from one bounded queue.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use petrel::{Completion, Model, Session, SessionParams};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{Prompt, Request};

/// What a worker reports about one job, in order: pieces of text, then one `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A piece of the reply.
    Text(String),
    /// The reply ended.
    Done(Completion),
    /// The request failed before any text.
    Failed(petrel::Error),
}

/// One request waiting for a worker.
pub struct Job {
    /// What to compute.
    pub request: Request,
    /// Where the events go; a closed channel (the client left) cancels the job.
    pub events: UnboundedSender<Event>,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full (answer 429).
    Full,
    /// Every worker has stopped (a bug; answer 500).
    Stopped,
}

/// A fixed set of workers behind a bounded queue.
pub struct Pool {
    queue: SyncSender<Job>,
}

impl Pool {
    /// Starts `workers` threads, each with its own session of `model` made with
    /// `params`, and a queue holding up to `queue` waiting jobs.
    pub fn start(model: &Model, params: &SessionParams, workers: usize, queue: usize) -> petrel::Result<Pool> {
        let (sender, receiver) = mpsc::sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..workers.max(1) {
            let session = model.session(params)?;
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("petrel-worker-{i}"))
                .spawn(move || work(session, &receiver))
                .map_err(|e| {
                    petrel::Error::new(petrel::ErrorKind::Internal, format!("cannot start a worker thread: {e}"))
                })?;
        }
        Ok(Pool { queue: sender })
    }

    /// Queues `job`, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Disconnected(_) => Refused::Stopped,
        })
    }
}

/// A worker's loop: one job at a time, each on an emptied session, so a reply depends on
/// its request alone.
fn work(mut session: Session, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let Ok(receiver) = jobs.lock() else { return };
            match receiver.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if job.events.is_closed() {
            continue;
        }
        session.reset();
        let events = &job.events;
        // A closed channel means the client went away: stop computing for it.
        let on_text = |text: &str| match text {
            "" => !events.is_closed(),
            _ => events.send(Event::Text(text.to_string())).is_ok(),
        };
        let sampling = &job.request.sampling;
        let result = match &job.request.prompt {
            Prompt::Chat(messages) => session.chat(messages, sampling, on_text),
            Prompt::Text(text) => session.generate(text, sampling, on_text),
        };
        let _ = match result {
            Ok(completion) => events.send(Event::Done(completion)),
            Err(e) => events.send(Event::Failed(e)),
        };
    }
}
