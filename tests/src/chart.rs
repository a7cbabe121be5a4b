//! The Helm chart, rendered by Helm's own engine (`deploy/helm/check.py`: helm-python-sdk).

use serde_json::Value;

/// Every object the chart renders with `values`.
pub fn render(values: &Value) -> Vec<Value> {
    let out = std::process::Command::new("python3")
        .arg(crate::root().join("deploy/helm/check.py"))
        .args(["render", "--values", &values.to_string()])
        .output()
        .expect("python3 (helm-python-sdk: cargo xtask setup)");
    assert!(
        out.status.success(),
        "the chart did not render with {values}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("rendered objects as JSON")
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

/// Whether the chart renders an object of `kind` named `name`.
pub fn has(objects: &[Value], kind: &str, name: &str) -> bool {
    objects
        .iter()
        .any(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// A list of strings from JSON.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
