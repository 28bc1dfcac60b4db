//! A device's identity over its life: revocation, disabling, deletion, takeover, certificate
//! validity, and the audit trail of every decision the edge made.

use std::time::Instant;

use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{certs, raw::RawDevice, Tellus};
use x509_parser::prelude::FromDer;

fn refused_not_authorized() -> Option<Packet> {
    Some(Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::NotAuthorized,
    }))
}

async fn try_connect(t: &Tellus, creds: &Credentials) -> Option<Packet> {
    let mut d = RawDevice::tls(t, creds).await;
    d.send(&Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(
        creds.id.as_str(),
    )))
    .await;
    d.recv().await
}

/// Waits for the server to close `d` and says how long that took.
async fn closed_after(d: &mut RawDevice, since: Instant) -> std::time::Duration {
    d.expect_closed(|_| false).await;
    since.elapsed()
}

/// The audit listing at `path` once it holds at least `n` entries: the trail is written in
/// the background, a moment after the decision.
async fn audit_with(t: &Tellus, path: &str, n: usize) -> Value {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, audit) = t.get(path).await;
        assert_eq!(status, 200, "{audit}");
        if audit["entries"].as_array().map_or(0, Vec::len) >= n {
            return audit;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} audit entries: {audit}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn post(t: &Tellus, path: &str) -> (u16, Value) {
    t.post(path, json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_disabling_and_deleting_close_live_connections() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);

    // Revoke: the live connection closes, and the certificate is refused from then on.
    let creds = t.create_device("rev").await;
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let since = Instant::now();
    let (status, body) = post(&t, "/api/v1/devices/rev/revoke").await;
    assert_eq!(status, 200, "{body}");
    let took = closed_after(&mut d, since).await;
    eprintln!("revocation closed the live connection after {took:?}");
    assert_eq!(try_connect(&t, &creds).await, refused_not_authorized());

    // Disable and enable again.
    let creds = t.create_device("dis").await;
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let since = Instant::now();
    assert_eq!(post(&t, "/api/v1/devices/dis/disable").await.0, 200);
    let took = closed_after(&mut d, since).await;
    eprintln!("disabling closed the live connection after {took:?}");
    assert_eq!(try_connect(&t, &creds).await, refused_not_authorized());
    assert_eq!(post(&t, "/api/v1/devices/dis/enable").await.0, 200);
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    d.send(&Packet::PingReq).await;
    assert_eq!(d.recv().await, Some(Packet::PingResp));

    // Delete: closed, refused, and its certificate is on the CRL.
    let creds = t.create_device("del").await;
    let (_, shown) = t.get("/api/v1/devices/del").await;
    let serial = shown["cert_serial"].as_str().unwrap().to_owned();
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let r = reqwest::Client::new()
        .delete(t.url("/api/v1/devices/del"))
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    d.expect_closed(|_| false).await;
    assert_eq!(try_connect(&t, &creds).await, refused_not_authorized());
    let crl = reqwest::Client::new()
        .get(t.url("/api/v1/pki/crl.pem"))
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(crl.as_bytes()).unwrap();
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&pem.contents).unwrap();
    assert!(
        crl.iter_revoked_certificates()
            .any(|r| r.serial().to_str_radix(16) == serial.trim_start_matches('0')),
        "the deleted device's certificate is on the CRL"
    );

    // Every decision is in the audit trail, with the reason.
    let audit = audit_with(&t, "/api/v1/audit?device=rev", 3).await;
    let reasons: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "the certificate is revoked",
            "closed by the gate: certificate revoked",
            "connected"
        ],
        "{audit}"
    );
    let newest = &audit["entries"][0];
    assert_eq!(newest["decision"], "refused");
    assert!(newest["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["closed_by_registry"], 3, "{stats}");
    assert_eq!(stats["gate"]["refused_revoked"], 1, "{stats}");
    // The deleted device is no longer known at all.
    assert_eq!(stats["gate"]["refused_unknown_device"], 1, "{stats}");
    assert_eq!(stats["gate"]["refused_disabled"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_revokes_a_device_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("cli").await;
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let out = tokio::process::Command::new(tellus_tests::tellus_bin())
        .args(["device", "revoke", "cli", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    d.expect_closed(|_| false).await;
    assert_eq!(try_connect(&t, &creds).await, refused_not_authorized());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("twin").await;
    let mut first = RawDevice::connected(&t, &creds, 30).await;
    let mut second = RawDevice::connected(&t, &creds, 30).await;
    first.expect_closed(|_| false).await;
    second.send(&Packet::PingReq).await;
    assert_eq!(second.recv().await, Some(Packet::PingResp));
    t.wait_for_log_line(&["device_id=twin", "taken over by a new connection"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("clock").await;
    let (fleet_ca, _) = certs::fleet_ca(&t.data_dir);
    let day = time::Duration::days(1);
    let now = time::OffsetDateTime::now_utc();
    for (not_before, not_after, expect) in [
        (now - day * 2, now - day, "certificate expired"),
        (now + day, now + day * 2, "certificate not valid yet"),
    ] {
        let wrong_time = certs::device_with(&fleet_ca, "clock", &creds.ca_pem, |p| {
            p.not_before = not_before;
            p.not_after = not_after;
        });
        let tcp = tokio::net::TcpStream::connect(t.mqtt_addr).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(wrong_time.tls_config().unwrap()));
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        // TLS 1.3 clients learn of the refusal on their first read.
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            assert!(
                !matches!(tls.read(&mut buf).await, Ok(n) if n > 0),
                "the server sent data to a client with an {expect} certificate"
            );
        }
        t.wait_for_log_line(&["TLS handshake refused", expect])
            .await;
    }
    let audit = audit_with(&t, "/api/v1/audit", 2).await;
    let reasons: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons[0].contains("certificate not valid yet")
            && reasons[1].contains("certificate expired"),
        "{audit}"
    );
}

/// Waits for the next PUBLISH on `events` and returns its payload as JSON.
async fn next_publish(events: &mut rumqttc::EventLoop) -> Value {
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no PUBLISH in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_rotates_its_certificate_over_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let old = t.create_device("rotor").await;
    let (_, shown) = t.get("/api/v1/devices/rotor").await;
    let old_serial = shown["cert_serial"].as_str().unwrap().to_owned();

    let (client, mut events) = rumqttc::AsyncClient::new(t.mqtt_options(&old), 10);
    client
        .subscribe("devices/rotor/certs/issued", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    // A CSR that is not one is answered with the reason.
    client
        .publish(
            "devices/rotor/certs/csr",
            rumqttc::QoS::AtLeastOnce,
            false,
            "not a csr",
        )
        .await
        .unwrap();
    let answer = next_publish(&mut events).await;
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("certificate signing request"),
        "{answer}"
    );

    // A real one: the device keeps its new key to itself.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    client
        .publish(
            "devices/rotor/certs/csr",
            rumqttc::QoS::AtLeastOnce,
            false,
            csr,
        )
        .await
        .unwrap();
    let answer = next_publish(&mut events).await;
    let new_serial = answer["serial"].as_str().expect("a certificate").to_owned();
    assert_ne!(new_serial, old_serial);
    let new = Credentials {
        cert_pem: answer["cert_pem"].as_str().unwrap().to_owned(),
        key_pem: key.serialize_pem(),
        ca_pem: answer["ca_pem"].as_str().unwrap().to_owned(),
        ..old.clone()
    };

    // The new certificate works, and so does the old one until it is revoked.
    for creds in [&new, &old] {
        let mut d = RawDevice::connected(&t, creds, 30).await;
        d.send(&Packet::PingReq).await;
        assert_eq!(d.recv().await, Some(Packet::PingResp));
    }
    let (status, body) = t
        .post(
            "/api/v1/devices/rotor/revoke",
            json!({ "serial": old_serial }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(try_connect(&t, &old).await, refused_not_authorized());
    let mut d = RawDevice::connected(&t, &new, 30).await;
    d.send(&Packet::PingReq).await;
    assert_eq!(d.recv().await, Some(Packet::PingResp));
    let (_, shown) = t.get("/api/v1/devices/rotor").await;
    assert_eq!(shown["cert_serial"], new_serial.as_str(), "{shown}");
    assert_eq!(shown["certificates"].as_array().unwrap().len(), 2);
}

/// Tries to connect until the gate answers with a CONNACK (the gate picks up a newly
/// trusted CA within one registry poll); returns that CONNACK.
async fn connack_eventually(t: &Tellus, creds: &Credentials) -> Option<Packet> {
    for _ in 0..100 {
        let tcp = tokio::net::TcpStream::connect(t.mqtt_addr).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(creds.tls_config().unwrap()));
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        if let Ok(tls) = connector.connect(name, tcp).await {
            let mut d = RawDevice::from_tls(tls);
            d.send(&Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(
                creds.id.as_str(),
            )))
            .await;
            if let Some(answer) = d.recv().await {
                return Some(answer);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_a_registered_external_ca_are_registered_on_first_connection() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let fleet_ca = std::fs::read_to_string(t.data_dir.join("pki/ca.crt")).unwrap();
    let fleet_device = t.create_device("fleet-dev").await;
    let (acme, acme_pem) = certs::own_ca("Acme Devices CA");
    let (stranger, _) = certs::own_ca("Stranger CA");
    let (quiet, quiet_pem) = certs::own_ca("Quiet CA");

    let (status, body) = t
        .post(
            "/api/v1/pki/cas",
            json!({"pem": acme_pem, "auto_register": true, "tags": {"vendor": "acme"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = t.post("/api/v1/pki/cas", json!({"pem": quiet_pem})).await;
    assert_eq!(status, 201, "{body}");

    // A device of the auto-registering CA connects and is registered with its tags.
    let acme_7 = certs::device(&acme, "acme-7", &fleet_ca);
    assert_eq!(
        connack_eventually(&t, &acme_7).await,
        Some(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success
        }))
    );
    let (status, shown) = t.get("/api/v1/devices/acme-7").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["tags"], json!({"vendor": "acme"}));

    // A CA that does not register devices lets in only devices registered already; an
    // unknown CA not even that far; and no CA may speak for a device another CA vouches for.
    let quiet_1 = certs::device(&quiet, "quiet-1", &fleet_ca);
    assert_eq!(
        connack_eventually(&t, &quiet_1).await,
        refused_not_authorized()
    );
    let hijack = certs::device(&acme, "fleet-dev", &fleet_ca);
    assert_eq!(try_connect(&t, &hijack).await, refused_not_authorized());
    let stray = certs::device(&stranger, "stray", &fleet_ca);
    let tcp = tokio::net::TcpStream::connect(t.mqtt_addr).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(stray.tls_config().unwrap()));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    if let Ok(tls) = connector.connect(name, tcp).await {
        let mut d = RawDevice::from_tls(tls);
        d.expect_closed(|_| false).await;
    }
    for id in ["quiet-1", "stray"] {
        let (status, _) = t.get(&format!("/api/v1/devices/{id}")).await;
        assert_eq!(status, 404, "{id} must not be registered");
    }
    // The fleet's own devices are unaffected.
    let mut d = RawDevice::connected(&t, &fleet_device, 30).await;
    d.send(&Packet::PingReq).await;
    assert_eq!(d.recv().await, Some(Packet::PingResp));
}
