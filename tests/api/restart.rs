//! Durability: builds submitted before the controller is killed (-9) are claimable after it restarts.

use std::process::{Child, Stdio};

use serde_json::Value;

use crate::support::{API_KEY, free_port, fresh_database, serve_command, wait_ready};

struct Controller {
    child: Child,
    base: String,
}

impl Controller {
    fn start(database_url: &str, storage: &std::path::Path, port: u16, certs_key: &str) -> Controller {
        let child = serve_command(database_url, storage, port, certs_key)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn controller");
        Controller {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        wait_ready(client, &self.base).await;
    }

    fn kill(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn builds_survive_a_kill_9_of_the_controller() {
    let (url, _pool) = fresh_database(2).await;
    let storage = std::env::temp_dir().join(format!("expo-restart-{}", expo_controller::ids::new_id()));
    let client = reqwest::Client::new();
    let port = free_port();
    let certs_key = expo_controller::ids::new_key32();

    let first = Controller::start(&url, &storage, port, &certs_key);
    first.wait_ready(&client).await;
    let mut submitted = Vec::new();
    for _ in 0..3 {
        let form = reqwest::multipart::Form::new().text("platform", "android").part(
            "source",
            reqwest::multipart::Part::bytes(b"src".to_vec()).file_name("a.zip"),
        );
        let body: Value = client
            .post(format!("{}/api/builds/submit", first.base))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        submitted.push(body["id"].as_str().unwrap().to_string());
    }
    first.kill();

    let second = Controller::start(&url, &storage, port, &certs_key);
    second.wait_ready(&client).await;
    let worker: Value = client
        .post(format!("{}/api/workers/register", second.base))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({ "name": "w", "capabilities": {} }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let worker_id = worker["id"].as_str().unwrap();
    let poll: Value = client
        .get(format!("{}/api/workers/poll", second.base))
        .query(&[("worker_id", worker_id)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = poll["job"]["id"].as_str().expect("a job after restart").to_string();
    assert_eq!(job_id, submitted[0], "oldest first");
    let source = client
        .get(format!("{}/api/builds/{job_id}/source", second.base))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(source.bytes().await.unwrap().as_ref(), b"src");
    second.kill();
    let _ = std::fs::remove_dir_all(&storage);
}
