//! Behind a load balancer: a real HAProxy in TCP mode sends the PROXY protocol (v2
//! and v1) to the real bastion, and real `ssh` clients bound to other loopback
//! addresses (`ssh -b 127.0.0.2`) connect through it. The audit log and the
//! lockouts must see those addresses, not HAProxy's 127.0.0.1; nobody else may
//! name a client; and a listed balancer without a valid header is refused.

pub mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A bastion that takes PROXY headers from 127.0.0.1 only, with `config` after
/// that line (e.g. a `[limits]` table).
fn balanced_world(config: &str) -> World {
    World::start_with(WorldOptions {
        extra_config: format!("proxy_protocol_from = [\"127.0.0.1\"]\n{config}"),
        ..WorldOptions::default()
    })
}

/// [`balanced_world`] and HAProxy on 127.0.0.1 in front of it with `server_options`.
fn behind_haproxy(server_options: &str, config: &str) -> (World, Haproxy) {
    let w = balanced_world(config);
    let haproxy = Haproxy::start(&w.path("haproxy"), &[w.bastion.port()], server_options);
    (w, haproxy)
}

/// `client` runs `echo hi` on the target through `port`, from `source`.
fn echo_from(w: &World, client: &Client, port: u16, source: &str) -> std::process::Output {
    client
        .via(port)
        .ssh_with(&w.target_user(), &["-b", source], &["echo", "hi"])
}

/// Every audit event, as the auditor dave reads them through `port` from `source`.
fn audit_events(w: &World, port: u16, source: &str) -> Vec<Value> {
    let out = w
        .dave
        .via(port)
        .ssh_with(CONTROL_USER, &["-b", source], &["audit", "--json"]);
    assert_success(&out, "audit --json through the balancer");
    text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

/// The `client` detail of every event of `kind` by `actor`.
fn clients_of(events: &[Value], kind: &str, actor: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["actor"] == actor)
        .map(|e| e["details"]["client"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The client's address in every event of alice's session, and HAProxy's nowhere.
fn assert_session_seen_from(events: &[Value], source: &str, w: &World) {
    for kind in ["auth.success", "session.start"] {
        let clients = clients_of(events, kind, USER);
        assert!(
            !clients.is_empty(),
            "no {kind} event of alice:\n{events:#?}"
        );
        for client in clients {
            assert!(
                client.starts_with(&format!("{source}:")),
                "{kind} shows {client}, not the client {source}\n{}",
                w.logs()
            );
        }
    }
}

#[test]
fn haproxy_send_proxy_v2_shows_the_real_client_to_the_audit_log_and_the_lockouts() {
    // One new failing key locks its source out as a whole.
    let (w, haproxy) = behind_haproxy("send-proxy-v2", "[limits]\npenalty_noauth = \"15s\"\n");
    let out = echo_from(&w, &w.alice, haproxy.port(), "127.0.0.2");
    assert_success(&out, "ssh -b 127.0.0.2 through HAProxy");
    assert_eq!(text(&out.stdout).trim(), "hi");

    // mallory's failure from 127.0.0.3 locks out 127.0.0.3, not HAProxy's address.
    let out = echo_from(&w, &w.mallory, haproxy.port(), "127.0.0.3");
    assert_failure_mentions(&out, "mallory's unknown key", &["Permission denied"]);
    let out = echo_from(&w, &w.mallory, haproxy.port(), "127.0.0.3");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        !text(&out.stderr).contains("Permission denied"),
        "refused at the door, before authentication: {}",
        describe(&out)
    );
    let out = echo_from(&w, &w.alice, haproxy.port(), "127.0.0.2");
    assert_success(&out, "alice from 127.0.0.2 while 127.0.0.3 is locked out");

    let events = audit_events(&w, haproxy.port(), "127.0.0.4");
    assert_session_seen_from(&events, "127.0.0.2", &w);
    let lockouts: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "preauth.lockout")
        .collect();
    assert_eq!(lockouts.len(), 1, "{lockouts:#?}\n{}", w.logs());
    assert_eq!(lockouts[0]["details"]["source"], "127.0.0.3");
    assert_eq!(lockouts[0]["details"]["key"], "any");
    let failures = clients_of(&events, "auth.failure", "-");
    assert!(
        !failures.is_empty() && failures.iter().all(|c| c.starts_with("127.0.0.3:")),
        "{failures:?}"
    );
    // The same address reaches the bastion's own log.
    assert!(w.bastion.log().contains("peer=127.0.0.3:"), "{}", w.logs());
}

#[test]
fn haproxy_send_proxy_v1_shows_the_real_client_too() {
    let (w, haproxy) = behind_haproxy("send-proxy", "");
    let out = echo_from(&w, &w.alice, haproxy.port(), "127.0.0.2");
    assert_success(&out, "ssh -b 127.0.0.2 through HAProxy (PROXY v1)");
    let events = audit_events(&w, haproxy.port(), "127.0.0.4");
    assert_session_seen_from(&events, "127.0.0.2", &w);
    assert!(
        haproxy.log().contains("127.0.0.2:"),
        "HAProxy relayed the client: {}",
        haproxy.log()
    );
}

#[test]
fn the_shipped_haproxy_cfg_relays_real_clients_and_its_health_checks_cost_nothing() {
    let w = balanced_world("");
    let shipped =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg"))
            .expect("read deploy/haproxy.cfg");
    let bastion = w.bastion.port();
    let haproxy = Haproxy::start_with(&w.path("shipped"), |port| {
        let config = shipped
            .replace("bind :22", &format!("bind 127.0.0.1:{port}"))
            .replace("127.0.0.1:2222", &format!("127.0.0.1:{bastion}"))
            .replace(" check\n", " check inter 100ms\n");
        assert!(config.contains(&format!("127.0.0.1:{bastion} send-proxy-v2 check inter")));
        config
    });
    let out = echo_from(&w, &w.alice, haproxy.port(), "127.0.0.2");
    assert_success(&out, "ssh through the shipped haproxy.cfg");
    let events = audit_events(&w, haproxy.port(), "127.0.0.2");
    assert_session_seen_from(&events, "127.0.0.2", &w);
    // Ten health checks (LOCAL headers, then a reset) later: none refused, charged
    // or logged as a failure.
    std::thread::sleep(Duration::from_secs(1));
    let log = w.bastion.log();
    let checks = log.matches("SSH handshake failed peer=127.0.0.1:").count();
    assert!(
        checks >= 5,
        "{checks} health checks reached the bastion\n{}",
        w.logs()
    );
    assert!(
        !log.contains("without a valid PROXY header")
            && !log.contains("locked out")
            && !log.contains(" WARN portcullis::server"),
        "{}",
        w.logs()
    );
}

#[test]
fn a_listed_balancer_without_a_header_is_refused_and_charged() {
    // One protocol error locks its source out, to show the charge.
    let (w, haproxy) = behind_haproxy("send-proxy-v2", "[limits]\npenalty_protocol = \"15s\"\n");
    // alice straight to the bastion from 127.0.0.1, which must send a header.
    let out = w.alice.ssh(&w.target_user(), &["echo", "hi"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let log = w.bastion.log();
    assert!(
        log.contains("came without a valid PROXY header")
            && log.contains("send-proxy-v2")
            && log.contains("penalty threshold reached; locked out source=127.0.0.1"),
        "{}",
        w.logs()
    );
    // The balancer's own lockout does not lock out the clients it relays.
    let out = echo_from(&w, &w.alice, haproxy.port(), "127.0.0.2");
    assert_success(&out, "alice through HAProxy after a headerless connection");
    let events = audit_events(&w, haproxy.port(), "127.0.0.2");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "preauth.lockout" && e["details"]["source"] == "127.0.0.1"),
        "{events:#?}"
    );
}

#[test]
fn an_unlisted_address_cannot_name_a_client() {
    // The balancer is 10.0.0.5; HAProxy connects from 127.0.0.2, not listed, and
    // names its client 127.0.0.3: to the bastion that is a bad SSH version line.
    for (version, options) in [
        ("v2", "send-proxy-v2 source 127.0.0.2"),
        ("v1", "send-proxy source 127.0.0.2"),
    ] {
        let w = World::start_with(WorldOptions {
            // One protocol error locks its source out, to show whom it is charged to.
            extra_config: "proxy_protocol_from = [\"10.0.0.5\"]\n\
                           [limits]\npenalty_protocol = \"15s\"\n"
                .into(),
            ..WorldOptions::default()
        });
        let forger = Haproxy::start(&w.path("haproxy"), &[w.bastion.port()], options);
        let out = echo_from(&w, &w.alice, forger.port(), "127.0.0.3");
        assert!(
            !out.status.success(),
            "a PROXY {version} header from an unlisted address was taken: {}\n{}",
            describe(&out),
            w.logs()
        );
        let log = w.bastion.log();
        assert!(
            log.contains("SSH handshake failed peer=127.0.0.2:") && !log.contains("127.0.0.3"),
            "{version}: {}",
            w.logs()
        );
        // The forger's own address is charged for it, and nothing in the audit
        // log names the claimed client.
        let audit = w.ok(&w.dave, &["audit", "--json"]);
        assert!(!audit.contains("127.0.0.3"), "{audit}");
        assert!(
            audit.contains(r#""kind":"preauth.lockout""#)
                && audit.contains(r#""source":"127.0.0.2""#),
            "{version}: {audit}\n{}",
            w.logs()
        );
    }
}

/// Sends `bytes` to the bastion from 127.0.0.1 (a listed balancer) and returns how
/// long the bastion took to close the connection, failing the test if it has not
/// closed within `limit`.
fn closed_within(w: &World, bytes: &[u8], limit: Duration) -> Duration {
    let mut stream = TcpStream::connect(("127.0.0.1", w.bastion.port())).expect("connect");
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    stream.write_all(bytes).expect("send");
    let mut answer = Vec::new();
    let result = stream.read_to_end(&mut answer);
    let elapsed = started.elapsed();
    assert!(
        result.is_ok() || elapsed < limit,
        "the bastion held the connection past {limit:?} ({result:?})\n{}",
        w.logs()
    );
    assert!(
        !text(&answer).contains("SSH-2.0"),
        "no SSH before a valid header: {answer:?}"
    );
    elapsed
}

#[test]
fn oversized_garbage_or_stalled_headers_are_refused_without_hanging() {
    let w =
        balanced_world("[limits]\nhandshake_timeout = \"2s\"\npenalty_exempt = [\"127.0.0.1\"]\n");
    // Declares 65535 bytes: refused from its first 16.
    let mut huge = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    huge.extend(std::iter::repeat_n(0u8, 4096));
    closed_within(&w, &huge, Duration::from_secs(10));
    closed_within(&w, b"SSH-2.0-OpenSSH_9.2p1\r\n", Duration::from_secs(10));
    let mut long_v1 = b"PROXY TCP4 ".to_vec();
    long_v1.extend(std::iter::repeat_n(b'7', 300));
    closed_within(&w, &long_v1, Duration::from_secs(10));
    // Half a header, then nothing: closed at handshake_timeout.
    closed_within(&w, b"PROXY TCP4 192.0.2.7 ", Duration::from_secs(10));
    // Half a header, then the balancer hangs up.
    let mut stream = TcpStream::connect(("127.0.0.1", w.bastion.port())).expect("connect");
    stream.write_all(b"PROXY TCP4 192.0.2.7").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = stream.read_to_end(&mut Vec::new());
    assert!(
        wait_until(Duration::from_secs(5), || w
            .bastion
            .log()
            .contains("closed in the middle of the PROXY header")),
        "{}",
        w.logs()
    );
    let log = w.bastion.log();
    for why in [
        "declares 65551 bytes, more than the 1024 accepted",
        "no valid PROXY header",
        "no PROXY header within 2s (limits.handshake_timeout)",
    ] {
        assert!(log.contains(why), "log lacks {why:?}:\n{}", w.logs());
    }
    // The bastion still serves a proper header after all that.
    let mut stream = TcpStream::connect(("127.0.0.1", w.bastion.port())).expect("connect");
    stream
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 50000 2222\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).expect("the SSH banner");
    assert_eq!(&banner, b"SSH-2.0-");
}
