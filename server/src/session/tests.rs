//! The session state machine, driven with fake time and no sockets.

use super::*;
use crate::message::Message;
use bytes::Bytes;
use pigeon_proto::device::{Ack, Priority};

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        handshake_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(75),
        ack_window: 3,
    })
}

fn admission(acked: u64, highest: u64, client_last: u64) -> Admission {
    Admission {
        device_token: "tok".into(),
        resumed: true,
        app: "demo".into(),
        acked_seq: acked,
        highest_seq: highest,
        client_last_seq: client_last,
        all: StreamPlace {
            epoch: 7,
            ..StreamPlace::default()
        },
        client_all: None,
        tags: crate::store::DeviceTags::default(),
    }
}

fn delivery(seq: u64) -> Delivery {
    Delivery {
        seq,
        message: Arc::new(Message {
            pace_ms: 0,
            id: format!("m{seq}"),
            payload: Bytes::from_static(b"{}"),
            priority: Priority::Normal,
            class: Default::default(),
            accepted_at_ms: 1,
            expires_at_ms: 1_000_000,
            collapse_key: String::new(),
            filter: None,
        }),
    }
}

/// What an ack came to: the seq to persist, and the ids of the messages it acknowledged.
fn acked(outcome: Result<FrameOutcome, SessionError>) -> (Option<u64>, Vec<String>) {
    match outcome {
        Ok(FrameOutcome::Acked { seq, messages }) => (
            seq,
            messages.iter().map(|message| message.id.clone()).collect(),
        ),
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn ids(seqs: &[u64]) -> Vec<String> {
    seqs.iter().map(|seq| format!("m{seq}")).collect()
}

fn ack(seq: u64) -> ClientFrame {
    ClientFrame {
        kind: Some(client_frame::Kind::Ack(Ack {
            seq,
            ..Ack::default()
        })),
    }
}

fn pushed_seq(frame: &ServerFrame) -> u64 {
    match &frame.kind {
        Some(server_frame::Kind::Push(push)) => push.seq,
        other => panic!("expected a push, got {other:?}"),
    }
}

/// A session that has replayed an empty store and is caught up.
fn live_session(now: Instant) -> Session {
    let (mut session, _, _) = Session::start(now, &admission(0, 0, 0), config());
    let request = session
        .refill()
        .expect("a new session reads the store first");
    assert_eq!(request, Refill { after: 0, limit: 3 });
    assert!(session.handle_refill(&[], false).is_empty());
    session
}

#[test]
fn handshake_accepts_only_hello_before_its_deadline() {
    let now = Instant::now();
    let handshake = Handshake::new(now, &config());
    assert_eq!(handshake.deadline(), now + Duration::from_secs(5));
    assert!(
        handshake
            .handle_timeout(now + Duration::from_secs(4))
            .is_ok()
    );
    assert_eq!(
        handshake.handle_timeout(now + Duration::from_secs(5)),
        Err(SessionError::HandshakeTimeout)
    );
    assert_eq!(
        handshake.handle_frame(ack(1)).map(|_| ()),
        Err(SessionError::Protocol("the first frame must be Hello"))
    );
    let hello = ClientFrame {
        kind: Some(client_frame::Kind::Hello(Hello {
            credential: "jwt".into(),
            ..Hello::default()
        })),
    };
    assert_eq!(
        handshake.handle_frame(hello).map(|hello| hello.credential),
        Ok("jwt".into())
    );
}

#[test]
fn welcome_and_replay_start_after_what_the_device_processed() {
    let now = Instant::now();
    // The store knows ack 2 of 9 assigned; the device says it processed 5.
    let (session, welcome, persist) = Session::start(now, &admission(2, 9, 5), config());
    assert_eq!(persist.seq, Some(5));
    match welcome.kind {
        Some(server_frame::Kind::Welcome(welcome)) => {
            assert_eq!(welcome.acked_seq, 5);
            assert!(welcome.resumed);
            assert_eq!(welcome.heartbeat_ms, 30_000);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    assert_eq!(session.refill(), Some(Refill { after: 5, limit: 3 }));
}

#[test]
fn a_device_cannot_claim_seqs_never_assigned_nor_keep_them_across_a_new_token() {
    let now = Instant::now();
    let (session, _, persist) = Session::start(now, &admission(2, 4, 100), config());
    assert_eq!(session.last_acked(), 4);
    assert_eq!(persist.seq, Some(4));
    let mut fresh = admission(0, 0, 100);
    fresh.resumed = false;
    let (session, _, persist) = Session::start(now, &fresh, config());
    assert_eq!(session.last_acked(), 0);
    assert_eq!(persist.seq, None);
}

#[test]
fn replay_is_in_order_and_bounded_by_the_window() {
    let now = Instant::now();
    let (mut session, _, _) = Session::start(now, &admission(0, 5, 0), config());
    let request = session.refill().expect("refill");
    let rows: Vec<_> = (1..=3).map(delivery).collect();
    let frames = session.handle_refill(&rows, true);
    assert_eq!(frames.iter().map(pushed_seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(request.limit, 3);
    // Window full: no refill, and live pushes wait in the store.
    assert_eq!(session.refill(), None);
    assert_eq!(session.handle_push(&delivery(6)), PushDecision::Deferred);
    // A cumulative ack of 2 frees two slots.
    assert_eq!(
        acked(session.handle_frame(now, ack(2))),
        (Some(2), ids(&[1, 2]))
    );
    assert_eq!(session.refill(), Some(Refill { after: 3, limit: 2 }));
    let frames = session.handle_refill(&[delivery(4), delivery(6)], false);
    assert_eq!(frames.iter().map(pushed_seq).collect::<Vec<_>>(), [4, 6]);
    assert_eq!(session.refill(), None);
}

#[test]
fn live_pushes_flow_once_caught_up_and_duplicates_are_dropped() {
    let now = Instant::now();
    let mut session = live_session(now);
    match session.handle_push(&delivery(1)) {
        PushDecision::Send(frame) => assert_eq!(pushed_seq(&frame), 1),
        other => panic!("expected send, got {other:?}"),
    }
    assert_eq!(session.handle_push(&delivery(1)), PushDecision::Duplicate);
    assert!(matches!(
        session.handle_push(&delivery(2)),
        PushDecision::Send(_)
    ));
    assert_eq!(session.last_sent(), 2);
}

#[test]
fn a_live_push_that_overtook_another_sends_the_session_to_the_store() {
    let now = Instant::now();
    let mut session = live_session(now);
    assert!(matches!(
        session.handle_push(&delivery(1)),
        PushDecision::Send(_)
    ));
    // Seq 3 arrives before seq 2: it must not be sent first.
    assert_eq!(session.handle_push(&delivery(3)), PushDecision::Deferred);
    assert_eq!(session.handle_push(&delivery(2)), PushDecision::Deferred);
    assert_eq!(session.refill(), Some(Refill { after: 1, limit: 2 }));
    let frames = session.handle_refill(&[delivery(2), delivery(3)], false);
    assert_eq!(frames.iter().map(pushed_seq).collect::<Vec<_>>(), [2, 3]);
    // Caught up again: the next live push flows directly.
    assert_eq!(
        acked(session.handle_frame(now, ack(3))),
        (Some(3), ids(&[1, 2, 3]))
    );
    assert!(matches!(
        session.handle_push(&delivery(4)),
        PushDecision::Send(_)
    ));
}

#[test]
fn a_full_window_or_a_dropped_live_push_switches_to_the_store() {
    let now = Instant::now();
    let mut session = live_session(now);
    for seq in 1..=3 {
        assert!(matches!(
            session.handle_push(&delivery(seq)),
            PushDecision::Send(_)
        ));
    }
    assert_eq!(session.handle_push(&delivery(4)), PushDecision::Deferred);
    assert_eq!(
        acked(session.handle_frame(now, ack(3))),
        (Some(3), ids(&[1, 2, 3]))
    );
    // Seq 5 arrives live, but 4 is only in the store: 5 must wait so order holds.
    assert_eq!(session.handle_push(&delivery(5)), PushDecision::Deferred);
    assert_eq!(session.refill(), Some(Refill { after: 3, limit: 3 }));
    let frames = session.handle_refill(&[delivery(4), delivery(5)], false);
    assert_eq!(frames.iter().map(pushed_seq).collect::<Vec<_>>(), [4, 5]);
    // A queue overflow reported by the node also sends the session to the store.
    session.fall_behind();
    assert_eq!(session.handle_push(&delivery(6)), PushDecision::Deferred);
    assert_eq!(session.refill(), Some(Refill { after: 5, limit: 1 }));
}

#[test]
fn acks_are_cumulative_and_checked() {
    let now = Instant::now();
    let mut session = live_session(now);
    for seq in [1, 2] {
        assert!(matches!(
            session.handle_push(&delivery(seq)),
            PushDecision::Send(_)
        ));
    }
    assert_eq!(
        acked(session.handle_frame(now, ack(2))),
        (Some(2), ids(&[1, 2]))
    );
    // An old ack is harmless; an ack ahead of what was sent is a protocol error.
    assert_eq!(session.handle_frame(now, ack(1)), Ok(FrameOutcome::Nothing));
    assert_eq!(
        session.handle_frame(now, ack(7)),
        Err(SessionError::Protocol("an ack for a push never sent"))
    );
}

#[test]
fn heartbeats_ping_a_silent_device_then_close_it() {
    let start = Instant::now();
    let mut session = live_session(start);
    assert_eq!(session.deadline(), start + Duration::from_secs(30));
    assert_eq!(
        session.handle_timeout(start + Duration::from_secs(29)),
        Ok(None)
    );
    let ping = session
        .handle_timeout(start + Duration::from_secs(30))
        .expect("alive");
    assert!(matches!(
        ping.map(|frame| frame.kind),
        Some(Some(server_frame::Kind::Ping(_)))
    ));
    // Not pinged again until another interval has passed; closed at the idle deadline.
    assert_eq!(session.deadline(), start + Duration::from_secs(60));
    assert_eq!(
        session.handle_timeout(start + Duration::from_secs(31)),
        Ok(None)
    );
    assert!(matches!(
        session.handle_timeout(start + Duration::from_secs(60)),
        Ok(Some(_))
    ));
    assert_eq!(session.deadline(), start + Duration::from_secs(75));
    assert_eq!(
        session.handle_timeout(start + Duration::from_secs(75)),
        Err(SessionError::IdleTimeout)
    );
}

#[test]
fn any_frame_from_the_device_keeps_it_alive() {
    let start = Instant::now();
    let mut session = live_session(start);
    let pong = ClientFrame {
        kind: Some(client_frame::Kind::Pong(Pong { nonce: 0 })),
    };
    let later = start + Duration::from_secs(70);
    assert_eq!(session.handle_frame(later, pong), Ok(FrameOutcome::Nothing));
    assert_eq!(
        session.handle_timeout(start + Duration::from_secs(80)),
        Ok(None)
    );
    assert_eq!(session.deadline(), later + Duration::from_secs(30));
}

#[test]
fn a_device_ping_is_answered_and_a_second_hello_refused() {
    let now = Instant::now();
    let mut session = live_session(now);
    let ping = ClientFrame {
        kind: Some(client_frame::Kind::Ping(Ping { nonce: 7 })),
    };
    assert_eq!(
        session.handle_frame(now, ping),
        Ok(FrameOutcome::Send(ServerFrame {
            kind: Some(server_frame::Kind::Pong(Pong { nonce: 7 }))
        }))
    );
    let hello = ClientFrame {
        kind: Some(client_frame::Kind::Hello(Hello::default())),
    };
    assert_eq!(
        session.handle_frame(now, hello).map_err(|e| e.close_code()),
        Err(CloseCode::ProtocolError)
    );
}

/// A live push lost on its way (a Deliver call that timed out) is in the store only; the
/// next heartbeat makes a connected session read the store again and send it.
#[test]
fn a_heartbeat_reads_the_store_again_for_pushes_lost_on_the_way() {
    let start = Instant::now();
    let mut session = live_session(start);
    assert_eq!(session.refill(), None, "caught up: no read while idle");
    let ping = session
        .handle_timeout(start + Duration::from_secs(30))
        .expect("alive");
    assert!(ping.is_some());
    let request = session
        .refill()
        .expect("the heartbeat asks for a store read");
    assert_eq!(request, Refill { after: 0, limit: 3 });
    let frames = session.handle_refill(&[delivery(1)], false);
    assert_eq!(frames.iter().map(pushed_seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(session.refill(), None, "caught up again");
}

fn shared(offset: u64) -> SharedDelivery {
    SharedDelivery {
        stream: ALL,
        epoch: 7,
        offset,
        message: delivery(offset).message,
    }
}

fn pushed_offset(frame: &ServerFrame) -> (u64, String, u64) {
    match &frame.kind {
        Some(server_frame::Kind::Push(push)) => (push.seq, push.stream.clone(), push.offset),
        other => panic!("expected a push, got {other:?}"),
    }
}

fn stream_ack(offset: u64) -> ClientFrame {
    ClientFrame {
        kind: Some(client_frame::Kind::Ack(Ack {
            seq: 0,
            stream: ALL.into(),
            offset,
        })),
    }
}

fn welcome_stream(welcome: &ServerFrame) -> pigeon_proto::device::StreamState {
    match &welcome.kind {
        Some(server_frame::Kind::Welcome(welcome)) => welcome.streams[0].clone(),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// An admission whose store place in `all` is `acked` of `head`, trimmed up to `trimmed`.
fn placed(acked: u64, head: u64, trimmed: u64, client: Option<(u64, u64)>) -> Admission {
    let mut admission = admission(0, 0, 0);
    admission.all = StreamPlace {
        epoch: 7,
        acked,
        head,
        trimmed,
        epoch_changed: false,
    };
    admission.client_all = client;
    admission
}

#[test]
fn welcome_says_where_the_device_stands_in_the_stream_and_whether_it_is_whole() {
    let now = Instant::now();
    // The device processed 6 of the current epoch, the store knew 4: it starts after 6.
    let (session, welcome, acks) = Session::start(now, &placed(4, 9, 0, Some((7, 6))), config());
    let state = welcome_stream(&welcome);
    assert_eq!(
        (state.stream.as_str(), state.offset, state.recovered),
        ("all", 6, true)
    );
    assert_eq!(state.epoch, epoch_text(7));
    assert_eq!(acks.all, Some(6));
    assert_eq!(session.refill_stream(), Some(Refill { after: 6, limit: 3 }));
    // It cannot claim offsets the stream never had.
    let (_, welcome, _) = Session::start(now, &placed(4, 9, 0, Some((7, 50))), config());
    assert_eq!(welcome_stream(&welcome).offset, 9);
    // Another epoch: the store's place, and not recovered.
    let (_, welcome, acks) = Session::start(now, &placed(4, 9, 0, Some((8, 6))), config());
    let state = welcome_stream(&welcome);
    assert_eq!((state.offset, state.recovered), (4, false));
    assert_eq!(acks.all, None);
    // Entries it had not read were trimmed by the stream's cap: not recovered.
    let (_, welcome, _) = Session::start(now, &placed(4, 9, 5, Some((7, 4))), config());
    assert!(!welcome_stream(&welcome).recovered);
    // A fresh install presents nothing: nothing to recover.
    let (_, welcome, _) = Session::start(now, &placed(9, 9, 5, None), config());
    assert!(welcome_stream(&welcome).recovered);
    // A device that lost its token but had a place cannot be proven whole.
    let mut lost = placed(9, 9, 0, Some((7, 3)));
    lost.resumed = false;
    let (_, welcome, _) = Session::start(now, &lost, config());
    let state = welcome_stream(&welcome);
    assert_eq!((state.offset, state.recovered), (9, false));
}

#[test]
fn the_stream_lane_sends_in_order_and_reads_the_store_for_gaps() {
    let now = Instant::now();
    let (mut session, _, _) = Session::start(now, &placed(2, 2, 0, None), config());
    // Caught up with the store first (nothing after 2).
    let request = session.refill_stream().expect("a first read of the stream");
    assert_eq!(request.after, 2);
    assert!(
        session
            .handle_stream_refill(&[], false, everyone)
            .frames
            .is_empty()
    );
    let PushDecision::Send(frame) = session.handle_shared_push(&shared(3)) else {
        panic!("the next offset goes out live");
    };
    assert_eq!(pushed_offset(&frame), (0, "all".into(), 3));
    assert_eq!(
        session.handle_shared_push(&shared(3)),
        PushDecision::Duplicate
    );
    // Offset 5 overtook 4: the store is read from 3 on.
    assert_eq!(
        session.handle_shared_push(&shared(5)),
        PushDecision::Deferred
    );
    assert_eq!(session.refill_stream(), Some(Refill { after: 3, limit: 2 }));
    let entries: Vec<(u64, Arc<Message>)> = [4, 5]
        .into_iter()
        .map(|offset| (offset, delivery(offset).message))
        .collect();
    let frames = session
        .handle_stream_refill(&entries, false, everyone)
        .frames;
    let offsets: Vec<u64> = frames.iter().map(|frame| pushed_offset(frame).2).collect();
    assert_eq!(offsets, [4, 5]);
    // The direct lane is a lane of its own.
    assert_eq!(session.last_sent(), 0);
    // A stream's acks are persisted lazily: at the next heartbeat or the end. The
    // messages they acknowledge are counted at once.
    assert_eq!(
        acked(session.handle_frame(now, stream_ack(5))),
        (None, ids(&[3, 4, 5]))
    );
    assert_eq!(session.stream_to_persist(), Some((7, 5)));
    assert_eq!(session.stream_to_persist(), None, "persisted already");
    assert_eq!(
        session.handle_frame(now, stream_ack(4)),
        Ok(FrameOutcome::Nothing)
    );
    assert_eq!(
        session.handle_frame(now, stream_ack(9)),
        Err(SessionError::Protocol("an ack for a push never sent"))
    );
    let unknown = ClientFrame {
        kind: Some(client_frame::Kind::Ack(Ack {
            seq: 0,
            stream: "news".into(),
            offset: 1,
        })),
    };
    assert_eq!(
        session.handle_frame(now, unknown),
        Err(SessionError::Protocol("an ack for an unknown stream"))
    );
}

fn everyone(_offset: u64, _message: &Message) -> Match {
    Match::For
}

#[test]
fn entries_not_for_the_device_are_passed_over_and_count_as_acknowledged() {
    let now = Instant::now();
    let (mut session, _, _) = Session::start(now, &placed(2, 2, 0, None), config());
    // The connection table had handed the stream out to 4 when the connection registered.
    session.set_stream_floor(4);
    // The store holds 3 (for the device), 4 and 5 (not for it).
    let entries: Vec<(u64, Arc<Message>)> = [3, 4, 5]
        .into_iter()
        .map(|offset| (offset, delivery(offset).message))
        .collect();
    let only_3 = |offset: u64, _: &Message| match offset {
        3 => Match::For,
        _ => Match::NotFor,
    };
    let frames = session.handle_stream_refill(&entries, false, only_3).frames;
    let offsets: Vec<u64> = frames.iter().map(|frame| pushed_offset(frame).2).collect();
    assert_eq!(offsets, [3]);
    assert_eq!(session.stream_sent(), 5);
    // Acknowledging 3 acknowledges the two passed over after it (only 3 was sent).
    assert_eq!(
        acked(session.handle_frame(now, stream_ack(3))),
        (None, ids(&[3]))
    );
    assert_eq!(session.stream_to_persist(), Some((7, 5)));
    // Above the floor, live entries need not follow each other: 6 and 7 were not for it.
    let PushDecision::Send(frame) = session.handle_shared_push(&shared(8)) else {
        panic!("an entry above the floor goes out live");
    };
    assert_eq!(pushed_offset(&frame).2, 8);
    assert_eq!(session.stream_to_persist(), None, "8 is in flight");
    assert_eq!(
        acked(session.handle_frame(now, stream_ack(8))),
        (None, ids(&[8]))
    );
    assert_eq!(session.stream_to_persist(), Some((7, 8)));
    // A page of entries none of which is for the device moves its place on, persisted at
    // the next heartbeat.
    let later: Vec<(u64, Arc<Message>)> = [9, 10]
        .into_iter()
        .map(|offset| (offset, delivery(offset).message))
        .collect();
    session.fall_behind_stream();
    assert!(
        session
            .handle_stream_refill(&later, false, |_, _| Match::NotFor)
            .frames
            .is_empty()
    );
    assert_eq!(session.stream_to_persist(), Some((7, 10)));
    assert_eq!(session.stream_to_persist(), None);
}

#[test]
fn entries_that_skip_the_device_are_passed_over_and_reported_once() {
    let now = Instant::now();
    let (mut session, _, _) = Session::start(now, &placed(2, 2, 0, None), config());
    // The store holds 3 (for the device), 4 (its user opted out of it) and 5 (not for it).
    let entries: Vec<(u64, Arc<Message>)> = [3, 4, 5]
        .into_iter()
        .map(|offset| (offset, delivery(offset).message))
        .collect();
    let decide = |offset: u64, _: &Message| match offset {
        3 => Match::For,
        4 => Match::Skipped,
        _ => Match::NotFor,
    };
    let page = session.handle_stream_refill(&entries, false, decide);
    let offsets: Vec<u64> = page.frames.iter().map(|f| pushed_offset(f).2).collect();
    assert_eq!(offsets, [3]);
    let skipped: Vec<&str> = page.skipped.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(skipped, ["m4"]);
    assert_eq!(session.stream_sent(), 5);
    // Read again (behind once more): passed already, so neither sent nor counted again.
    session.fall_behind_stream();
    let again = session.handle_stream_refill(&entries, false, decide);
    assert!(again.frames.is_empty() && again.skipped.is_empty());
}

#[test]
fn below_the_floor_a_live_entry_must_follow_the_last_one_sent() {
    let now = Instant::now();
    let (mut session, _, _) = Session::start(now, &placed(2, 2, 0, None), config());
    session.set_stream_floor(10);
    assert!(
        session
            .handle_stream_refill(&[], false, everyone)
            .frames
            .is_empty()
    );
    assert_eq!(
        session.handle_shared_push(&shared(4)),
        PushDecision::Deferred,
        "3 may be on its way: read the store"
    );
}

#[test]
fn an_opened_report_is_counted_and_checked() {
    let now = Instant::now();
    let mut session = live_session(now);
    let opened = |id: String| ClientFrame {
        kind: Some(client_frame::Kind::Opened(pigeon_proto::device::Opened {
            message_id: id,
        })),
    };
    assert_eq!(
        session.handle_frame(now, opened("m1".into())),
        Ok(FrameOutcome::Opened("m1".into()))
    );
    assert_eq!(
        session.handle_frame(now, opened(String::new())),
        Ok(FrameOutcome::Nothing)
    );
    assert_eq!(
        session.handle_frame(now, opened("x".repeat(129))),
        Err(SessionError::Protocol("a message id over 128 bytes"))
    );
}
