//! Which stitch queue runs a workflow: the `stitch:` block of the
//! workflow's raw YAML (`stitch: {queue: NAME}`); without one, the
//! configured default queue.

use yaml_rust2::{Yaml, YamlLoader};

/// Why a workflow cannot be routed. Its message becomes the `error` of the
/// workflow's `failed` status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The raw YAML does not parse.
    #[error("workflow YAML does not parse: {0}")]
    Yaml(String),
    /// The `stitch:` block is not a mapping with a string `queue`.
    #[error("invalid stitch block: {0}")]
    Block(String),
}

/// The queue named by `raw`'s `stitch:` block, or `default_queue` when the
/// workflow has none.
pub fn queue_for(raw: &str, default_queue: &str) -> Result<String, RouteError> {
    let docs = YamlLoader::load_from_str(raw).map_err(|e| RouteError::Yaml(e.to_string()))?;
    let Some(doc) = docs.into_iter().next() else {
        return Ok(default_queue.to_string());
    };
    let stitch = match &doc {
        Yaml::Hash(map) => map.get(&Yaml::String("stitch".into())),
        Yaml::Null => None,
        _ => return Err(RouteError::Yaml("the top level is not a mapping".into())),
    };
    match stitch {
        None | Some(Yaml::Null) => Ok(default_queue.to_string()),
        Some(Yaml::Hash(block)) => {
            for key in block.keys() {
                if key.as_str() != Some("queue") {
                    return Err(RouteError::Block(format!(
                        "unknown key {key:?}; the block takes only `queue`"
                    )));
                }
            }
            match block.get(&Yaml::String("queue".into())) {
                None | Some(Yaml::Null) => Ok(default_queue.to_string()),
                Some(Yaml::String(q)) if !q.trim().is_empty() => Ok(q.clone()),
                Some(other) => Err(RouteError::Block(format!(
                    "`queue` must be a non-empty string, got {other:?}"
                ))),
            }
        }
        Some(_) => Err(RouteError::Block(
            "`stitch` must be a mapping like `stitch: {queue: NAME}`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_block_or_default() {
        let raw = "when:\n  - event: [push]\nengine: nixery\nstitch:\n  queue: ci-fast\n";
        assert_eq!(queue_for(raw, "default").unwrap(), "ci-fast");
        assert_eq!(queue_for("engine: nixery\n", "default").unwrap(), "default");
        assert_eq!(queue_for("", "default").unwrap(), "default");
        assert_eq!(queue_for("stitch: {}\n", "d").unwrap(), "d");
    }

    #[test]
    fn bad_yaml_and_bad_blocks_are_errors() {
        assert!(matches!(
            queue_for("a: [unclosed\n", "d"),
            Err(RouteError::Yaml(_))
        ));
        assert!(matches!(
            queue_for("- a\n- b\n", "d"),
            Err(RouteError::Yaml(_))
        ));
        assert!(matches!(
            queue_for("stitch: fast\n", "d"),
            Err(RouteError::Block(_))
        ));
        assert!(matches!(
            queue_for("stitch: {queue: 3}\n", "d"),
            Err(RouteError::Block(_))
        ));
        assert!(matches!(
            queue_for("stitch: {queu: x}\n", "d"),
            Err(RouteError::Block(_))
        ));
    }
}
