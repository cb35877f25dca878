//! The log lines at ERROR of the current thread's tasks, for tests that check what is logged
//! or wait for a fault to have been met.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;

/// Log lines at ERROR, each as its fields (`message="..." reason="..."`).
#[derive(Clone, Default)]
pub struct Errors(Arc<Mutex<Vec<String>>>);

impl Errors {
    /// Collects the ERROR lines of this thread until the guard is dropped: run the test on a
    /// current-thread runtime, so that every task it spawns logs here.
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let errors = Errors::default();
        let subscriber = tracing_subscriber::registry().with(errors.clone());
        (errors, tracing::subscriber::set_default(subscriber))
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Whether a line so far contains `text`.
    pub fn contain(&self, text: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l.contains(text))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Errors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut line = String::new();
            event.record(
                &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                    line.push_str(&format!("{}={value:?} ", field.name()));
                },
            );
            self.0.lock().unwrap().push(line);
        }
    }
}
