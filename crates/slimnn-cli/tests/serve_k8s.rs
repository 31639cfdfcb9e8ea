//! The Kubernetes manifests in deploy/ pass schema validation (kubernetes-validate's strict
//! Kubernetes schemas, plus our InferenceService schema), and the checker rejects broken ones.

mod common;

use common::*;
use std::process::Command;

fn validate(dir: &std::path::Path) -> (bool, String) {
    let out =
        Command::new(python()).arg(repo_root().join("scripts/validate_k8s.py")).arg(dir).output().expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn deploy_manifests_validate() {
    let (ok, text) = validate(&repo_root().join("deploy"));
    assert!(ok, "{text}");
    for what in ["Deployment/slimnn-serve", "Service/slimnn-serve", "InferenceService/minilm"] {
        assert!(text.lines().any(|l| l.starts_with("ok ") && l.contains(what)), "{what} not validated:\n{text}");
    }
}

#[test]
fn broken_manifests_are_rejected() {
    let root = repo_root().join("deploy");
    let cases = [
        ("kubernetes/slimnn-serve.yaml", "containerPort: 8000", "containerPort: eight-thousand"),
        ("kubernetes/slimnn-serve.yaml", "path: /v2/health/ready", "path: /healthz"),
        ("kserve/inferenceservice.yaml", "minReplicas: 1", "minReplicas: 1\n    replicaz: 3"),
        ("kserve/inferenceservice.yaml", "containerPort: 8080", "containerPort: \"8080\""),
    ];
    for (k, (file, from, to)) in cases.iter().enumerate() {
        let dir = temp_dir(&format!("k8s-bad-{k}"));
        for sub in ["kubernetes", "kserve"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        for f in ["kubernetes/slimnn-serve.yaml", "kserve/inferenceservice.yaml", "kserve/inferenceservice.schema.json"]
        {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let text = if f == *file {
                assert!(text.contains(from), "{f} no longer contains '{from}'");
                text.replacen(from, to, 1)
            } else {
                text
            };
            std::fs::write(dir.join(f), text).unwrap();
        }
        let (ok, text) = validate(&dir);
        assert!(!ok && text.contains("FAIL"), "case {k} ({to}) was accepted:\n{text}");
    }
}
