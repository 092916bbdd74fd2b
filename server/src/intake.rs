//! Where pushes wait for the pipeline. At most `limits.push_concurrency` pushes are in the
//! pipeline at once (resolving, recording, fanning out); the others wait in bounded queues,
//! one per lane and app:
//!
//! | lane | pushes | weight |
//! | --- | --- | --- |
//! | 0 | `priority: high` (realtime and notification) | 5 |
//! | 1 | `priority: normal` | 2 |
//! | 2 | `priority: low`, and every `marketing` push | 1 |
//!
//! One app holds at most `limits.push_concurrency_per_app` of the places, so a flood of
//! one app leaves places free for the others, and queues only so much work ahead of theirs
//! in the store (the embedded store's writer takes what waits for it by the same lanes and
//! apps). When a push leaves the pipeline, the next one is picked by smooth weighted round
//! robin over the lanes that have pushes waiting (of eight picks under a full backlog, five
//! go to lane 0, two to lane 1, one to lane 2), and by round robin over the apps waiting in
//! that lane: one app's backlog fills its own queues and takes its turn, so another app's
//! pushes wait for a turn, not for the backlog. A push finding its queue full (`limits.push_queue`
//! per app and lane; a quarter of it for lane 2, so marketing is shed first) or waiting
//! longer than `limits.push_queue_timeout` is refused (429 with `Retry-After`), and nothing
//! of it was accepted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pigeon_proto::device::Priority;
use tokio::sync::oneshot;

use crate::push::Class;

/// The weights of the lanes.
const WEIGHTS: [i64; 3] = [5, 2, 1];

/// The lane of a push.
pub fn lane(class: Class, priority: Priority) -> usize {
    match (class, priority) {
        (Class::Marketing, _) | (_, Priority::Low) => 2,
        (_, Priority::High) => 0,
        (_, Priority::Normal) => 1,
    }
}

/// Queues by lane and app, served by weight and in turn: the order of the intake, without
/// its locking and waking (a unit of its own, so its order can be tested exactly).
#[derive(Debug)]
pub struct WeightedQueues<T> {
    lanes: [LaneQueues<T>; 3],
    /// Smooth weighted round robin: each lane's running credit.
    credit: [i64; 3],
}

#[derive(Debug)]
struct LaneQueues<T> {
    /// Apps with something waiting, in turn order.
    turns: VecDeque<String>,
    waiting: HashMap<String, VecDeque<T>>,
}

impl<T> Default for LaneQueues<T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> Default for WeightedQueues<T> {
    fn default() -> Self {
        Self {
            lanes: Default::default(),
            credit: [0; 3],
        }
    }
}

impl<T> WeightedQueues<T> {
    /// How many wait in `lane` for `app`.
    pub fn len(&self, lane: usize, app: &str) -> usize {
        self.lanes[lane].waiting.get(app).map_or(0, VecDeque::len)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|lane| lane.turns.is_empty())
    }

    /// Queues `item` of `app` in `lane`.
    pub fn push(&mut self, lane: usize, app: &str, item: T) {
        let lane = &mut self.lanes[lane.min(2)];
        // A queue is removed when it empties, so one that is there has its turn.
        if let Some(queue) = lane.waiting.get_mut(app) {
            queue.push_back(item);
            return;
        }
        lane.turns.push_back(app.to_owned());
        lane.waiting.insert(app.to_owned(), VecDeque::from([item]));
    }

    /// The next item: of the lane whose turn it is by weight, of the app whose turn it is
    /// in that lane.
    pub fn pop(&mut self) -> Option<T> {
        self.pop_eligible(|_| true)
    }

    /// Whether an app `eligible` says may go has something waiting.
    pub fn any_eligible(&self, eligible: impl Fn(&str) -> bool) -> bool {
        self.lanes
            .iter()
            .any(|lane| lane.turns.iter().any(|app| eligible(app)))
    }

    /// [`WeightedQueues::pop`] among the apps `eligible` says may go (the others keep
    /// their place in their lanes' turns).
    pub fn pop_eligible(&mut self, eligible: impl Fn(&str) -> bool) -> Option<T> {
        self.pop_eligible_with_app(eligible).map(|(item, _)| item)
    }

    /// [`WeightedQueues::pop_eligible`], and whose item it is.
    pub fn pop_eligible_with_app(
        &mut self,
        eligible: impl Fn(&str) -> bool,
    ) -> Option<(T, String)> {
        let busy: Vec<usize> = (0..3)
            .filter(|&i| self.lanes[i].turns.iter().any(|app| eligible(app)))
            .collect();
        let total: i64 = busy.iter().map(|&i| WEIGHTS[i]).sum();
        let mut best = *busy.first()?;
        for &i in &busy {
            self.credit[i] += WEIGHTS[i];
            if self.credit[i] > self.credit[best] {
                best = i;
            }
        }
        self.credit[best] -= total;
        let lane = &mut self.lanes[best];
        let turn = lane.turns.iter().position(|app| eligible(app))?;
        let app = lane.turns.remove(turn)?;
        let queue = lane.waiting.get_mut(&app)?;
        let item = queue.pop_front()?;
        if queue.is_empty() {
            lane.waiting.remove(&app);
        } else {
            lane.turns.push_back(app.clone());
        }
        // An idle lane keeps no credit: a burst after a quiet spell starts even.
        for (i, credit) in self.credit.iter_mut().enumerate() {
            if self.lanes[i].turns.is_empty() {
                *credit = 0;
            }
        }
        Some((item, app))
    }
}

/// The gate in front of the pipeline.
pub struct Intake {
    concurrency: usize,
    per_app: usize,
    queue: usize,
    timeout: Duration,
    state: Mutex<State>,
}

struct State {
    running: usize,
    /// Places held per app (apps holding none are not kept).
    by_app: HashMap<String, usize>,
    queues: WeightedQueues<oneshot::Sender<Permit>>,
}

impl State {
    fn held(&self, app: &str) -> usize {
        self.by_app.get(app).copied().unwrap_or(0)
    }

    fn take(&mut self, app: &str) {
        self.running += 1;
        *self.by_app.entry(app.to_owned()).or_default() += 1;
    }
}

/// A place in the pipeline; the next push waiting gets it when this is dropped.
pub struct Permit {
    intake: Option<Arc<Intake>>,
    app: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(intake) = self.intake.take() {
            intake.release(&self.app);
        }
    }
}

/// A push refused because its queue is full or it waited too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shed;

impl Intake {
    /// `concurrency` pushes in the pipeline at once, `per_app` of one app; `queue` waiting
    /// per app and lane (a quarter of it in lane 2), each for at most `timeout`.
    pub fn new(concurrency: usize, per_app: usize, queue: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            concurrency: concurrency.max(1),
            per_app: per_app.max(1),
            queue: queue.max(1),
            timeout,
            state: Mutex::new(State {
                running: 0,
                by_app: HashMap::new(),
                queues: WeightedQueues::default(),
            }),
        })
    }

    /// Pushes waiting, for metrics.
    pub fn waiting(&self) -> usize {
        self.state.lock().map_or(0, |state| {
            state
                .queues
                .lanes
                .iter()
                .map(|lane| lane.waiting.values().map(VecDeque::len).sum::<usize>())
                .sum()
        })
    }

    /// A place in the pipeline for a push of `app` in `lane`, now or after those before it.
    /// With `bounded`, refused when its queue is full or its wait too long; without (a
    /// scheduled push that is due: accepted already), it waits its turn however long.
    pub async fn enter(
        self: &Arc<Self>,
        app: &str,
        lane: usize,
        bounded: bool,
    ) -> Result<Permit, Shed> {
        let rx = {
            let mut state = self.state.lock().map_err(|_| Shed)?;
            let free = |state: &State, app: &str| state.held(app) < self.per_app;
            // A free place goes now, unless a push that may take it waits already.
            if state.running < self.concurrency
                && free(&state, app)
                && !state.queues.any_eligible(|waiting| free(&state, waiting))
            {
                state.take(app);
                return Ok(Permit {
                    intake: Some(self.clone()),
                    app: app.to_owned(),
                });
            }
            let room = if lane >= 2 {
                self.queue.div_ceil(4)
            } else {
                self.queue
            };
            if bounded && state.queues.len(lane, app) >= room {
                return Err(Shed);
            }
            let (tx, rx) = oneshot::channel();
            state.queues.push(lane, app, tx);
            rx
        };
        if bounded {
            // A sender whose receiver timed out is skipped when its turn comes.
            tokio::time::timeout(self.timeout, rx)
                .await
                .map_err(|_| Shed)?
                .map_err(|_| Shed)
        } else {
            rx.await.map_err(|_| Shed)
        }
    }

    fn release(self: &Arc<Self>, app: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.running = state.running.saturating_sub(1);
        match state.by_app.get_mut(app) {
            Some(held) if *held > 1 => *held -= 1,
            _ => {
                state.by_app.remove(app);
            }
        }
        // The freed place (and any other free one) goes to the next pushes whose apps may
        // take one.
        while state.running < self.concurrency {
            let per_app = self.per_app;
            let State { queues, by_app, .. } = &mut *state;
            let eligible = |waiting: &str| by_app.get(waiting).copied().unwrap_or(0) < per_app;
            let Some((waiter, next)) = queues.pop_eligible_with_app(eligible) else {
                return;
            };
            let permit = Permit {
                intake: Some(self.clone()),
                app: next.clone(),
            };
            match waiter.send(permit) {
                Ok(()) => state.take(&next),
                // Gave up waiting: the place goes to the next one.
                Err(mut permit) => permit.intake = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app at its share of the places waits while another app takes a free one.
    #[tokio::test]
    async fn one_app_holds_at_most_its_share() {
        let intake = Intake::new(4, 2, 16, Duration::from_secs(5));
        let first = intake.enter("flood", 2, true).await.expect("place");
        let second = intake.enter("flood", 2, true).await.expect("place");
        let third = tokio::spawn({
            let intake = intake.clone();
            async move { intake.enter("flood", 2, true).await.map(drop) }
        });
        while intake.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        // Two places are free, but not for the flood; another app takes one at once.
        let quiet = intake.enter("quiet", 1, true).await.expect("a free place");
        assert_eq!(intake.waiting(), 1);
        drop(first);
        assert_eq!(third.await.expect("join"), Ok(()));
        drop((second, quiet));
        assert_eq!(intake.waiting(), 0);
    }

    /// Under a full backlog in every lane, eight picks give five, two and one.
    #[test]
    fn lanes_are_served_five_two_one() {
        let mut queues = WeightedQueues::default();
        for n in 0..40 {
            for lane in 0..3 {
                queues.push(lane, "a", (lane, n));
            }
        }
        let picks: Vec<usize> = (0..16).map(|_| queues.pop().expect("item").0).collect();
        for window in picks.chunks(8) {
            let count = |lane| window.iter().filter(|&&l| l == lane).count();
            assert_eq!((count(0), count(1), count(2)), (5, 2, 1), "{picks:?}");
        }
        // Smooth: lane 0 never goes more than three times in a row here.
        assert_eq!(&picks[..8], &[0, 1, 0, 0, 2, 0, 1, 0], "{picks:?}");
    }

    /// In one lane, apps take turns: a backlog of one app does not hold another's back.
    #[test]
    fn apps_take_turns_in_a_lane() {
        let mut queues = WeightedQueues::default();
        for n in 0..100 {
            queues.push(2, "flood", n);
        }
        queues.push(2, "quiet", 1000);
        queues.push(2, "quiet", 1001);
        let first: Vec<i32> = (0..4).map(|_| queues.pop().expect("item")).collect();
        assert_eq!(first, [0, 1000, 1, 1001]);
        assert_eq!(queues.len(2, "quiet"), 0);
        assert_eq!(queues.len(2, "flood"), 98);
    }

    /// Only waiting lanes share: alone, a lane gets every pick, and a lane that comes back
    /// starts without stale credit.
    #[test]
    fn an_idle_lane_keeps_no_credit() {
        let mut queues = WeightedQueues::default();
        for n in 0..10 {
            queues.push(2, "a", n);
        }
        for n in 0..10 {
            assert_eq!(queues.pop(), Some(n));
        }
        assert_eq!(queues.pop(), None);
        queues.push(0, "a", 100);
        queues.push(2, "a", 200);
        assert_eq!(queues.pop(), Some(100));
    }

    #[tokio::test]
    async fn a_full_queue_sheds_and_a_freed_place_goes_by_weight() {
        let intake = Intake::new(1, 1, 4, Duration::from_secs(5));
        let running = intake.enter("a", 1, true).await.expect("free place");
        // Lane 2 holds a quarter of the queue: one.
        let low = tokio::spawn({
            let intake = intake.clone();
            async move { intake.enter("a", 2, true).await.map(drop) }
        });
        tokio::task::yield_now().await;
        while intake.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(intake.enter("a", 2, true).await.err(), Some(Shed));
        // Another app has its own queue.
        let other = tokio::spawn({
            let intake = intake.clone();
            async move { intake.enter("b", 2, true).await.map(drop) }
        });
        let high = tokio::spawn({
            let intake = intake.clone();
            async move { intake.enter("a", 0, true).await.map(drop) }
        });
        while intake.waiting() < 3 {
            tokio::task::yield_now().await;
        }
        drop(running);
        assert_eq!(high.await.expect("join"), Ok(()));
        assert_eq!(low.await.expect("join"), Ok(()));
        assert_eq!(other.await.expect("join"), Ok(()));
        assert_eq!(intake.waiting(), 0);
    }

    #[tokio::test]
    async fn a_push_waits_no_longer_than_the_timeout() {
        let intake = Intake::new(1, 1, 4, Duration::from_millis(100));
        let running = intake.enter("a", 1, true).await.expect("free place");
        let waited = intake.enter("a", 1, true).await;
        assert_eq!(waited.err(), Some(Shed));
        // Its place is skipped: the next one gets the freed place.
        let next = tokio::spawn({
            let intake = intake.clone();
            async move { intake.enter("a", 1, true).await.map(drop) }
        });
        while intake.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(running);
        assert_eq!(next.await.expect("join"), Ok(()));
    }
}
