//! Mutual TLS with certificates made at test time: a client with a
//! certificate of the configured CA is served; one without a certificate,
//! with another CA's certificate, or speaking plaintext is not.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use user_service::config::Settings;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::user_service_client::UserServiceClient;

use crate::harness::*;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn channel(port: u16, ca: &str, identity: Option<&(String, String)>) -> Option<Channel> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()
}

async fn serving(ch: Channel) -> bool {
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_of_the_ca() {
    let ca = Ca::new("user-service test CA");
    let rogue = Ca::new("someone else's CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"]);
    let client = ca.leaf(&["billing-service"]);
    let stranger = rogue.leaf(&["billing-service"]);

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let db = TestDb::new(Engine::Sqlite).await;
    let mut settings = Settings::for_database(db.url.clone());
    settings.tls_cert = Some(file("server.pem", &server.0));
    settings.tls_key = Some(file("server.key", &server.1));
    settings.tls_client_ca = Some(file("ca.pem", &ca.pem));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(user_service::app::serve(settings, listener, async {
        let _ = stopped.await;
    }));

    let mut ok = None;
    for _ in 0..250 {
        if let Some(ch) = channel(port, &ca.pem, Some(&client)).await
            && serving(ch.clone()).await
        {
            ok = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = ok.expect("a client with a certificate of the CA is served");
    let created = UserServiceClient::new(ch)
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("tls@example.com")),
            ..Default::default()
        })
        .await
        .expect("create over mTLS")
        .into_inner();
    assert!(created.name.starts_with("projects/acme/users/"));

    // No client certificate, another CA's certificate: the handshake or the
    // first call fails.
    for (what, id) in [("no certificate", None), ("a stranger's", Some(&stranger))] {
        let refused = match channel(port, &ca.pem, id).await {
            None => true,
            Some(ch) => !serving(ch).await,
        };
        assert!(refused, "a client with {what} was served");
    }
    // Plaintext to a TLS port.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(!serving(ch).await, "plaintext was served");
    }

    // The refusals were the handshake's, not a dead server's.
    let again = channel(port, &ca.pem, Some(&client))
        .await
        .expect("reconnect");
    assert!(serving(again).await, "the good client is still served");

    let _ = stop.send(());
    task.await.unwrap().expect("server stopped cleanly");
}
