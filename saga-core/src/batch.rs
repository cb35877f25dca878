//! A batch that failed, tried again item by item.

use std::sync::Arc;

use crate::error::{Error, Result};

/// Runs `one` on each item alone, in order, after the batch that held them failed: one item
/// that cannot be applied must not fail the others. An error that says the database or the
/// broker is out of reach ([`Error::is_unreachable`], not an answer about this item) ends the
/// walk: it becomes the error of that item and of every item left, which are not tried.
/// Returns one result per item, in order.
pub(crate) async fn one_by_one<T, R, F>(
    items: impl IntoIterator<Item = T>,
    mut one: impl FnMut(T) -> F,
) -> Vec<Result<R>>
where
    F: Future<Output = Result<R>>,
{
    let mut results = Vec::new();
    let mut stopped: Option<Arc<Error>> = None;
    for item in items {
        if stopped.is_none() {
            match one(item).await {
                Err(e) if e.is_unreachable() => {
                    stopped = Some(match e {
                        Error::Shared(shared) => shared,
                        e => Arc::new(e),
                    });
                }
                result => {
                    results.push(result);
                    continue;
                }
            }
        }
        let shared = stopped.as_ref().expect("the walk has stopped");
        results.push(Err(Error::Shared(Arc::clone(shared))));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportError;

    fn refused(item: u32) -> Error {
        Error::Config(format!("item {item} refused"))
    }

    #[tokio::test]
    async fn each_item_gets_its_own_result_in_order() {
        let results = one_by_one(1..=4, |i| async move {
            if i % 2 == 0 {
                Err(refused(i))
            } else {
                Ok(i * 10)
            }
        })
        .await;
        let shown: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "10",
                "invalid configuration: item 2 refused",
                "30",
                "invalid configuration: item 4 refused"
            ]
        );
    }

    #[tokio::test]
    async fn an_unreachable_service_is_the_error_of_the_items_left_without_trying_them() {
        let mut tried = Vec::new();
        let results = one_by_one(1..=4, |i| {
            tried.push(i);
            async move {
                if i == 2 {
                    Err(Error::Transport(TransportError::new("broker gone")))
                } else {
                    Ok(i)
                }
            }
        })
        .await;
        assert_eq!(tried, [1, 2]);
        assert!(matches!(results[0], Ok(1)));
        for result in &results[1..] {
            match result {
                Err(Error::Shared(e)) => assert!(matches!(**e, Error::Transport(_))),
                other => panic!("expected the shared stop, got {other:?}"),
            }
        }
    }
}
